"""The CUDA GEMMs' weight layout (ditq/backends/cuda_layout.py): exact round trips with the canonical format,
and the property the kernel relies on: the 4 bytes ldmatrix gives a lane, masked as the kernel masks them,
are that lane's m16n8k32 B fragment (PTX ISA fragment table) of 16 * w."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from ditq.backends import cuda_layout
from ditq.quant import reference as ref
from ditq.testing import random_int4


def _rand_w4(n, k, seed):
    g = torch.Generator().manual_seed(seed)
    q = random_int4(n, k, generator=g)
    return q, ref.pack_int4(q)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 40), chunks=st.integers(1, 12), seed=st.integers(0, 2**31 - 1))
def test_w4_round_trip_exact(n, chunks, seed):
    q, canon = _rand_w4(n, 32 * chunks, seed)
    kern = cuda_layout.w4_canonical_to_kernel(canon)
    assert kern.dtype == torch.uint8 and kern.shape == canon.shape and kern.is_contiguous()
    assert torch.equal(cuda_layout.w4_kernel_to_canonical(kern), canon)
    w, s = cuda_layout.prepare_weight(4, canon, torch.rand(chunks, n))
    assert torch.equal(cuda_layout.canonical_weight(4, w, s)[0], canon)


def test_w4_layout_is_split_nibble():
    n, k = 5, 96
    q, canon = _rand_w4(n, k, 1)
    kern = cuda_layout.w4_canonical_to_kernel(canon).to(torch.int32)
    for c in range(k // 32):
        for p in range(16):
            byte = kern[:, 16 * c + p]
            lo, hi = byte & 0xF, byte >> 4
            lo = lo - ((lo & 8) << 1)
            hi = hi - ((hi & 8) << 1)
            assert torch.equal(lo, q[:, 32 * c + p].to(torch.int32))
            assert torch.equal(hi, q[:, 32 * c + p + 16].to(torch.int32))
    # not the identity: the test above would pass on a layout that happens to equal the canonical one
    assert not torch.equal(kern.to(torch.uint8), canon)


def _as_int8_bytes(word: int):
    return [((word >> (8 * j)) & 0xFF) - (256 if (word >> (8 * j)) & 0x80 else 0) for j in range(4)]


def test_w4_kernel_unpack_gives_mma_b_fragments():
    """Per lane (g, t): ldmatrix gives bytes 4t..4t+3 of row g of the 8 x 16-byte chunk; the kernel's
    `(w << 4) & 0xF0F0F0F0` and `w & 0xF0F0F0F0` must equal b0..b3 and b4..b7 of the ISA fragment
    (k = 4t + (i & 3) + 16 * (i >= 4), n = g), times 16."""
    n, k = 8, 64
    q, canon = _rand_w4(n, k, 7)
    q[0, 0], q[1, 1] = -8, 7  # both ends of the int4 range
    canon = ref.pack_int4(q)
    kern = cuda_layout.w4_canonical_to_kernel(canon)
    for c in range(k // 32):
        for lane in range(32):
            g, t = lane >> 2, lane & 3
            row = kern[g, 16 * c:16 * c + 16].tolist()
            word = sum(row[4 * t + j] << (8 * j) for j in range(4))  # little-endian 32-bit register
            reg0 = _as_int8_bytes((word << 4) & 0xF0F0F0F0)
            reg1 = _as_int8_bytes(word & 0xF0F0F0F0)
            for i in range(8):
                kk = 32 * c + 4 * t + (i & 3) + (16 if i >= 4 else 0)
                got = (reg0 + reg1)[i]
                assert got == 16 * int(q[g, kk]), (c, lane, i)


def test_w8_is_canonical():
    w = torch.randint(-128, 128, (3, 48), dtype=torch.int8)
    s = torch.rand(3)
    pw, ps = cuda_layout.prepare_weight(8, w, s)
    assert torch.equal(pw, w) and torch.equal(ps, s)


def test_w4_layout_rejects_k_not_multiple_of_32():
    with pytest.raises(ValueError, match="K % 32"):
        cuda_layout.w4_canonical_to_kernel(torch.zeros(2, 8, dtype=torch.uint8))
    with pytest.raises(TypeError):
        cuda_layout.w4_canonical_to_kernel(torch.zeros(2, 16, dtype=torch.int8))
