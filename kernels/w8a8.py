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
Every int8 dot names ``out_dtype=tl.int32``: Triton before 3.8 asserts that the accumulator's dtype is
``out_dtype``, which defaults to float32 (tests/kernels/test_triton_versions.py).

The tile configuration comes from ``configs/w8a8_<arch>.json`` by M bucket (``config_table``); CPU tensors
run under the interpreter with the small tiles of ``w8a8_interpreter.json``.

Grid: one program per output tile, or, when the tiles fill less than a wave of SMs (DiT-XL/2 at batch 1 with
guidance, M = 512: fc2 and attention out are 36 tiles of 128 x 128 on 132 SMs), ``S`` programs per tile that
each sum whole BK steps of K (``SPLIT_K``, grid axis 1) into an int32 workspace, then
:func:`w8a8_reduce_kernel` adds them and runs the same epilogue (:func:`_epilogue`). int32 sums are exact, so
every split count gives the unsplit bits. The count, the design and why: :mod:`.split_k`. Measured (AOT, the
128 x 128 entry, bf16 out; S = 1 compiles exactly as without split-K): sm90 split kernel 90 registers, loop 85
instructions (84 unsplit), the same 4 IGMMA, no spills; sm80 144 registers, loop 145 (143), the same 64 IMMA;
the reduce 128-152 registers, 146 with gate + residual, 16-byte loads, no spills
(tests/kernels/test_aot_split_k.py).
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import triton
import triton.language as tl

from . import checks, config_table, epilogue, quantize_act, split_k
from .interpret import check_device, interpreting, on_input_device

KERNEL_NAME = "w8a8"
K_MULTIPLE = 16  # 16-byte aligned rows: Triton's divisibility specialisation of K gives 16-byte loads
# The project-wide K bound (ditq.quant.reference.MAX_K, csrc's kMaxK), a contract kept with headroom, not
# where exactness ends: every int8 product is at most 128 * 128 = 2**14 in magnitude, so one int32 sum is
# exact for any K < 2**17 (here 127 * 128 * 32768 < 2**29). Nothing else in this kernel limits K.
MAX_K = 32768
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
                HAS_RESIDUAL: tl.constexpr = False, QUANT_OUT: tl.constexpr = False, A_FLOAT: tl.constexpr = False,
                SPLIT_K: tl.constexpr = False):
    # Arguments in the launcher's (the runtime op's) order: a, a_scale, w, w_scale, bias, then the output;
    # then the fused epilogue's (epilogue.store_tile; unused, and compiled out, while its flags are off).
    # With USE_TMA, a_ptr and w_ptr are tensor descriptors rather than pointers.
    # A_FLOAT: a_ptr points to float A (fp16 / bf16 / fp32, never a descriptor) with a static a_scale; each A
    # tile is quantized in registers exactly as quantize_act does, then the same int8 dot. Off, nothing of it
    # is compiled.
    # SPLIT_K (split_k.py): grid axis 1 is the split; this program sums only its split's BK steps and stores the
    # raw int32 tile to out_ptr, the workspace [S, M, N]; w8a8_reduce_kernel adds the splits and runs the
    # epilogue. Off, nothing of it is compiled.
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
    if SPLIT_K:  # whole BK steps: the split's first and last k are multiples of BK (or K itself)
        unit_lo, unit_hi = split_k.k_range(tl.cdiv(K, BK), tl.num_programs(1))
        k_lo = unit_lo * BK
        k_hi = tl.minimum(unit_hi * BK, K)
    else:
        k_lo = 0
        k_hi = K
    if USE_TMA:
        # a_ptr, w_ptr are tensor descriptors with blocks [BM, BK] and [BN, BK]; out-of-range reads are zeros.
        for k0 in range(k_lo, k_hi, BK):
            a_tile = a_ptr.load([pid_m * BM, k0])
            w_tile = w_ptr.load([pid_n * BN, k0])
            if SWAP_AB:
                acc = tl.dot(w_tile, a_tile.T, acc, out_dtype=tl.int32)
            else:
                acc = tl.dot(a_tile, w_tile.T, acc, out_dtype=tl.int32)
    else:
        # int64 row offsets: M * K may exceed 2**31.
        rows_a = ((pid_m * BM + tl.arange(0, BM)) % M).to(tl.int64)
        rows_w = ((pid_n * BN + tl.arange(0, BN)) % N).to(tl.int64)
        offs_k = tl.arange(0, BK)
        a_ptrs = a_ptr + rows_a[:, None] * K + offs_k[None, :]
        w_ptrs = w_ptr + rows_w[:, None] * K + offs_k[None, :]
        if SPLIT_K:
            a_ptrs += k_lo
            w_ptrs += k_lo
        if A_FLOAT:
            inv = quantize_act.inverse_scale(tl.load(a_scale_ptr))  # the static scale, read once, outside the loop
        for k0 in range(k_lo, k_hi, BK):
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
                acc = tl.dot(w_tile, a_tile.T, acc, out_dtype=tl.int32)
            else:
                acc = tl.dot(a_tile, w_tile.T, acc, out_dtype=tl.int32)
            a_ptrs += BK
            w_ptrs += BK

    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    if SPLIT_K:
        split_k.store_partial(acc, out_ptr, offs_m, offs_n, M, N, SWAP_AB)
    else:
        _epilogue(acc, offs_m, offs_n, a_scale_ptr, w_scale_ptr, bias_ptr, out_ptr, M, N,
                  gate_ptr, res_ptr, out_scale_ptr, rows_per_gate, PER_TOKEN, HAS_BIAS, SWAP_AB, INTERPRET,
                  HAS_GELU, HAS_GATE, HAS_RESIDUAL, QUANT_OUT)


