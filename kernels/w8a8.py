"""W8A8 GEMM: int8 activations [M, K] x int8 weights [N, K] -> int32 on the tensor cores, fused epilogue.

``y[m, n] = (a_scale[m] * w_scale[n]) * sum_k a[m, k] w[n, k] + bias[n]``, cast to bf16 / fp16 / fp32
(BRIEF §2). ``a_scale`` is one static scalar [1] or one per token [M]. The int32 accumulation is exact, so
the result differs from the exact product only by the fp32 epilogue's rounding (``ditq.testing``).

Loads (BRIEF §4, from a SASS study of triton 3.8):

* ``USE_TMA`` (Hopper): host-made tensor descriptors, so the copy engine (``UTMALDG``) fetches the A and W
  tiles and zero-fills whatever lies past M, N or K: no masks in the loop at all.
* pointers (Ampere, and anywhere TMA cannot be used): ``K % 16 == 0`` is required, so every row starts
  16-byte aligned and Triton's divisibility specialisation of ``K`` gives 16-byte ``cp.async`` loads
  (``LDGSTS.E.BYPASS.128``). Without it a row may start anywhere and the loads degrade to single bytes
  (``LDG.E.U8``; see the negative control in tests/kernels/test_aot_w8a8.py). Rows past M / N are
  wrapped (``% M``) rather than masked, so only the K tail needs a mask, and that mask is constant over
  runs of 16 bytes (K and k0 are multiples of 16), which keeps the loads vectorised.

Int8 ``tl.dot`` is never made asynchronous on Hopper (the pipeliner wants an fp32 accumulator), so the
Hopper tables use BK = 128 to amortise the per-iteration wgmma wait.

The tile configuration comes from ``configs/w8a8_<arch>.json`` by M bucket (``config_table``); CPU tensors
run under the interpreter with the small tiles of ``w8a8_interpreter.json``.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import triton
import triton.language as tl

from . import config_table
from .interpret import cast_rn, check_device, interpreting

KERNEL_NAME = "w8a8"
_OUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def w8a8_kernel(a, w, y_ptr, a_scale_ptr, w_scale_ptr, bias_ptr, M, N, K,
                A_PER_TOKEN: tl.constexpr, HAS_BIAS: tl.constexpr, USE_TMA: tl.constexpr, SWAP_AB: tl.constexpr,
                BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
                INTERPRET: tl.constexpr):
    # Grouped launch order: GROUP_M row-tiles share each weight column tile while it is in L2.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BM)
    num_pid_n = tl.cdiv(N, BN)
    group = GROUP_M * num_pid_n
    first_m = (pid // group) * GROUP_M
    group_m = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % group_m
    pid_n = (pid % group) // group_m

    # SWAP_AB (small M on Hopper): compute the transposed tile acc[n, m] = sum_k w[n, k] a[m, k]. wgmma's
    # M side is 64 per warpgroup, so the weights take it and a small token count becomes wgmma's N (>= 8).
    if SWAP_AB:
        acc = tl.zeros((BN, BM), dtype=tl.int32)
    else:
        acc = tl.zeros((BM, BN), dtype=tl.int32)
    if USE_TMA:
        # a, w are tensor descriptors with blocks [BM, BK] and [BN, BK]; out-of-range reads are zeros.
        for k0 in range(0, K, BK):
            a_tile = a.load([pid_m * BM, k0])
            w_tile = w.load([pid_n * BN, k0])
            if SWAP_AB:
                acc = tl.dot(w_tile, a_tile.T, acc)
            else:
                acc = tl.dot(a_tile, w_tile.T, acc)
    else:
        # int64 row offsets: M * K may exceed 2**31.
        rows_a = ((pid_m * BM + tl.arange(0, BM)) % M).to(tl.int64)
        rows_w = ((pid_n * BN + tl.arange(0, BN)) % N).to(tl.int64)
        offs_k = tl.arange(0, BK)
        a_ptrs = a + rows_a[:, None] * K + offs_k[None, :]
        w_ptrs = w + rows_w[:, None] * K + offs_k[None, :]
        for k0 in range(0, K, BK):
            k_ok = offs_k[None, :] < K - k0
            a_tile = tl.load(a_ptrs, mask=k_ok, other=0)
            w_tile = tl.load(w_ptrs, mask=k_ok, other=0)
            if SWAP_AB:
                acc = tl.dot(w_tile, a_tile.T, acc)
            else:
                acc = tl.dot(a_tile, w_tile.T, acc)
            a_ptrs += BK
            w_ptrs += BK

    # Epilogue, in the reference's order: (a_scale * w_scale) first, then times the sum, then + bias.
    # With SWAP_AB everything is indexed [n, m] (the product of two scales is the same either way round).
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    m_ok = offs_m < M
    n_ok = offs_n < N
    w_s = tl.load(w_scale_ptr + offs_n, mask=n_ok, other=0.0)
    if A_PER_TOKEN:
        a_s = tl.load(a_scale_ptr + offs_m, mask=m_ok, other=0.0)
    else:
        a_s = tl.load(a_scale_ptr + offs_m * 0)
    if HAS_BIAS:
        b = tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    if SWAP_AB:
        out = acc.to(tl.float32) * (a_s[None, :] * w_s[:, None])
        if HAS_BIAS:
            out += b[:, None]
        y_ptrs = y_ptr + offs_m.to(tl.int64)[None, :] * N + offs_n[:, None]
        y_ok = m_ok[None, :] & n_ok[:, None]
    else:
        out = acc.to(tl.float32) * (a_s[:, None] * w_s[None, :])
        if HAS_BIAS:
            out += b[None, :]
        y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
        y_ok = m_ok[:, None] & n_ok[None, :]
    tl.store(y_ptrs, cast_rn(out, y_ptr.dtype.element_ty, INTERPRET), mask=y_ok)


def kernel_config(m: int, device) -> Dict:
    """The tile configuration the launcher uses for M rows on ``device`` (the one place it is chosen)."""
    table = config_table.load_table(KERNEL_NAME, config_table.arch_for_device(device))
    return config_table.pick(table, m)


def _aligned(*tensors) -> bool:
    return all(t.data_ptr() % 16 == 0 for t in tensors)


def gemm_w8a8(a: torch.Tensor, a_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
              bias: Optional[torch.Tensor] = None, out_dtype: torch.dtype = torch.bfloat16,
              out: Optional[torch.Tensor] = None, config: Optional[Dict] = None) -> torch.Tensor:
    """``y = (a_scale * w_scale) * (a @ w.T) + bias`` as ``out_dtype`` [M, N].

    a int8 [M, K], w int8 [N, K] (both contiguous, K a multiple of 16), a_scale float32 [1] or [M],
    w_scale float32 [N], bias float [N] or None. ``out``: optional contiguous [M, N] tensor of
    ``out_dtype`` to write into. ``config``: a tile entry overriding the table (tests, benchmarks).
    """
    for name, t in (("a", a), ("w", w)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.int8 or t.dim() != 2:
            raise TypeError(f"{name} must be a 2-D int8 tensor")
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous (call .contiguous() first)")
    m, k = a.shape
    n = w.shape[0]
    if w.shape[1] != k:
        raise ValueError(f"a is [M, K] = {tuple(a.shape)} but w is {tuple(w.shape)}: w must be [N, K]")
    if k % 16:
        raise ValueError(f"K = {k} must be a multiple of 16: rows must start 16-byte aligned for the "
                         f"kernel's vector loads (pad K with zero columns)")
    if a_scale.dtype != torch.float32 or a_scale.dim() != 1 or a_scale.numel() not in (1, m):
        raise ValueError(f"a_scale must be float32 [1] or [M] = [{m}], got {a_scale.dtype} {tuple(a_scale.shape)}")
    if w_scale.dtype != torch.float32 or w_scale.shape != (n,):
        raise ValueError(f"w_scale must be float32 [N] = [{n}], got {w_scale.dtype} {tuple(w_scale.shape)}")
    if bias is not None and (bias.shape != (n,) or not bias.is_floating_point()):
        raise ValueError(f"bias must be a float [N] = [{n}] tensor, got {bias.dtype} {tuple(bias.shape)}")
    if out_dtype not in _OUT_DTYPES:
        raise TypeError(f"out_dtype must be float16, bfloat16 or float32, got {out_dtype}")
    for name, t in (("a_scale", a_scale), ("w", w), ("w_scale", w_scale), ("bias", bias), ("out", out)):
        if t is not None and t.device != a.device:
            raise ValueError(f"{name} is on {t.device} but a is on {a.device}")
    check_device(a)
    if out is None:
        out = torch.empty((m, n), dtype=out_dtype, device=a.device)
    elif out.dtype != out_dtype or out.shape != (m, n) or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {out_dtype} [{m}, {n}] tensor")
    if m == 0 or n == 0:
        return out
    if k == 0:
        return out.copy_(torch.zeros_like(out) if bias is None else bias.to(out_dtype).expand(m, n))

    cfg = dict(config) if config is not None else kernel_config(m, a.device)
    bm, bn, bk = cfg["BM"], cfg["BN"], cfg["BK"]
    use_tma = bool(cfg.get("tma", False)) and _aligned(a, w)
    if use_tma:
        from triton.tools.tensor_descriptor import TensorDescriptor

        a_arg = TensorDescriptor.from_tensor(a, [bm, bk])
        w_arg = TensorDescriptor.from_tensor(w, [bn, bk])
    else:
        a_arg, w_arg = a, w
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    w8a8_kernel[grid](a_arg, w_arg, out, a_scale, w_scale, bias if bias is not None else w_scale, m, n, k,
                      A_PER_TOKEN=a_scale.numel() != 1, HAS_BIAS=bias is not None,
                      USE_TMA=use_tma, SWAP_AB=bool(cfg.get("swap_ab", False)), BM=bm, BN=bn, BK=bk, GROUP_M=cfg.get("GROUP_M", 8),
                      INTERPRET=interpreting(),
                      num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out


def reference(a, a_scale, w, w_scale, bias=None, out_dtype=torch.float32):
    """The maths this kernel computes (``ditq.quant.reference``)."""
    from ditq.quant import reference as ref

    return ref.gemm_w8a8(a, a_scale, w, w_scale, bias, out_dtype)


def aot_job(config: Dict, cc: int, out_dtype: str = "bf16", per_token: bool = True, bias: bool = True,
            aligned: bool = True) -> Dict:
    """Arguments of ``aot.compile_kernel`` for one table entry, as the launcher would run it on a GPU of
    compute capability ``cc``: aligned pointers and K % 16 == 0 (``aligned=False`` drops those hints, the
    case the launcher refuses, to show what they buy)."""
    tma = bool(config.get("tma", False))
    bm, bn, bk = config["BM"], config["BN"], config["BK"]
    sig = {"a": f"tensordesc<i8[{bm}, {bk}]>" if tma else "*i8",
           "w": f"tensordesc<i8[{bn}, {bk}]>" if tma else "*i8",
           "y_ptr": f"*{out_dtype}", "a_scale_ptr": "*fp32", "w_scale_ptr": "*fp32", "bias_ptr": "*fp32",
           "M": "i32", "N": "i32", "K": "i32"}
    constexprs = dict(A_PER_TOKEN=per_token, HAS_BIAS=bias, USE_TMA=tma, SWAP_AB=bool(config.get("swap_ab")),
                      BM=bm, BN=bn, BK=bk, GROUP_M=config.get("GROUP_M", 8), INTERPRET=False)
    hints = ["y_ptr", "a_scale_ptr", "w_scale_ptr", "bias_ptr", "K"] + ([] if tma else ["a", "w"])
    return dict(fn=w8a8_kernel, signature=sig, constexprs=constexprs, cc=cc, num_warps=config["num_warps"],
                num_stages=config["num_stages"], aligned=hints if aligned else [])
