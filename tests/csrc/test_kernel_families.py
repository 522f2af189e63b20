"""torch.ops.ditq_C.kernel_families(): each CUDA kernel family describes itself once (csrc/configs/
kernel_families.h), and the description is what the kernels actually accept: every listed W4 group size runs
exactly under the emulator, an unlisted one is refused with a ValueError, and the K limits are enforced."""
import json
import os
import re

import pytest
import torch

from ditq.backends import cuda_backend

pytestmark = pytest.mark.skipif(not cuda_backend.built(), reason="ditq._C is not built")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def families():
    return json.loads(torch.ops.ditq_C.kernel_families())


def test_json_shape_and_keys():
    f = families()
    assert set(f) == {"quantize_act", "gemm_w8a8", "gemm_w4a8", "gemm_w4a8i", "norm_quantize"}
    assert set(f["quantize_act"]) == set(f["norm_quantize"]) == {"k_multiple", "max_k", "built_archs", "emulated"}
    gemm_keys = {"weight_bits", "group_sizes", "k_multiple", "max_k", "layout", "layout_version", "min_arch",
                 "built_archs", "emulated"}
    assert set(f["gemm_w8a8"]) == gemm_keys and set(f["gemm_w4a8"]) == gemm_keys
    assert f["gemm_w8a8"]["weight_bits"] == 8 and f["gemm_w8a8"]["group_sizes"] is None
    assert f["gemm_w4a8"]["weight_bits"] == 4
    for fam in ("gemm_w8a8", "gemm_w4a8"):
        assert f[fam]["k_multiple"] == 16 and f[fam]["max_k"] == 32768 and f[fam]["min_arch"] == 80
        assert f[fam]["layout_version"] == 1 and f[fam]["emulated"] is True
    assert f["gemm_w8a8"]["layout"] != f["gemm_w4a8"]["layout"]
    # integer group scales: the W4 family's description plus the largest q and the Hopper-only note
    assert set(f["gemm_w4a8i"]) == gemm_keys | {"max_int_group_scale", "archs_needed"}
    assert {k: v for k, v in f["gemm_w4a8i"].items() if k in gemm_keys} == f["gemm_w4a8"]
    assert f["gemm_w4a8i"]["archs_needed"] == [90]
    from ditq.quant.reference import MAX_INT_GROUP_SCALE
    assert f["gemm_w4a8i"]["max_int_group_scale"] == MAX_INT_GROUP_SCALE == 16
    assert f["quantize_act"]["k_multiple"] == 1


def test_group_sizes_come_from_the_one_list():
    """The JSON lists exactly the X-macro's entries (parsed from the header, independently of the op)."""
    text = open(os.path.join(ROOT, "csrc", "configs", "kernel_families.h")).read()
    line = re.search(r"#define DITQ_W4_GROUP_SIZES\(X\)(.*)", text).group(1)
    assert families()["gemm_w4a8"]["group_sizes"] == [int(g) for g in re.findall(r"X\((\d+)\)", line)]


def test_built_archs_match_the_build():
    f = families()
    archs = f["gemm_w8a8"]["built_archs"]
    assert archs == f["gemm_w4a8"]["built_archs"] == f["quantize_act"]["built_archs"] == \
        f["norm_quantize"]["built_archs"]
    if torch.ops.ditq_C.built_with_cuda():
        assert archs and all(a >= f["gemm_w8a8"]["min_arch"] for a in archs), archs
    else:
        assert archs == []


def _w4_problem(m, n, k, group, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8)
    q = torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8)
    scales = (torch.rand(k // group, n, generator=g) * 0.05 + 1e-3).float()
    a_scale = (torch.rand(m, generator=g) * 0.02 + 1e-3).float()
    return a, a_scale, q, scales


def _w4_direct(a, a_scale, q, scales, group):
    from ditq.backends import cuda_layout
    from ditq.quant import reference as ref

    w = cuda_layout.w4_canonical_to_kernel(ref.pack_int4(q))
    return torch.ops.ditq_C.gemm_w4a8(a, a_scale, w, scales, None, group, torch.float32, -1, 1)


def test_every_listed_group_size_runs_exactly():
    from ditq.emulator import emulator_options
    from ditq.testing import assert_gemm_w4a8

    for group in families()["gemm_w4a8"]["group_sizes"]:
        k = 3 * group  # 96 and 192 are not multiples of the tiles' BK (64, 128)
        a, sa, q, ss = _w4_problem(3, 9, k, group, seed=group)
        with emulator_options(race_check=True):
            y = _w4_direct(a, sa, q, ss, group)
        assert_gemm_w4a8(y, a, sa, q, ss, group, None, what=f"group {group}")


@pytest.mark.parametrize("group", [16, 48, 512, 0, -32])
def test_unlisted_group_size_is_refused(group):
    if group in families()["gemm_w4a8"]["group_sizes"]:
        pytest.skip(f"group {group} is built")
    k = 1024
    a = torch.zeros(2, k, dtype=torch.int8)
    w = torch.zeros(8, k // 2, dtype=torch.uint8)
    scales = torch.ones(max(k // abs(group or 1), 1), 8)
    listed = ", ".join(str(g) for g in families()["gemm_w4a8"]["group_sizes"])
    with pytest.raises(ValueError, match=f"group_size must be one of {listed} "):
        torch.ops.ditq_C.gemm_w4a8(a, torch.ones(1), w, scales, None, group, torch.float32, -1, 1)


def test_k_limits_are_the_described_ones():
    f = families()["gemm_w8a8"]
    w, sw = torch.ones(4, f["max_k"] + f["k_multiple"], dtype=torch.int8), torch.ones(4)
    a = torch.ones(1, f["max_k"] + f["k_multiple"], dtype=torch.int8)
    with pytest.raises(ValueError, match=f"exceeds {f['max_k']}"):
        torch.ops.ditq_C.gemm_w8a8(a, torch.ones(1), w, sw, None, torch.float32, -1, 1)
    k = f["k_multiple"] * 3 + 8  # not a multiple
    with pytest.raises(ValueError, match=f"positive multiple of {f['k_multiple']}"):
        torch.ops.ditq_C.gemm_w8a8(torch.ones(1, k, dtype=torch.int8), torch.ones(1),
                                   torch.ones(4, k, dtype=torch.int8), sw, None, torch.float32, -1, 1)