@triton.jit
def _epilogue(acc, offs_m, offs_n, a_scale_ptr, w_scale_ptr, bias_ptr, out_ptr, M, N,
              gate_ptr, res_ptr, out_scale_ptr, rows_per_gate, PER_TOKEN: tl.constexpr, HAS_BIAS: tl.constexpr,
              SWAP_AB: tl.constexpr, INTERPRET: tl.constexpr, HAS_GELU: tl.constexpr, HAS_GATE: tl.constexpr,
              HAS_RESIDUAL: tl.constexpr, QUANT_OUT: tl.constexpr):
    """The int32 tile ``acc`` (the whole K sum) scaled, biased, through the fused pieces and stored: the end of
    the unsplit kernel and of the split-K reduce, one code path."""
    # Epilogue, in the reference's order: (a_scale * w_scale) first, then times the sum, then + bias.
    # Compiled, the last product and the bias add contract into one fma (the PTX has fma.rn.f32 and no
    # add.f32), as the CUDA kernels' scale_bias does on purpose; interpreted they round twice, as the reference.
    # With SWAP_AB everything is indexed [n, m] (the product of two scales is the same either way round).
    m_ok = offs_m < M
    n_ok = offs_n < N
    w_s = tl.load(w_scale_ptr + offs_n, mask=n_ok, other=0.0)
    if PER_TOKEN:
        a_s = tl.load(a_scale_ptr + offs_m, mask=m_ok, other=0.0)
    else:
        a_s = tl.load(a_scale_ptr + offs_m * 0)  # the one static scale as a [BM] vector, as per token
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


