"""Split-K in the Triton GEMMs (kernels/split_k.py): the count, and split launches against the unsplit kernel.

W8A8 partials are int32, so a split result must equal the unsplit one bit for bit; W4A8 partials are fp32 added
in split order, so a split result must match the exact reference to fp32 rounding and give the same bits on
every run. Every output is poisoned before the call and every workspace is poisoned when allocated (NaN, or
0x80808080 for int32): the reduce must read only what the splits wrote. Shapes are ragged (M = 1 and odd, N
odd, K a multiple of the group but not of BK), with k units of 3 or 4 so that S = 2 and S = 3 split unevenly.
"""
import pytest
import torch

from ditq import testing
from ditq.kernels import config_table, split_k, w4a8, w8a8
from ditq.quant import reference as ref

pytestmark = pytest.mark.gpu  # also run on the GPU by benchmarks/gpu_suite.sh: real concurrent splits
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Interpreter-sized tiles (BK = 32: K = 80 is 3 units, K = 112 is 4); pointer and TMA loads, both orientations.
W8_CFG = {
    "ptr": dict(BM=16, BN=16, BK=32, GROUP_M=2, SWAP_AB=False, USE_TMA=False, num_warps=1, num_stages=1),
    "ptr-swap": dict(BM=16, BN=32, BK=32, GROUP_M=2, SWAP_AB=True, USE_TMA=False, num_warps=1, num_stages=1),
    "tma": dict(BM=32, BN=16, BK=32, GROUP_M=2, SWAP_AB=False, USE_TMA=True, num_warps=1, num_stages=1),
}


def _w4_cfg(swap, bk=64):
    return dict(BM=16, BN=16, BK=bk, GROUP_M=2, SWAP_AB=swap, UNPACK_ASM=False, num_warps=4, num_stages=2)


@pytest.fixture
def workspaces(monkeypatch):
    """Poison every split-K workspace as it is allocated and record its shape: [(S, M, N), ...]."""
    seen = []
    alloc = split_k.workspace

    def poisoned(splits, m, n, dtype, device):
        ws = alloc(splits, m, n, dtype, device)
        ws.fill_(float("nan") if dtype.is_floating_point else -0x7F7F7F80)  # 0x80808080 as int32
        seen.append((splits, m, n))
        return ws

    monkeypatch.setattr(split_k, "workspace", poisoned)
    return seen


def _poisoned(m, n, dtype):
    return torch.full((m, n), -128 if dtype == torch.int8 else float("nan"), dtype=dtype, device=DEVICE)


def _w8_inputs(m, n, k, seed, per_token=True):
    g = torch.Generator().manual_seed(seed)
    a, w = testing.random_int8(m, k, generator=g), testing.random_int8(n, k, generator=g)
    a_s = (torch.rand(m if per_token else 1, generator=g) + 0.05) / 127
    w_s = (torch.rand(n, generator=g) + 0.05) / 127
    b = torch.randn(n, generator=g)
    return [t.to(DEVICE) for t in (a, a_s, w, w_s, b)]


def _w4_inputs(m, n, k, g_size, seed):
    a, q, s, a_s, b = testing.random_w4a8_case(m, n, k, g_size, seed)
    w = w4a8.pack_weight(ref.pack_int4(q), g_size)
    return a, q, s, a_s, b, [t.to(DEVICE) for t in (a, a_s, w, s, b)]


# ---- the count ----------------------------------------------------------------------------------------------

def test_auto_splits_follows_the_cuda_rule():
    # the CUDA backend's sm90_auto_schedule cases under a wave: a third of a wave -> 3, a full wave -> none, capped
    # by the units
    got = [split_k.auto_splits(t, u, 132) for t, u in ((36, 9), (108, 9), (144, 36), (9, 36), (9, 2), (1, 99))]
    assert got == [3, 1, 1, 14, 2, split_k.MAX_SPLITS]
    assert split_k.auto_splits(36, 0, 132) == 1  # K = 0: no unit to split
    assert split_k.sm_count("cpu") == split_k.INTERPRETER_SM_COUNT == 132


def test_auto_splits_takes_the_cap():
    """A table entry's max_splits caps the automatic count (None: MAX_SPLITS, today's rule unchanged)."""
    assert [split_k.auto_splits(36, 9, 132, c) for c in (None, 16, 4, 3, 2, 1)] == [3, 3, 3, 3, 2, 1]
    assert [split_k.auto_splits(1, 99, 132, c) for c in (None, 8, 1)] == [split_k.MAX_SPLITS, 8, 1]
    assert split_k.auto_splits(200, 9, 132, 4) == 1  # past a wave: no split, whatever the cap
    for bad, err in ((0, ValueError), (-2, ValueError), (True, TypeError), (2.0, TypeError), ("3", TypeError)):
        with pytest.raises(err, match="max_splits must be an int >= 1"):
            split_k.auto_splits(36, 9, 132, bad)


