"""The ``cuda`` and ``cuda-emulated`` backends: the CUDA C++ kernels of ``ditq._C`` (``csrc/``).

* ``cuda``: the real kernels, on CUDA tensors, on the current stream. Needs ``ditq._C`` built with nvcc
  against a CUDA torch (``DITQ_WITH_CUDA``) and a visible GPU.
* ``cuda-emulated``: the *same kernel sources* compiled by the host compiler and run on CPU tensors by the
  SIMT emulator (``csrc/emu``): slow, exact, and checking (races, deadlocks, shared-memory addresses).
  Its knobs: :func:`ditq.emulator.emulator_options`.

Both call ``torch.ops.ditq_C.<op>``; torch's dispatcher sends CPU tensors to the emulated implementation
and CUDA tensors to the real one. ``import ditq`` never fails because ``_C`` is missing: these backends
then report why they are unavailable.
"""
from __future__ import annotations

import contextlib
import json
from functools import lru_cache
from typing import Optional

import torch

from . import Backend, KernelFamily, KernelOps, register
from . import cuda_layout
from ..format import int_scales_to_canonical, int_scales_to_kernel

try:
    from .. import _C  # noqa: F401  (loading the library registers torch.ops.ditq_C.*)
    _C_ERROR: Optional[str] = None
except ImportError as e:  # not built (DITQ_NO_EXTENSION, no compiler...) or built against another torch
    _C = None
    _C_ERROR = str(e)

_BUILD_HINT = ("build it with `pip install --no-build-isolation -e .` (or `python setup.py build_ext "
               "--inplace`) with CUDA_HOME set")


def built() -> bool:
    return _C is not None


def built_with_cuda() -> bool:
    return _C is not None and bool(torch.ops.ditq_C.built_with_cuda())


@lru_cache(maxsize=None)
def _families():
    """The kernel families as ditq._C describes them (generated from the same lists that instantiate them)."""
    table = json.loads(torch.ops.ditq_C.kernel_families())
    return {name: KernelFamily.from_description(name, d) for name, d in table.items()}


@lru_cache(maxsize=None)
def _kernel_ops() -> KernelOps:
    """The ditq_C ops themselves (their C++ bindings validate every input), with fake implementations so that
    torch.compile traces through them (ditq.ops's fakes: the ditq_C ops' extra tile / splits arguments fall in
    their ``*_``)."""
    from ..ops import FAKES, define_kernel_op

    names = ("quantize_act", "gemm_w8a8", "gemm_w4a8", "gemm_w8a8_fused", "gemm_w4a8_fused", "norm_modulate_quantize")
    for name in names:
        torch.library.register_fake(f"ditq_C::{name}", FAKES[name])
    # fused_gemm_float_a: the fused GEMMs also take a float `a` with a static a_scale and quantize it as they
    # load it (csrc/gemm_fused_float_a.cu, gemm.cuh's FloatATileLoader), on both cuda and cuda-emulated
    return KernelOps(**{name: getattr(torch.ops.ditq_C, name).default for name in names}, fused_gemm_float_a=True,
                     attention_inputs=define_kernel_op("cuda", "attention_inputs",
                                                       {"CPU": _attention_inputs_cpu, "CUDA": _attention_inputs_cuda}))


def _int_scale_kernels(device: torch.device) -> bool:
    """Whether integer group scales go to the GEMMs as integers on ``device``: the Hopper kernels apply them before
    the tensor cores (an sm_90 GPU with this build's sm_90a code; the emulator, whose binding runs them under
    ``emulator_options(arch="sm_90a")`` and otherwise derives float scales per call, as on any other GPU). Elsewhere
    the layer keeps the canonical float scales (the exact products q * c) and runs the float-scale kernels."""
    if device.type != "cuda":
        return True
    with torch.cuda.device(device):
        return torch.cuda.get_device_capability() == (9, 0) and bool(torch.ops.ditq_C.gemm_sm90_available())


def _attention_inputs_cuda(*args):
    """attention_inputs on CUDA tensors: a float op with no C++ kernel, so the Triton kernel (Triton comes with a
    CUDA torch)."""
    from ..kernels.attention_inputs import attention_inputs
    return attention_inputs(*args)


def _attention_inputs_cpu(*args):
    """attention_inputs on the emulator's CPU tensors: the torch reference (the op is not an integer kernel, so
    there is nothing of csrc/ to emulate)."""
    from .torch_backend import attention_inputs
    return attention_inputs(*args)


# ---- GEMMs (csrc/gemm*.{h,cuh,cu,cpp}, layouts in cuda_layout.py) --------------------------------------------
# The tile comes from csrc/configs/gemm_tiles*.h by M bucket and architecture, the split-K count from the
# grid size and the SM count, at most the M bucket's max_splits (both chosen in the binding). gemm_tile() pins them, for tests and benchmarks.
_GEMM_FORCED = [-1, -1]  # [tile, splits]; -1 = automatic


def _gemm_forced():
    return tuple(_GEMM_FORCED)


