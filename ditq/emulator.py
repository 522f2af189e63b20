"""Knobs of the SIMT emulator that runs the CUDA kernels on CPU tensors (backend ``cuda-emulated``).

The emulator runs each CUDA thread of a block as a cooperative fiber (``csrc/emu``, guide in
``csrc/README.md``). Correct kernels give the same bits under every setting; racy ones do not, or are
reported. The tests run every kernel under every order (several seeds) x every cp.async mode with the race
checker on::

    from ditq.emulator import emulator_options
    with emulator_options(order="random", seed=3, cp_async="barrier", race_check=True):
        q, s = torch.ops.ditq.quantize_act(x, None, "cuda-emulated")

* ``order``: in which order blocked threads are resumed: ``"forward"`` (thread 0 first), ``"reverse"``,
  ``"random"`` (reshuffled at every scheduling round from ``seed``: a seed reproduces a schedule).
* ``cp_async``: when ``cp.async`` data lands in shared memory: ``"issue"`` (at once), ``"wait"`` (only when
  a ``cp.async.wait_group`` retires its group: the latest legal moment), ``"barrier"`` (at the first
  ``__syncthreads`` after issue, if earlier than the wait).
* ``race_check``: shadow-memory race checker on shared memory, and reads of ``cp.async`` data in flight.
* ``arch``: ``"sm_80"`` (default) or ``"sm_90a"``: which kernels the emulated launchers pick -- the mma.sync
  ones, or the Hopper ones (wgmma, TMA, mbarrier), whose instructions the emulator models too (guide:
  ``csrc/README.md``).
* ``async_landing``: when Hopper async work lands: ``"issue"`` (TMA bytes and wgmma results at once) or
  ``"wait"`` (default: TMA bytes when a thread first waits on their mbarrier, wgmma results at the
  ``wgmma.wait_group`` that retires them -- the latest a correct kernel may see them).
* ``sm_count`` (default 132, an H100 SXM): the SM count the emulated launches schedule for when they choose
  tiles and split counts themselves. A small count lets a test run the Hopper GEMMs' schedule of full waves plus
  a split last wave (``csrc/configs/gemm_tiles_sm90.h``, sm90_auto_schedule) on a handful of tiles.
* ``mem_check`` (on by default): the global-memory checker, the CPU twin of compute-sanitizer's memcheck. The
  launchers register every buffer they pass with its extent; an access outside one, a write to an input, or a
  read of output never written is reported (kinds ``global-address``, ``global-read-only``,
  ``global-unwritten``) with the kernel, block, thread, source line and buffer.

Errors the emulator finds raise ``RuntimeError`` whose message starts ``ditq emulator [<kind>]`` and names
the block, the thread(s) and the source lines.
"""
from __future__ import annotations

import contextlib
import threading
from typing import NamedTuple

import torch

ORDERS = ("forward", "reverse", "random")
CP_ASYNC_MODES = ("issue", "wait", "barrier")
ARCHS = ("sm_80", "sm_90a")
ASYNC_LANDING_MODES = ("issue", "wait")


# The options live in one process-wide C++ struct. A block under ``emulator_options`` holds this lock, so another
# thread's block waits for it instead of interleaving (thread A enters, B enters, A exits and restores the
# defaults under B's kernels, B exits and restores A's options: left set for everyone). Re-entrant, so nested
# blocks in one thread restore the outer block's options.
_LOCK = threading.RLock()


class EmulatorOptions(NamedTuple):
    order: str
    seed: int
    cp_async: str
    race_check: bool
    mem_check: bool = True
    arch: str = "sm_80"
    async_landing: str = "wait"
    sm_count: int = 132


def _ops():
    from .backends import cuda_backend

    if not cuda_backend.built():
        raise RuntimeError(f"the CUDA emulator lives in ditq._C, which is not built: {cuda_backend._C_ERROR}")
    return torch.ops.ditq_C


def _hopper_ops(ops):
    """The arch / async_landing ops, or None for a ditq._C built before they existed."""
    try:
        return ops.emulator_get_hopper, ops.emulator_set_hopper
    except (AttributeError, RuntimeError):
        return None


def _sm_count_ops(ops):
    """The sm_count ops, or None for a ditq._C built before they existed."""
    try:
        return ops.emulator_get_sm_count, ops.emulator_set_sm_count
    except (AttributeError, RuntimeError):
        return None


def get_emulator_options() -> EmulatorOptions:
    ops = _ops()
    order, seed, cp_async, race = ops.emulator_get_options()
    hopper = _hopper_ops(ops)
    arch, landing = hopper[0]() if hopper else (0, 1)
    sms = _sm_count_ops(ops)
    return EmulatorOptions(ORDERS[order], int(seed), CP_ASYNC_MODES[cp_async], bool(race),
                           bool(ops.emulator_get_mem_check()), ARCHS[arch], ASYNC_LANDING_MODES[landing],
                           int(sms[0]()) if sms else 132)


def set_emulator_options(order: str = "forward", seed: int = 0, cp_async: str = "wait",
                         race_check: bool = False, mem_check: bool = True, arch: str = "sm_80",
                         async_landing: str = "wait", sm_count: int = 132) -> None:
    if order not in ORDERS:
        raise ValueError(f"emulator order must be one of {ORDERS}, got {order!r}")
    if cp_async not in CP_ASYNC_MODES:
        raise ValueError(f"emulator cp_async must be one of {CP_ASYNC_MODES}, got {cp_async!r}")
    if arch not in ARCHS:
        raise ValueError(f"emulator arch must be one of {ARCHS}, got {arch!r}")
    if async_landing not in ASYNC_LANDING_MODES:
        raise ValueError(f"emulator async_landing must be one of {ASYNC_LANDING_MODES}, got {async_landing!r}")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"emulator seed must be a non-negative int, got {seed!r}")
    if not isinstance(sm_count, int) or isinstance(sm_count, bool) or not 1 <= sm_count <= 1024:
        raise ValueError(f"emulator sm_count must be an int in [1, 1024], got {sm_count!r}")
    with _LOCK:  # not in the middle of another thread's emulator_options block
        ops = _ops()
        ops.emulator_set_options(ORDERS.index(order), seed, CP_ASYNC_MODES.index(cp_async), bool(race_check))
        ops.emulator_set_mem_check(bool(mem_check))
        hopper = _hopper_ops(ops)
        if hopper:
            hopper[1](ARCHS.index(arch), ASYNC_LANDING_MODES.index(async_landing))
        elif (arch, async_landing) != ("sm_80", "wait"):
            raise RuntimeError("this ditq._C predates the emulator's arch / async_landing knobs: rebuild it")
        sms = _sm_count_ops(ops)
        if sms:
            sms[1](sm_count)
        elif sm_count != 132:
            raise RuntimeError("this ditq._C predates the emulator's sm_count knob: rebuild it")


@contextlib.contextmanager
def emulator_options(order: str = "forward", seed: int = 0, cp_async: str = "wait", race_check: bool = True,
                     mem_check: bool = True, arch: str = "sm_80", async_landing: str = "wait", sm_count: int = 132):
    """Run the block with these emulator settings, restoring the previous ones after.

    The settings are process-wide: while one thread is inside a block, another thread entering one waits until
    it leaves (so each block's kernels run under its own settings). A thread must therefore not wait inside a
    block for another thread that is about to enter one (it would wait forever)."""
    with _LOCK:
        previous = get_emulator_options()
        set_emulator_options(order, seed, cp_async, race_check, mem_check, arch, async_landing, sm_count)
        try:
            yield
        finally:
            set_emulator_options(*previous)
