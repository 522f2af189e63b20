"""W8A8 GEMM: int8 activations [M, K] x int8 weights [N, K] -> int32 on the tensor cores, fused epilogue.

``y[m, n] = (a_scale[m] * w_scale[n]) * sum_k a[m, k] w[n, k] + bias[n]``, cast to bf16 / fp16 / fp32.
``a_scale`` is one static scalar [1] or one per token [M]. The int32 accumulation is exact, so
the result differs from the exact product only by the fp32 epilogue's rounding (``ditq.testing``).
:func:`gemm_w8a8_fused` runs the same kernel with the pieces of :mod:`.epilogue` switched on (GELU, gate,
residual, int8 output); with none, its code is the plain GEMM's.

Loads (from a SASS study of triton 3.8):

* ``USE_TMA`` (Hopper): host-made tensor descriptors, so the copy engine (``UTMALDG``) fetches the A and W
  tiles and zero-fills whatever lies past M, N or K: no masks in the loop at all.
* pointers (Ampere, and anywhere TMA cannot be used): ``K % 16 == 0`` is required, so every row starts
  16-byte aligned and Triton's divisibility specialisation of ``K`` gives 16-byte ``cp.async`` loads
  (``LDGSTS.E.BYPASS.128``). Without it a row may start anywhere and the loads degrade to single bytes
  (``LDG.E.U8``; see the negative control in tests/kernels/test_aot_w8a8.py). Rows past M / N are
  wrapped (``% M``) rather than masked, so only the K tail needs a mask, and that mask is constant over
  runs of 16 bytes (K and k0 are multiples of 16), which keeps the loads vectorised.

* float A (``A_FLOAT``, the fused GEMM given a float ``a`` and a static scale): pointer loads of the float
  tile, never TMA, since each tile is quantized in registers (``quantize_act.quantize_scaled``, quantize_act's
  own rounding, with ``1 / s`` computed once per program) before the same int8 dot; ``other=0.0`` in the K
  tail quantizes to 0. Measured for the adaLN case (M <= 16 entries, bf16 A; tests/kernels/test_aot_float_a.py):
  sm90 64 registers, loop 278 instructions (83 for the int8 TMA twin), the same 8 IGMMA; no spills.

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

from . import checks, config_table, epilogue, quantize_act
from .interpret import check_device, interpreting

KERNEL_NAME = "w8a8"
K_MULTIPLE = 16  # 16-byte aligned rows: Triton's divisibility specialisation of K gives 16-byte loads
MAX_K = 16384  # int32 accumulation is exact up to here: 127 * 128 * 16384 < 2**31
LAYOUT = "int8_nk"  # the canonical int8 weight [N, K], row-major, used as it is
LAYOUT_VERSION = 1
# Keys of a tile table entry (configs/w8a8_<arch>.json): tile sizes, launch grouping, swapped operands
# (weights on the dot's M side, for small M on Hopper), Hopper tensor descriptors, and the launch options.
CONFIG_KEYS = ("BM", "BN", "BK", "GROUP_M", "SWAP_AB", "USE_TMA", "num_warps", "num_stages")


@triton.jit
def w8a8_kernel(a_ptr, a_scale_ptr, w_ptr, w_scale_ptr, bias_ptr, out_ptr, M, N, K,
                gate_ptr, res_ptr, out_scale_ptr, rows_per_gate,
                PER_TOKEN: tl.constexpr, HAS_BIAS: tl.constexpr,
                BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
                SWAP_AB: tl.constexpr, USE_TMA: tl.constexpr, INTERPRET: tl.constexpr,
                HAS_GELU: tl.constexpr = False, HAS_GATE: tl.constexpr = False,
                HAS_RESIDUAL: tl.constexpr = False, QUANT_OUT: tl.constexpr = False, A_FLOAT: tl.constexpr = False):
    # Arguments in the launcher's (the runtime op's) order: a, a_scale, w, w_scale, bias, then the output;
    # then the fused epilogue's (epilogue.store_tile; unused, and compiled out, while its flags are off).
    # With USE_TMA, a_ptr and w_ptr are tensor descriptors rather than pointers.
    # A_FLOAT: a_ptr points to float A (fp16 / bf16 / fp32, never a descriptor) with a static a_scale; each A
    # tile is quantized in registers exactly as quantize_act does, then the same int8 dot. Off, nothing of it
    # is compiled.
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
        # a_ptr, w_ptr are tensor descriptors with blocks [BM, BK] and [BN, BK]; out-of-range reads are zeros.
        for k0 in range(0, K, BK):
            a_tile = a_ptr.load([pid_m * BM, k0])
            w_tile = w_ptr.load([pid_n * BN, k0])
            if SWAP_AB:
                acc = tl.dot(w_tile, a_tile.T, acc)
            else:
                acc = tl.dot(a_tile, w_tile.T, acc)
    else:
        # int64 row offsets: M * K may exceed 2**31.
        rows_a = ((pid_m * BM + tl.arange(0, BM)) % M).to(tl.int64)
        rows_w = ((pid_n * BN + tl.arange(0, BN)) % N).to(tl.int64)
        offs_k = tl.arange(0, BK)
        a_ptrs = a_ptr + rows_a[:, None] * K + offs_k[None, :]
        w_ptrs = w_ptr + rows_w[:, None] * K + offs_k[None, :]
        if A_FLOAT:
            inv = quantize_act.inverse_scale(tl.load(a_scale_ptr))  # the static scale, read once, outside the loop
        for k0 in range(0, K, BK):
            k_ok = offs_k[None, :] < K - k0
            # other=0: the K tail's lanes enter the dot. One zero operand would do (an undefined int8 times 0
            # is 0), but both are explicit; tests/kernels/conftest.py poisons lanes loaded without other=.
            if A_FLOAT:  # 0.0 quantizes to 0: the tail stays zero after quantize_act's rounding
                a_f = tl.load(a_ptrs, mask=k_ok, other=0.0).to(tl.float32)
                a_tile = quantize_act.quantize_scaled(a_f, inv, INTERPRET)
            else:
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
    if PER_TOKEN:
        a_s = tl.load(a_scale_ptr + offs_m, mask=m_ok, other=0.0)
    else:
        a_s = tl.load(a_scale_ptr + offs_m * 0)
    if HAS_BIAS:
        b = tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    if SWAP_AB:
        out = acc.to(tl.float32) * (a_s[None, :] * w_s[:, None])
        if HAS_BIAS:
            out += b[:, None]
    else:
        out = acc.to(tl.float32) * (a_s[:, None] * w_s[None, :])
        if HAS_BIAS:
            out += b[None, :]
    # the fused pieces (none for the plain GEMM: then a rounding cast and a masked store) and the store
    epilogue.store_tile(out, offs_m, offs_n, M, N, out_ptr, N, gate_ptr, res_ptr, out_scale_ptr, rows_per_gate,
                        HAS_GELU, HAS_GATE, HAS_RESIDUAL, QUANT_OUT, SWAP_AB, INTERPRET)


def kernel_config(m: int, device) -> Dict:
    """The tile configuration the launcher uses for M rows on ``device`` (the one place it is chosen)."""
    table = config_table.load_table(KERNEL_NAME, config_table.arch_for_device(device))
    return fit_config(config_table.params(config_table.pick(table, m)))


def fit_config(cfg: Dict) -> Dict:
    """A table entry (or a caller's override) checked for the keys the launcher reads."""
    cfg = checks.config_keys(KERNEL_NAME, cfg, CONFIG_KEYS)
    for key in ("BM", "BN", "BK"):
        v = cfg[key]
        if not isinstance(v, int) or v < 16 or v & (v - 1):
            raise ValueError(f"w8a8 {key} must be a power of two >= 16 (tl.dot's smallest tile), got {v!r}")
    return cfg


def describe() -> Dict:
    """What this kernel family takes, from the constants and tables the launcher itself reads."""
    archs = config_table.table_archs(KERNEL_NAME)
    return {"weight_bits": 8, "group_sizes": None, "k_multiple": K_MULTIPLE, "max_k": MAX_K,
            "layout": LAYOUT, "layout_version": LAYOUT_VERSION, "archs": config_table.gpu_ccs(archs),
            "interpreter": "interpreter" in archs}


def _aligned(*tensors) -> bool:
    return all(t.data_ptr() % 16 == 0 for t in tensors)


def _check_gemm(a, a_scale, w, w_scale, bias, out_dtype, a_dtypes=(torch.int8,)):
    """The GEMM's own arguments; returns (M, N, K). The fused GEMM also takes a float ``a`` (``a_dtypes``)."""
    checks.tensor("a", a, a_dtypes, dim=2)
    m, k = a.shape
    checks.tensor("w", w, (torch.int8,), shape=(None, k), labels=("N", "K"))
    n = w.shape[0]
    checks.k_dim(k, K_MULTIPLE, MAX_K, "rows must start 16-byte aligned for the kernel's vector loads "
                                       "(pad K with zero columns)")
    checks.tensor("a_scale", a_scale, (torch.float32,), dim=1)
    if a_scale.numel() not in (1, m):
        raise ValueError(f"a_scale must be float32 [1] or [M] = [{m}], got {tuple(a_scale.shape)}")
    checks.tensor("w_scale", w_scale, (torch.float32,), shape=(n,), labels=("N",))
    if bias is not None:
        checks.tensor("bias", bias, checks.FLOAT_DTYPES, shape=(n,), labels=("N",))
    checks.out_dtype(out_dtype)
    checks.static_scale_for_float_a(a, a_scale)
    return m, n, k


def gemm_w8a8(a: torch.Tensor, a_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
              bias: Optional[torch.Tensor] = None, out_dtype: torch.dtype = torch.bfloat16,
              out: Optional[torch.Tensor] = None, config: Optional[Dict] = None) -> torch.Tensor:
    """``y = (a_scale * w_scale) * (a @ w.T) + bias`` as ``out_dtype`` [M, N].

    a int8 [M, K], w int8 [N, K] (K a multiple of 16, at most 16384), a_scale float32 [1] or [M],
    w_scale float32 [N], bias float16 / bfloat16 / float32 [N] or None, every tensor contiguous and on one
    device. ``out``: optional contiguous [M, N] tensor of ``out_dtype`` to write into. ``config``: a tile
    entry overriding the table (tests, benchmarks). Anything else raises ValueError / TypeError.
    """
    m, n, k = _check_gemm(a, a_scale, w, w_scale, bias, out_dtype)
    checks.same_device("a", a, a_scale=a_scale, w=w, w_scale=w_scale, bias=bias, out=out)
    check_device(a)
    if out is None:
        out = torch.empty((m, n), dtype=out_dtype, device=a.device)
    else:
        checks.tensor("out", out, (out_dtype,), shape=(m, n), labels=("M", "N"))
    if m == 0 or n == 0:
        return out
    if k == 0:
        return out.copy_(torch.zeros_like(out) if bias is None else bias.to(out_dtype).expand(m, n))
    return _launch(a, a_scale, w, w_scale, bias, out, m, n, k, config)


def gemm_w8a8_fused(a: torch.Tensor, a_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
                    bias: Optional[torch.Tensor], gelu: bool, gate: Optional[torch.Tensor],
                    residual: Optional[torch.Tensor], rows_per_gate: int, out_scale: Optional[torch.Tensor],
                    out_dtype: torch.dtype, out: Optional[torch.Tensor] = None,
                    config: Optional[Dict] = None) -> torch.Tensor:
    """:func:`gemm_w8a8` with the fused epilogue of :mod:`.epilogue` (the contract of
    ``ditq.quant.reference.gemm_epilogue``): ``gelu``, ``gate`` [M // rows_per_gate, N], ``residual`` [M, N]
    of ``out_dtype``, and ``out_scale`` float32 [1] for an int8 output (``out_dtype`` then names only the
    residual's dtype). ``a`` may also be float16 / bfloat16 / float32 with a static ``a_scale`` [1]: the kernel
    then quantizes it as it loads it, exactly as ``quantize_act`` (``A_FLOAT``). Bad input raises ValueError /
    TypeError."""
    m, n, k = _check_gemm(a, a_scale, w, w_scale, bias, out_dtype, checks.FUSED_A_DTYPES)
    epilogue.check_args(a.device, m, n, gelu, gate, residual, rows_per_gate, out_scale, out_dtype)
    checks.same_device("a", a, a_scale=a_scale, w=w, w_scale=w_scale, bias=bias, out=out)
    check_device(a)
    out = epilogue.out_tensor(out, m, n, out_dtype, out_scale, a.device)
    if m == 0 or n == 0:
        return out
    # K = 0 runs the kernel too: its loop is then empty and the epilogue sees acc = 0 (pointer loads only)
    return _launch(a, a_scale, w, w_scale, bias, out, m, n, k, config, gelu, gate, residual, rows_per_gate,
                   out_scale)


def _launch(a, a_scale, w, w_scale, bias, out, m, n, k, config, gelu=False, gate=None, residual=None,
            rows_per_gate=1, out_scale=None):
    cfg = fit_config(config) if config is not None else kernel_config(m, a.device)
    bm, bn, bk = cfg["BM"], cfg["BN"], cfg["BK"]
    a_float = a.dtype != torch.int8
    use_tma = bool(cfg["USE_TMA"]) and _aligned(a, w) and k > 0 and not a_float  # a float A: pointer loads
    if use_tma:
        from triton.tools.tensor_descriptor import TensorDescriptor

        a_arg = TensorDescriptor.from_tensor(a, [bm, bk])
        w_arg = TensorDescriptor.from_tensor(w, [bn, bk])
    else:
        a_arg, w_arg = a, w
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    unused = w_scale  # a valid pointer for the arguments a constexpr flag switches off
    w8a8_kernel[grid](a_arg, a_scale, w_arg, w_scale, bias if bias is not None else unused, out, m, n, k,
                      gate if gate is not None else unused, residual if residual is not None else unused,
                      out_scale if out_scale is not None else unused, rows_per_gate,
                      PER_TOKEN=a_scale.numel() != 1, HAS_BIAS=bias is not None,
                      BM=bm, BN=bn, BK=bk, GROUP_M=cfg["GROUP_M"], SWAP_AB=bool(cfg["SWAP_AB"]),
                      USE_TMA=use_tma, INTERPRET=interpreting(),
                      HAS_GELU=gelu, HAS_GATE=gate is not None, HAS_RESIDUAL=residual is not None,
                      QUANT_OUT=out_scale is not None, A_FLOAT=a_float,
                      num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out


def aot_job(config: Dict, cc: int, *, out_dtype: str = "bf16", per_token: bool = True, bias: bool = True,
            aligned: bool = True, fused: str = "", n_aligned: Optional[bool] = None, a_float: str = "") -> Dict:
    """Arguments of ``aot.compile_kernel`` for one table entry, as the launcher would run it on a GPU of
    compute capability ``cc``: aligned pointers and K % 16 == 0 (``aligned=False`` drops those hints, the
    case the launcher refuses, to show what they buy). ``fused``: the epilogue's pieces, "+"-separated names
    from ``epilogue.PIECES`` (e.g. ``"gelu+quant"``; "" = the plain GEMM), with a bf16 gate and a residual of
    the output dtype. ``n_aligned`` (default: when fused) adds N % 16 == 0, as DiT widths are, which the
    epilogue's gate and residual loads need to be wide. ``a_float`` (e.g. ``"bf16"``): a float A of that type,
    quantized on load (``A_FLOAT``) with its static scale (a float A never has per-token scales), with pointer
    loads as the launcher then uses even where the entry says TMA."""
    cfg = fit_config(config)
    tma = bool(cfg["USE_TMA"]) and not a_float
    bm, bn, bk = cfg["BM"], cfg["BN"], cfg["BK"]
    flags = epilogue.flags(fused)
    sig = {"a_ptr": f"tensordesc<i8[{bm}, {bk}]>" if tma else f"*{a_float or 'i8'}", "a_scale_ptr": "*fp32",
           "w_ptr": f"tensordesc<i8[{bn}, {bk}]>" if tma else "*i8", "w_scale_ptr": "*fp32",
           "bias_ptr": "*fp32", "out_ptr": "*i8" if flags["QUANT_OUT"] else f"*{out_dtype}",
           "M": "i32", "N": "i32", "K": "i32", "gate_ptr": "*bf16", "res_ptr": f"*{out_dtype}",
           "out_scale_ptr": "*fp32", "rows_per_gate": "i32"}
    constexprs = dict(PER_TOKEN=per_token and not a_float, HAS_BIAS=bias, BM=bm, BN=bn, BK=bk, GROUP_M=cfg["GROUP_M"],
                      SWAP_AB=bool(cfg["SWAP_AB"]), USE_TMA=tma, INTERPRET=False, A_FLOAT=bool(a_float), **flags)
    hints = ["a_scale_ptr", "w_scale_ptr", "bias_ptr", "out_ptr", "K", "gate_ptr", "res_ptr", "out_scale_ptr"]
    hints += ["N"] if (bool(fused) if n_aligned is None else n_aligned) else []
    hints += [] if tma else ["a_ptr", "w_ptr"]
    return dict(fn=w8a8_kernel, signature=sig, constexprs=constexprs, cc=cc, num_warps=cfg["num_warps"],
                num_stages=cfg["num_stages"], aligned=hints if aligned else [])