@contextlib.contextmanager
def gemm_tile(tile: Optional[int] = None, splits: Optional[int] = None):
    """Run the CUDA GEMMs in this block with tile id ``tile`` and ``splits`` split-K slices (None: automatic).
    A forced count splits every tile on the mma.sync kernels; on the Hopper kernels it splits the tiles of the last
    wave of SMs (every tile when they fit one wave) and runs the full waves before it whole, as the automatic
    schedule does. Process-wide, like the emulator options."""
    previous = list(_GEMM_FORCED)
    _GEMM_FORCED[:] = [-1 if tile is None else int(tile), -1 if splits is None else int(splits)]
    try:
        yield
    finally:
        _GEMM_FORCED[:] = previous


def gemm_tile_count() -> int:
    """Number of tile configurations compiled into ditq._C."""
    return int(torch.ops.ditq_C.gemm_tile_count())


def gemm_tile_info(tile: int):
    """[BM, BN, BK, WARPS_M, WARPS_N, STAGES, THREADS] of a tile id."""
    return list(torch.ops.ditq_C.gemm_tile_info(tile))


def gemm_pick_tile(arch: int, m: int, w4: bool) -> int:
    """Tile id the table gives compute capability ``arch`` (e.g. 90) at M = ``m``; -1 if unsupported."""
    return int(torch.ops.ditq_C.gemm_pick_tile(arch, m, w4))
# ---- end GEMMs -----------------------------------------------------------------------------------------------


class _CudaKernels(Backend):
    """What both backends share: the ops of ``ditq._C``, the CUDA weight layouts."""

    def unavailable_reason(self) -> Optional[str]:
        if _C is None:
            return f"the C++/CUDA extension ditq._C is not built ({_C_ERROR}); {_BUILD_HINT}"
        return None

    def families(self):
        return _families()

    def kernel_ops(self):
        return _kernel_ops()

    def prepare_weight(self, fmt, qweight, scales):
        qweight, scales = cuda_layout.prepare_weight(fmt.bits, qweight, scales)
        if fmt.group_scales == "int" and _int_scale_kernels(qweight.device):
            scales = int_scales_to_kernel(*fmt.int_group_scales(scales))
        return qweight, scales

    def canonical_weight(self, fmt, qweight, scales):
        if scales.dtype == torch.int32:  # integer group scales in the kernels' form
            scales = int_scales_to_canonical(scales)
        return cuda_layout.canonical_weight(fmt.bits, qweight, scales)

    def quantize_act(self, x, scale):
        q, s = torch.ops.ditq_C.quantize_act(x, scale)
        return q, s

    def gemm_w8a8(self, a, a_scale, w, w_scale, bias, out_dtype):
        return torch.ops.ditq_C.gemm_w8a8(a, a_scale, w, w_scale, bias, out_dtype, *_gemm_forced())

    def gemm_w4a8(self, a, a_scale, w, w_scale, bias, group_size, out_dtype):
        return torch.ops.ditq_C.gemm_w4a8(a, a_scale, w, w_scale, bias, group_size, out_dtype,
                                          *_gemm_forced())

    def gemm_w8a8_fused(self, a, a_scale, w, w_scale, bias, gelu, gate, residual, rows_per_gate, out_scale,
                        out_dtype):
        return torch.ops.ditq_C.gemm_w8a8_fused(a, a_scale, w, w_scale, bias, gelu, gate, residual, rows_per_gate,
                                                out_scale, out_dtype, *_gemm_forced())

    def gemm_w4a8_fused(self, a, a_scale, w, w_scale, bias, group_size, gelu, gate, residual, rows_per_gate,
                        out_scale, out_dtype):
        return torch.ops.ditq_C.gemm_w4a8_fused(a, a_scale, w, w_scale, bias, group_size, gelu, gate, residual,
                                                rows_per_gate, out_scale, out_dtype, *_gemm_forced())

    def norm_modulate_quantize(self, x, shift, scale, eps, act_scale):
        return torch.ops.ditq_C.norm_modulate_quantize(x, shift, scale, eps, act_scale)


class CudaBackend(_CudaKernels):
    name = "cuda"
    devices = ("cuda",)

    def unavailable_reason(self) -> Optional[str]:
        reason = super().unavailable_reason()
        if reason is None and not built_with_cuda():
            reason = ("ditq._C was built without CUDA kernels (a CPU-only torch, or nvcc not found at build "
                      "time: set CUDA_HOME and rebuild); only 'cuda-emulated' is available from it")
        if reason is None and not torch.cuda.is_available():
            reason = "no CUDA GPU is visible (torch.cuda.is_available() is False)"
        return reason

    def unavailable_on(self, device: torch.device) -> Optional[str]:
        reason = super().unavailable_on(device)
        if reason is None:
            major, minor = torch.cuda.get_device_capability(device)
            built = self.families()["gemm_w8a8"].archs
            if not any(a // 10 == major and a <= major * 10 + minor for a in built):
                reason = (f"ditq._C has GEMM code for sm_{', sm_'.join(map(str, built)) or ' none'}, not for this "
                          f"sm_{major}{minor} GPU; rebuild with TORCH_CUDA_ARCH_LIST={major}.{minor}")
        return reason


class CudaEmulatedBackend(_CudaKernels):
    name = "cuda-emulated"
    devices = ("cpu",)


register(CudaBackend())
register(CudaEmulatedBackend())
