"""pack_weight / unpack_weight: the canonical int4 layout <-> the W4A8 kernel's split-nibble blocks."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from ditq import testing
from ditq.kernels import w4a8
from ditq.quant import reference as ref


def _expected_layout(q: torch.Tensor, g: int) -> torch.Tensor:
    """The documented layout, element by element (an independent, slow spelling of pack_weight): in each
    block of PB = max(G, 64) k (a short last block when K % PB != 0), byte j = k j (low) | k j + len/2 (high)."""
    n, k = q.shape
    pb = max(g, 64)
    out = torch.zeros(n, k // 2, dtype=torch.uint8)
    start = 0
    while start < k:
        length = min(pb, k - start)
        for j in range(length // 2):
            for row in range(n):
                lo = int(q[row, start + j]) & 0xF
                hi = int(q[row, start + length // 2 + j]) & 0xF
                out[row, start // 2 + j] = lo | (hi << 4)
        start += length
    return out


@pytest.mark.parametrize("g, k", [(32, 64), (32, 96), (32, 160), (64, 192), (128, 256), (256, 512)])
def test_layout_is_the_documented_one(g, k):
    q = testing.random_int4(3, k, generator=torch.Generator().manual_seed(k + g))
    w = w4a8.pack_weight(ref.pack_int4(q), g)
    assert w.dtype == torch.uint8 and w.shape == (3, k // 2) and w.is_contiguous()
    assert torch.equal(w, _expected_layout(q, g))


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 9), groups=st.integers(1, 7), g=st.sampled_from([32, 64, 128, 256]),
       seed=st.integers(0, 2**31 - 1))
def test_round_trip_is_exact(n, groups, g, seed):
    k = groups * g
    canon = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    w = w4a8.pack_weight(canon, g)
    assert torch.equal(w4a8.unpack_weight(w, g), canon)
    # a permutation of nibbles: the same multiset of int4 values
    assert torch.equal(torch.sort(ref.unpack_int4(w).flatten())[0], torch.sort(ref.unpack_int4(canon).flatten())[0])


def test_every_byte_value_survives():
    canon = torch.arange(256, dtype=torch.uint8).reshape(1, 256).repeat(2, 1)  # K = 512, all nibble pairs
    for g in (32, 64, 128, 256):
        assert torch.equal(w4a8.unpack_weight(w4a8.pack_weight(canon, g), g), canon)
        assert not torch.equal(w4a8.pack_weight(canon, g), canon)


def test_errors():
    canon = torch.zeros(4, 48, dtype=torch.uint8)  # K = 96
    with pytest.raises(ValueError, match="does not divide"):
        w4a8.pack_weight(canon, 64)
    with pytest.raises(ValueError, match="group_size must be one of"):
        w4a8.pack_weight(canon, 16)
    with pytest.raises(TypeError, match="uint8"):
        w4a8.pack_weight(canon.to(torch.int8), 32)
    with pytest.raises(TypeError, match="uint8"):
        w4a8.unpack_weight(canon.flatten(), 32)
