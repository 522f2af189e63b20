"""The poisoned-lanes fixture (tests/kernels/conftest.py) cannot silently stop working: kernels that read
masked-off lanes without ``other=`` fail under it and pass without it.

Mutants are the shipped kernel modules with one spelled-out edit (``other=`` removed from the masked loads
of a K tail), written to a temporary file and imported, so Triton can read their source as it does ours.
A single removal is not always a bug: in an integer dot, a garbage lane times a zero-filled lane of the
other operand is still 0, so the W8A8 and W4A8 mutants drop ``other=`` from both operands of the tail."""
import importlib.util
import os

import pytest
import torch
import triton
import triton.language as tl

import ditq.kernels
from ditq import testing
from ditq.format import int_scales_to_kernel
from ditq.kernels import interpret
from ditq.quant import reference as ref

pytestmark = pytest.mark.skipif(not interpret.interpreting(), reason="masked lanes are zero only in the interpreter")
KERNELS = os.path.dirname(ditq.kernels.__file__)


def _mutant(tmp_path, module: str, *edits):
    """``ditq.kernels.<module>`` with each ``(old, new, count)`` edit applied (``old`` must occur ``count``
    times), imported from a file under ``tmp_path``."""
    src = open(os.path.join(KERNELS, module + ".py")).read()
    for old, new, count in edits:
        assert src.count(old) == count, f"the mutation site {old!r} moved: update this probe"
        src = src.replace(old, new)
    src = src.replace("from . import", "from ditq.kernels import")
    src = src.replace("from .interpret import", "from ditq.kernels.interpret import")
    path = tmp_path / f"mutant_{module}.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location(f"mutant_{module}_{abs(hash(str(tmp_path)))}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _fails_only_when_poisoned(switch, check):
    with pytest.raises(AssertionError):
        check()
    switch.enabled = False
    check()  # the interpreter's zeros: the mutant passes, which is why the fixture exists


@triton.jit
def _copy_masked(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=offs < n))  # no other=: lanes n.. are undefined


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int32, torch.int8,
                                   torch.uint8])
def test_poison_reaches_masked_lanes(poison_masked_loads, dtype):
    x = torch.arange(1, 6).to(dtype)
    out = torch.zeros(8, dtype=dtype)
    _copy_masked[(1,)](x, out, 5, BLOCK=8)
    assert torch.equal(out[:5], x)
    if dtype.is_floating_point:
        assert torch.isnan(out[5:]).all(), out
    else:  # every byte 0x80
        assert (out[5:].view(torch.uint8) == 0x80).all(), out
    poison_masked_loads.enabled = False
    _copy_masked[(1,)](x, out, 5, BLOCK=8)
    assert (out[5:] == 0).all()  # the interpreter's own zeros


def test_w8a8_k_tail_mutant(tmp_path, poison_masked_loads):
    mod = _mutant(tmp_path, "w8a8", (", mask=k_ok, other=0)", ", mask=k_ok)", 2))
    g = torch.Generator().manual_seed(0)
    m, n, k = 7, 17, 48  # K = 48 with BK = 32: the second step's last 16 lanes are masked
    a, w = testing.random_int8(m, k, generator=g), testing.random_int8(n, k, generator=g)
    a_s, w_s = torch.rand(m, generator=g) + 0.01, torch.rand(n, generator=g) + 0.01
    cfg = dict(BM=16, BN=16, BK=32, GROUP_M=2, SWAP_AB=False, USE_TMA=False, num_warps=1, num_stages=1)

    def check():
        y = mod.gemm_w8a8(a, a_s, w, w_s, None, torch.float32, config=cfg)
        testing.assert_gemm_w8a8(y, a, a_s, w, w_s)

    _fails_only_when_poisoned(poison_masked_loads, check)


def test_quantize_act_row_tail_mutant(tmp_path, poison_masked_loads):
    mod = _mutant(tmp_path, "quantize_act", ("mask=mask, other=0.0)", "mask=mask)", 1))
    x = torch.randn(3, 300, generator=torch.Generator().manual_seed(1))  # BLOCK_K = 512: 212 masked lanes

    def check():
        q, s = mod.quantize_act(x)
        rq, rs = ref.quantize_per_token(x)
        assert torch.equal(q, rq) and torch.equal(s, rs), (s, rs)

    _fails_only_when_poisoned(poison_masked_loads, check)


@pytest.mark.parametrize("int_scales", [False, True], ids=["float_scales", "int_scales"])
def test_w4a8_group32_tail_mutant(tmp_path, poison_masked_loads, int_scales):
    # the tail's activation tiles and the pure-Triton unpack's weight words (what the interpreter runs), shared by
    # the float- and the integer-group-scale paths
    mod = _mutant(tmp_path, "w4a8", (", mask=valid[None, :], other=0)", ", mask=valid[None, :])", 2),
                  ("mask=(offs_w < N_VALID // 4)[None, :], other=0)", "mask=(offs_w < N_VALID // 4)[None, :])", 1))
    g = torch.Generator().manual_seed(2)
    m, n, k, gs = 5, 9, 96, 32  # K / 32 odd: the last 32 k are the masked tail step
    a, q = testing.random_int8(m, k, generator=g), testing.random_int4(n, k, generator=g)
    s, a_s = torch.rand(k // gs, n, generator=g) + 0.01, torch.rand(m, generator=g) + 0.01
    kernel_s = s
    if int_scales:  # q in [1, 16] times a channel scale: the launcher's int32 form
        qs, c = torch.randint(1, 17, (k // gs, n), generator=g, dtype=torch.int32), torch.rand(n, generator=g) + 0.01
        s, kernel_s = qs.float() * c[None, :], int_scales_to_kernel(qs, c)
    w = mod.pack_weight(ref.pack_int4(q), gs)
    cfg = dict(BM=16, BN=16, BK=64, GROUP_M=2, SWAP_AB=False, UNPACK_ASM=False, num_warps=1, num_stages=1)

    def check():
        y = mod.gemm_w4a8(a, a_s, w, kernel_s, None, gs, torch.float32, config=cfg)
        testing.assert_gemm_w4a8(y, a, a_s, q, s, gs, None)

    _fails_only_when_poisoned(poison_masked_loads, check)