@pytest.mark.parametrize("bits", (8, 4), ids=("w8a8", "w4a8"))
def test_launchers_read_the_entry_cap(bits, workspaces):
    """The launchers pass the tile entry's max_splits to the automatic count: a 2-tile grid of 4 k units that
    splits 4 ways uncapped (132 SMs counted) splits 2 ways at cap 2 and not at all at cap 1; a forced count
    ignores the cap; the results are the unsplit ones (W8 bit for bit, W4 to fp32 rounding); a bad cap in a
    config is refused like a bad table entry."""
    m, n = 3, 31
    if bits == 8:
        k, cfg = 112, dict(W8_CFG["ptr"])  # 4 units of BK = 32; 1 x 2 tiles of 16 x 16
        a, a_s, w, w_s, b = _w8_inputs(m, n, k, seed=21)
        run = lambda c, s=None: w8a8.gemm_w8a8(a, a_s, w, w_s, b, torch.float32,  # noqa: E731
                                               out=_poisoned(m, n, torch.float32), config=c, splits=s)
        count = lambda c: w8a8.auto_split_count(w8a8.fit_config(c), m, n, k, 132)  # noqa: E731
    else:
        k, cfg = 256, _w4_cfg(False)  # 4 pack blocks of G = 64
        a0, q, s4, a_s0, b0, (a, a_s, w, s_, b) = _w4_inputs(m, n, k, 64, seed=21)
        run = lambda c, s=None: w4a8.gemm_w4a8(a, a_s, w, s_, b, 64, torch.float32,  # noqa: E731
                                               out=_poisoned(m, n, torch.float32), config=c, splits=s)
        count = lambda c: w4a8.auto_split_count(w4a8.fit_config(c, 64), m, n, k, 64, 132)  # noqa: E731
    assert [count(dict(cfg, **({} if c is None else {"max_splits": c}))) for c in (None, 2, 1)] == [4, 2, 1]
    ys = [run(dict(cfg, max_splits=2)), run(dict(cfg, max_splits=1)), run(dict(cfg, max_splits=1), 3)]
    if DEVICE == "cpu":  # the interpreter counts 132 SMs: the cap is what limits the count
        assert workspaces == [(2, m, n), (3, m, n)]
    if bits == 8:
        testing.assert_gemm_w8a8(ys[1], a, a_s, w, w_s, b)
        assert torch.equal(ys[0], ys[1]) and torch.equal(ys[2], ys[1])
    else:
        for y in ys:
            testing.assert_gemm_w4a8(y, a0, a_s0, q, s4, 64, b0)
    for bad, err in ((0, ValueError), (False, TypeError), (1.5, TypeError)):
        with pytest.raises(err, match=f"w{bits}a8 max_splits must be an int >= 1"):
            run(dict(cfg, max_splits=bad))


# DiT-XL/2 at batch 1 with guidance (M = 512 tokens x 2), hidden 1152, MLP 4608; adaLN at M = 2 (the two
# conditionings' rows) into 6 x 1152 modulation columns.
DIT = [("attn-out", 512, 1152, 1152, 3), ("fc2", 512, 1152, 4608, 3), ("qkv", 512, 3456, 1152, 1),
       ("fc1", 512, 4608, 1152, 1), ("adaln", 2, 6912, 1152, 2)]


@pytest.mark.parametrize("name,m,n,k,want", DIT, ids=[d[0] for d in DIT])
def test_dit_batch1_split_counts_on_hopper(name, m, n, k, want):
    """The sm90 tables' tiles on 132 SMs: fc2 and attention out (36 tiles of 128 x 128) split 3 ways."""
    cfg8 = w8a8.fit_config(config_table.params(config_table.pick(config_table.load_table("w8a8", "sm90"), m)))
    cfg4 = w4a8.fit_config(config_table.params(config_table.pick(config_table.load_table("w4a8", "sm90"), m)), 128)
    assert w8a8.auto_split_count(cfg8, m, n, k, 132) == want
    assert w4a8.auto_split_count(cfg4, m, n, k, 128, 132) == want


@pytest.mark.parametrize("bits", (8, 4), ids=("w8a8", "w4a8"))
def test_forced_counts_outside_the_k_units_are_refused(bits):
    m, n, k = 3, 17, 96  # W8: 3 units of BK = 32; W4 at G = 32: 2 pack blocks (64 k)
    if bits == 8:
        a, a_s, w, w_s, b = _w8_inputs(m, n, k, seed=1)
        run = lambda s: w8a8.gemm_w8a8(a, a_s, w, w_s, b, torch.float32, config=W8_CFG["ptr"], splits=s)  # noqa
        units = 3
    else:
        *_, (a, a_s, w, s_, b) = _w4_inputs(m, n, k, 32, seed=1)
        run = lambda s: w4a8.gemm_w4a8(a, a_s, w, s_, b, 32, torch.float32, config=_w4_cfg(False), splits=s)  # noqa
        units = 2
    for bad in (0, -1, units + 1):
        with pytest.raises(ValueError, match=rf"split-K count must be in \[1, {units}\].*got {bad}"):
            run(bad)
    for bad in (True, 2.0, "2"):
        with pytest.raises(TypeError, match="splits must be an int or None"):
            run(bad)


