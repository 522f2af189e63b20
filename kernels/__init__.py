"""Triton kernels of ditq, shipped as ``ditq.kernels`` (see setup.py). They know nothing of diffusers or of
``ditq``'s runtime (tests/kernels/test_describe.py checks that no module here imports it): each file holds
one kernel family and its launcher; ``config_table`` and ``configs/`` the tile tables; ``aot`` the
ahead-of-time compile and SASS toolchain.

:func:`describe` says what each family takes. The kernel modules are imported only when it is called, so
importing this package needs neither triton nor a kernel module that fails to import.
"""
from __future__ import annotations

from typing import Dict

FAMILIES = {"quantize_act": "quantize_act", "gemm_w8a8": "w8a8", "gemm_w4a8": "w4a8",
            "norm_quantize": "norm_quantize"}  # family: module


def describe() -> Dict[str, Dict]:
    """``{family: capabilities}`` of the Triton kernels, each derived from the constants and tile tables its
    launcher itself reads (``k_multiple``, ``max_k``, ``archs``: compute capabilities with a tile table,
    ``interpreter``; for the GEMMs also ``weight_bits``, ``group_sizes``, ``layout``, ``layout_version``)."""
    import importlib

    return {family: importlib.import_module(f"{__name__}.{mod}").describe() for family, mod in FAMILIES.items()}