@triton.jit
def w8a8_reduce_kernel(ws_ptr, S, a_scale_ptr, w_scale_ptr, bias_ptr, out_ptr, M, N,
                       gate_ptr, res_ptr, out_scale_ptr, rows_per_gate,
                       PER_TOKEN: tl.constexpr, HAS_BIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                       SWAP_AB: tl.constexpr, INTERPRET: tl.constexpr,
                       HAS_GELU: tl.constexpr = False, HAS_GATE: tl.constexpr = False,
                       HAS_RESIDUAL: tl.constexpr = False, QUANT_OUT: tl.constexpr = False):
    """Split-K's second launch: one program per output tile adds the S int32 partials of the workspace
    [S, M, N] (exact, so the result is the unsplit kernel's bit for bit) and runs the same epilogue."""
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(N, BN)
    offs_m = (pid // num_pid_n) * BM + tl.arange(0, BM)
    offs_n = (pid % num_pid_n) * BN + tl.arange(0, BN)
    acc = split_k.load_sum(ws_ptr, S, offs_m, offs_n, M, N, SWAP_AB)
    _epilogue(acc, offs_m, offs_n, a_scale_ptr, w_scale_ptr, bias_ptr, out_ptr, M, N,
              gate_ptr, res_ptr, out_scale_ptr, rows_per_gate, PER_TOKEN, HAS_BIAS, SWAP_AB, INTERPRET,
              HAS_GELU, HAS_GATE, HAS_RESIDUAL, QUANT_OUT)


def kernel_config(m: int, device) -> Dict:
    """The tile configuration the launcher uses for M rows on ``device`` (the one place it is chosen)."""
    table = config_table.load_table(KERNEL_NAME, config_table.arch_for_device(device))
    return fit_config(config_table.params(config_table.pick(table, m)))


def fit_config(cfg: Dict) -> Dict:
    """A table entry (or a caller's override) checked for the keys the launcher reads."""
    cfg = checks.config_keys(KERNEL_NAME, cfg, CONFIG_KEYS)
    if "max_splits" in cfg:  # optional: the bucket's cap on the automatic split-K count (split_k.py)
        split_k.check_max_splits(cfg["max_splits"], "w8a8 max_splits")
    for key in ("BM", "BN", "BK"):
        v = cfg[key]
        if not isinstance(v, int) or v < 16 or v & (v - 1):
            raise ValueError(f"w8a8 {key} must be a power of two >= 16 (tl.dot's smallest tile), got {v!r}")
    return cfg


def split_shape(cfg: Dict, m: int, n: int, k: int):
    """(output tiles, k units) of a launch with tile entry ``cfg``: what the split count is chosen from. A k
    unit is one BK step."""
    return triton.cdiv(m, cfg["BM"]) * triton.cdiv(n, cfg["BN"]), triton.cdiv(k, cfg["BK"])


def auto_split_count(cfg: Dict, m: int, n: int, k: int, sm_count: int) -> int:
    """The split-K count the launcher picks for this shape and tile on ``sm_count`` SMs (``split_k``)."""
    return split_k.auto_splits(*split_shape(cfg, m, n, k), sm_count, cfg.get("max_splits"))


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


@on_input_device
def gemm_w8a8(a: torch.Tensor, a_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
              bias: Optional[torch.Tensor] = None, out_dtype: torch.dtype = torch.bfloat16,
              out: Optional[torch.Tensor] = None, config: Optional[Dict] = None,
              splits: Optional[int] = None) -> torch.Tensor:
    """``y = (a_scale * w_scale) * (a @ w.T) + bias`` as ``out_dtype`` [M, N].

    a int8 [M, K], w int8 [N, K] (K a multiple of 16, at most MAX_K = 32768), a_scale float32 [1] or [M],
    w_scale float32 [N], bias float16 / bfloat16 / float32 [N] or None, every tensor contiguous and on one
    device. ``out``: optional contiguous [M, N] tensor of ``out_dtype`` to write into. ``config``: a tile
    entry overriding the table (tests, benchmarks). ``splits``: the split-K count, None = automatic
    (``split_k.auto_splits``, at most the entry's optional ``max_splits``), or forced in [1, cdiv(K, BK)]
    (tests, benchmarks); the result is the same bits whatever the count. Anything else raises ValueError /
    TypeError.
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
    return _launch(a, a_scale, w, w_scale, bias, out, m, n, k, config, splits)


@on_input_device
def gemm_w8a8_fused(a: torch.Tensor, a_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
                    bias: Optional[torch.Tensor], gelu: bool, gate: Optional[torch.Tensor],
                    residual: Optional[torch.Tensor], rows_per_gate: int, out_scale: Optional[torch.Tensor],
                    out_dtype: torch.dtype, out: Optional[torch.Tensor] = None,
                    config: Optional[Dict] = None, splits: Optional[int] = None) -> torch.Tensor:
    """:func:`gemm_w8a8` with the fused epilogue of :mod:`.epilogue` (the contract of
    ``ditq.quant.reference.gemm_epilogue``): ``gelu``, ``gate`` [M // rows_per_gate, N], ``residual`` [M, N]
    of ``out_dtype``, and ``out_scale`` float32 [1] for an int8 output (``out_dtype`` then names only the
    residual's dtype). ``a`` may also be float16 / bfloat16 / float32 with a static ``a_scale`` [1]: the kernel
    then quantizes it as it loads it, exactly as ``quantize_act`` (``A_FLOAT``). ``splits`` as in
    :func:`gemm_w8a8` (the epilogue runs once, on the whole sum). Bad input raises ValueError / TypeError."""
    m, n, k = _check_gemm(a, a_scale, w, w_scale, bias, out_dtype, checks.FUSED_A_DTYPES)
    epilogue.check_args(a.device, m, n, gelu, gate, residual, rows_per_gate, out_scale, out_dtype)
    checks.same_device("a", a, a_scale=a_scale, w=w, w_scale=w_scale, bias=bias, out=out)
    check_device(a)
    out = epilogue.out_tensor(out, m, n, out_dtype, out_scale, a.device)
    if m == 0 or n == 0:
        return out
    # K = 0 runs the kernel too: its loop is then empty and the epilogue sees acc = 0 (pointer loads only)
    return _launch(a, a_scale, w, w_scale, bias, out, m, n, k, config, splits, gelu, gate, residual,
                   rows_per_gate, out_scale)


def _launch(a, a_scale, w, w_scale, bias, out, m, n, k, config, splits=None, gelu=False, gate=None,
            residual=None, rows_per_gate=1, out_scale=None):
    cfg = fit_config(config) if config is not None else kernel_config(m, a.device)
    bm, bn, bk = cfg["BM"], cfg["BN"], cfg["BK"]
    tiles, units = split_shape(cfg, m, n, k)
    s = split_k.resolve(splits, tiles, units, m * n, a.device, KERNEL_NAME, cfg.get("max_splits"))
    a_float = a.dtype != torch.int8
    use_tma = bool(cfg["USE_TMA"]) and _aligned(a, w) and k > 0 and not a_float  # a float A: pointer loads
    if use_tma:
        from triton.tools.tensor_descriptor import TensorDescriptor

        a_arg = TensorDescriptor.from_tensor(a, [bm, bk])
        w_arg = TensorDescriptor.from_tensor(w, [bn, bk])
    else:
        a_arg, w_arg = a, w
    unused = w_scale  # a valid pointer for the arguments a constexpr flag switches off
    if s > 1:
        # the split launch stores raw int32 partials (no epilogue: its flags off, one compiled variant per
        # tile), the reduce launch adds them and runs the epilogue (split_k.py)
        ws = split_k.workspace(s, m, n, torch.int32, a.device)
        w8a8_kernel[(tiles, s)](a_arg, a_scale, w_arg, w_scale, unused, ws, m, n, k, unused, unused, unused, 1,
                                PER_TOKEN=False, HAS_BIAS=False, BM=bm, BN=bn, BK=bk, GROUP_M=cfg["GROUP_M"],
                                SWAP_AB=bool(cfg["SWAP_AB"]), USE_TMA=use_tma, INTERPRET=interpreting(),
                                A_FLOAT=a_float, SPLIT_K=True,
                                num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
        w8a8_reduce_kernel[(tiles,)](ws, s, a_scale, w_scale, bias if bias is not None else unused, out, m, n,
                                     gate if gate is not None else unused,
                                     residual if residual is not None else unused,
                                     out_scale if out_scale is not None else unused, rows_per_gate,
                                     PER_TOKEN=a_scale.numel() != 1, HAS_BIAS=bias is not None, BM=bm, BN=bn,
                                     SWAP_AB=bool(cfg["SWAP_AB"]), INTERPRET=interpreting(), HAS_GELU=gelu,
                                     HAS_GATE=gate is not None, HAS_RESIDUAL=residual is not None,
                                     QUANT_OUT=out_scale is not None, num_warps=cfg["num_warps"])
        return out
    grid = (tiles,)
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
            aligned: bool = True, fused: str = "", n_aligned: Optional[bool] = None, a_float: str = "",
            split: bool = False) -> Dict:
    """Arguments of ``aot.compile_kernel`` for one table entry, as the launcher would run it on a GPU of
    compute capability ``cc``: aligned pointers and K % 16 == 0 (``aligned=False`` drops those hints, the
    case the launcher refuses, to show what they buy). ``fused``: the epilogue's pieces, "+"-separated names
    from ``epilogue.PIECES`` (e.g. ``"gelu+quant"``; "" = the plain GEMM), with a bf16 gate and a residual of
    the output dtype. ``n_aligned`` (default: when fused or split) adds N % 16 == 0, as DiT widths are, which
    the epilogue's gate and residual loads (and the split partials' stores) need to be wide. ``a_float`` (e.g.
    ``"bf16"``): a float A of that type, quantized on load (``A_FLOAT``) with its static scale (a float A never
    has per-token scales), with pointer loads as the launcher then uses even where the entry says TMA.
    ``split``: the split-K launch (``SPLIT_K``: int32 partials to the workspace, no epilogue, so no ``fused``;
    its reduce is :func:`reduce_aot_job`)."""
    cfg = fit_config(config)
    if split and fused:
        raise ValueError("the split-K launch has no epilogue: its pieces belong to reduce_aot_job")
    tma = bool(cfg["USE_TMA"]) and not a_float
    bm, bn, bk = cfg["BM"], cfg["BN"], cfg["BK"]
    flags = epilogue.flags(fused)
    out = "*i32" if split else "*i8" if flags["QUANT_OUT"] else f"*{out_dtype}"
    sig = {"a_ptr": f"tensordesc<i8[{bm}, {bk}]>" if tma else f"*{a_float or 'i8'}", "a_scale_ptr": "*fp32",
           "w_ptr": f"tensordesc<i8[{bn}, {bk}]>" if tma else "*i8", "w_scale_ptr": "*fp32",
           "bias_ptr": "*fp32", "out_ptr": out,
           "M": "i32", "N": "i32", "K": "i32", "gate_ptr": "*bf16", "res_ptr": f"*{out_dtype}",
           "out_scale_ptr": "*fp32", "rows_per_gate": "i32"}
    constexprs = dict(PER_TOKEN=per_token and not a_float and not split, HAS_BIAS=bias and not split, BM=bm, BN=bn,
                      BK=bk, GROUP_M=cfg["GROUP_M"], SWAP_AB=bool(cfg["SWAP_AB"]), USE_TMA=tma, INTERPRET=False,
                      A_FLOAT=bool(a_float), **flags)
    constexprs["SPLIT_K"] = split  # AOT compiles take every constexpr, defaults included
    hints = ["a_scale_ptr", "w_scale_ptr", "bias_ptr", "out_ptr", "K", "gate_ptr", "res_ptr", "out_scale_ptr"]
    hints += ["N"] if (bool(fused) or split if n_aligned is None else n_aligned) else []
    hints += [] if tma else ["a_ptr", "w_ptr"]
    return dict(fn=w8a8_kernel, signature=sig, constexprs=constexprs, cc=cc, num_warps=cfg["num_warps"],
                num_stages=cfg["num_stages"], aligned=hints if aligned else [])


def reduce_aot_job(config: Dict, cc: int, *, out_dtype: str = "bf16", per_token: bool = True, bias: bool = True,
                   fused: str = "") -> Dict:
    """Arguments of ``aot.compile_kernel`` for the split-K reduce launch of one table entry (its tile and
    orientation), with the epilogue ``fused`` as in :func:`aot_job`, N % 16 == 0 as DiT widths are."""
    cfg = fit_config(config)
    flags = epilogue.flags(fused)
    sig = {"ws_ptr": "*i32", "S": "i32", "a_scale_ptr": "*fp32", "w_scale_ptr": "*fp32", "bias_ptr": "*fp32",
           "out_ptr": "*i8" if flags["QUANT_OUT"] else f"*{out_dtype}", "M": "i32", "N": "i32",
           "gate_ptr": "*bf16", "res_ptr": f"*{out_dtype}", "out_scale_ptr": "*fp32", "rows_per_gate": "i32"}
    constexprs = dict(PER_TOKEN=per_token, HAS_BIAS=bias, BM=cfg["BM"], BN=cfg["BN"], SWAP_AB=bool(cfg["SWAP_AB"]),
                      INTERPRET=False, **flags)
    hints = [k for k in sig if k.endswith("_ptr")] + ["N"]
    return dict(fn=w8a8_reduce_kernel, signature=sig, constexprs=constexprs, cc=cc, num_warps=cfg["num_warps"],
                num_stages=1, aligned=hints)