# ---- W8A8: bit for bit ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", W8_CFG)
def test_w8a8_split_equals_unsplit_bit_for_bit(name, workspaces):
    for i, (m, n, k) in enumerate(((1, 17, 80), (37, 19, 112))):
        a, a_s, w, w_s, b = _w8_inputs(m, n, k, seed=i + len(name), per_token=i == 0)
        bias = b if i == 0 else None
        dtype = (torch.bfloat16, torch.float32)[i]
        ys = []
        for s in (1, 2, 3):
            out = _poisoned(m, n, dtype)
            ys.append(w8a8.gemm_w8a8(a, a_s, w, w_s, bias, dtype, out=out, config=W8_CFG[name], splits=s))
        testing.assert_gemm_w8a8(ys[0], a, a_s, w, w_s, bias)
        assert torch.equal(ys[1], ys[0]) and torch.equal(ys[2], ys[0])
    assert workspaces == [(2, 1, 17), (3, 1, 17), (2, 37, 19), (3, 37, 19)]  # S = 1 allocates none


def test_automatic_count_splits_a_small_grid(workspaces):
    """Under the interpreter the launcher counts 132 SMs, as on an H100: a 2-tile grid with 3 k units splits 3
    ways (the table's interpreter tile, 16 x 16 x 32), and the result is the unsplit one."""
    a, a_s, w, w_s, b = _w8_inputs(1, 17, 80, seed=5)
    want = w8a8.gemm_w8a8(a, a_s, w, w_s, b, torch.float32, splits=1)
    cfg = w8a8.kernel_config(1, a.device)
    auto = w8a8.auto_split_count(cfg, 1, 17, 80, split_k.sm_count(a.device))
    assert not workspaces and auto == (3 if DEVICE == "cpu" else auto)
    y = w8a8.gemm_w8a8(a, a_s, w, w_s, b, torch.float32, out=_poisoned(1, 17, torch.float32))
    assert torch.equal(y, want) and workspaces == ([(auto, 1, 17)] if auto > 1 else [])


FUSED = [("gate-residual", False, True, True, False, torch.bfloat16),
         ("gelu-quant", True, False, False, True, torch.float32),
         ("gelu", True, False, False, False, torch.float16)]


