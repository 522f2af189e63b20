"""Triton kernels of ditq, shipped as ``ditq.kernels`` (see setup.py). They know nothing of diffusers or
of ``ditq``'s runtime: each file holds one kernel, its launcher and, where useful, its reference."""