@pytest.mark.parametrize("combo", FUSED, ids=[c[0] for c in FUSED])
def test_w8a8_fused_epilogue_runs_once_on_the_split_sum(combo, workspaces):
    """The reduce runs the epilogue once on the whole int32 sum: every fused piece gives the unsplit bits
    (a piece applied per split, or twice, would not)."""
    name, gelu, gated, with_res, quant, dtype = combo
    m, n, k, rows = 21, 19, 112, 7
    a, a_s, w, w_s, b = _w8_inputs(m, n, k, seed=len(name))
    g = torch.Generator().manual_seed(7)
    gate = (torch.randn(m // rows, n, generator=g) * 2).to(torch.bfloat16).to(DEVICE) if gated else None
    res = torch.randn(m, n, generator=g).to(dtype).to(DEVICE) if with_res else None
    out_scale = torch.tensor([0.01], device=DEVICE) if quant else None
    out_dtype = torch.int8 if quant else dtype
    ys = [w8a8.gemm_w8a8_fused(a, a_s / 4, w, w_s, b, gelu, gate, res, rows, out_scale, dtype,
                               out=_poisoned(m, n, out_dtype), config=W8_CFG["ptr-swap"], splits=s) for s in (1, 3)]
    assert torch.equal(ys[0], ys[1]), name
    assert ys[0].float().abs().amax() > 0 and workspaces == [(3, m, n)]


# ---- W4A8: fp32 partials in split order -----------------------------------------------------------------------

# (G, K, BK, M, N): G = 32 with K = 160 (2 pack blocks and the masked tail block: 3 units, the tail alone in the
# last split at S = 3); G = 128 with K = 384 (3 groups, one pack block each) at M = 1
W4_CASES = [(32, 160, 64, 21, 33), (128, 384, 128, 1, 17)]


@pytest.mark.parametrize("swap", (False, True), ids=("plain-tile", "swapped-tile"))
@pytest.mark.parametrize("g,k,bk,m,n", W4_CASES, ids=[f"g{c[0]}" for c in W4_CASES])
def test_w4a8_split_matches_the_reference_and_repeats(g, k, bk, m, n, swap, workspaces):
    a, q, s, a_s, b, (da, da_s, dw, ds, db) = _w4_inputs(m, n, k, g, seed=g + swap)
    dtype = torch.bfloat16 if swap else torch.float32
    runs = {splits: w4a8.gemm_w4a8(da, da_s, dw, ds, db, g, dtype, out=_poisoned(m, n, dtype),
                                   config=_w4_cfg(swap, bk), splits=splits) for splits in (2, 3)}
    for splits, y in runs.items():
        testing.assert_gemm_w4a8(y, a, a_s, q, s, g, b, what=f"w4a8 G={g} {m}x{n}x{k} S={splits}")
    again = w4a8.gemm_w4a8(da, da_s, dw, ds, db, g, dtype, out=_poisoned(m, n, dtype), config=_w4_cfg(swap, bk),
                           splits=3)
    assert torch.equal(again, runs[3]), "a split launch must give the same bits every time"
    assert workspaces == [(2, m, n), (3, m, n), (3, m, n)]


@pytest.mark.parametrize("combo", FUSED[:2], ids=[c[0] for c in FUSED[:2]])
def test_w4a8_fused_epilogue_runs_once_on_the_split_sum(combo, workspaces):
    """The fused split result is the reference epilogue applied to the plain split result (the same fp32 sum,
    scale and bias): bit for bit without GELU under the interpreter, to GELU's tolerance otherwise."""
    name, gelu, gated, with_res, quant, dtype = combo
    m, n, k, rows, g = 21, 19, 160, 7, 32
    *_, (a, a_s, w, s, b) = _w4_inputs(m, n, k, g, seed=len(name))
    gen = torch.Generator().manual_seed(3)
    gate = (torch.randn(m // rows, n, generator=gen) * 2).to(torch.bfloat16).to(DEVICE) if gated else None
    res = torch.randn(m, n, generator=gen).to(dtype).to(DEVICE) if with_res else None
    out_scale = torch.tensor([0.05], device=DEVICE) if quant else None
    cfg = _w4_cfg(True)
    y = w4a8.gemm_w4a8_fused(a, a_s, w, s, b, g, gelu, gate, res, rows, out_scale, dtype,
                             out=_poisoned(m, n, torch.int8 if quant else dtype), config=cfg, splits=3)
    plain = w4a8.gemm_w4a8(a, a_s, w, s, b, g, torch.float32, out=_poisoned(m, n, torch.float32), config=cfg,
                           splits=3)
    want = ref.gemm_epilogue(plain.cpu(), gelu, None if gate is None else gate.cpu(),
                             None if res is None else res.cpu(), rows, None if out_scale is None else out_scale.cpu(),
                             dtype)
    if gelu:  # tanh's last bits differ between NumPy / libdevice and torch (test_gemm_epilogue.py)
        assert int((y.cpu().int() - want.int()).abs().max()) <= 1 and int(y.ne(0).sum()) > m * n // 2
    else:
        assert torch.equal(y.cpu(), want)
    assert workspaces == [(3, m, n), (3, m, n)]


@pytest.mark.parametrize("bits", (8, 4), ids=("w8a8", "w4a8"))
def test_float_a_quantized_on_load_splits_too(bits, workspaces):
    """A float A with a static scale (quantized as each split loads its k range): W8A8 gives the unsplit bits,
    W4A8 the unsplit result to fp32 rounding, the same bits on every run."""
    m, n = 5, 19
    gen = torch.Generator().manual_seed(11)
    a_f = (torch.randn(m, 160, generator=gen) * 3).to(torch.bfloat16).to(DEVICE)
    a_s = torch.tensor([0.05], device=DEVICE)
    if bits == 8:
        _, _, w, w_s, b = _w8_inputs(m, n, 160, seed=12)
        run = lambda s: w8a8.gemm_w8a8_fused(a_f, a_s, w, w_s, b, False, None, None, 1, None, torch.float32,  # noqa
                                             out=_poisoned(m, n, torch.float32), config=W8_CFG["ptr"], splits=s)
    else:
        *_, (_, _, w, s4, b) = _w4_inputs(m, n, 160, 32, seed=12)
        run = lambda s: w4a8.gemm_w4a8_fused(a_f, a_s, w, s4, b, 32, False, None, None, 1, None,  # noqa
                                             torch.float32, out=_poisoned(m, n, torch.float32),
                                             config=_w4_cfg(False), splits=s)
    one, three, again = run(1), run(3), run(3)
    assert torch.equal(three, again) and one.abs().amax() > 0
    if bits == 8:
        assert torch.equal(three, one)
    else:
        torch.testing.assert_close(three, one, rtol=1e-5, atol=1e-5 * float(one.abs().amax()))
    assert workspaces == [(3, m, n), (3, m, n)]
