"""benchmarks/static_report.py's model of what the CUDA backend runs on sm_90: the Hopper tiles and split-K count
read from csrc/configs/gemm_tiles_sm90.h (the roofline rows are only as right as this reading)."""
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import static_report  # noqa: E402


def test_hopper_tiles_and_rules_are_read_from_the_header():
    tiles, rules = static_report.sm90_tiles()
    text = open(os.path.join(ROOT, "csrc", "configs", "gemm_tiles_sm90.h")).read()
    # as many entries as X(...) lines in each list, in list order; every rule names a listed tile or -1
    for name, macro in (("w8", "DITQ_GEMM_SM90_W8_TILES"), ("w4", "DITQ_GEMM_SM90_W4_TILES")):
        body = text.split(f"#define {macro}(X)", 1)[1].split("\n\n", 1)[0]
        assert len(tiles[name]) == len(re.findall(r"X\(\d+,", body)) > 0, name
        assert all(len(t) == 4 and t[0] % 8 == 0 and t[1] % 16 == 0 for t in tiles[name])
    assert rules and rules[-1][0] == -1 and all(-1 <= r[1] < len(tiles["w8"]) and -1 <= r[2] < len(tiles["w4"])
                                                for r in rules)


def test_auto_splits_follows_the_documented_rule():
    # the header's static_assert cases: a third of a wave -> 3 splits, a full wave -> none, capped by the k units
    got = [static_report.sm90_auto_splits(c, u, 132) for c, u in ((36, 9), (108, 9), (144, 36), (9, 36), (9, 2))]
    assert got == [3, 1, 1, 14, 2]


def test_roofline_splits_the_batch_one_hopper_tile():
    """DiT-XL/2 at batch 1 (M = 512), fc2 (N = 1152): 36 tiles of 128 x 128, split 3 ways: 108 CTAs."""
    rows = [r for r in static_report.roofline_rows([], short=True)
            if r["shape"] == "DiT-XL/2 mlp fc2" and r["M"] == 512 and r["impl"].startswith("cuda wgmma")]
    assert {r["impl"] for r in rows} == {"cuda wgmma w8a8", f"cuda wgmma w4a8 g{static_report.W4_GROUP}"}
    for r in rows:
        assert r["tile"] == "128x128x128 split 3" and r["ctas"] == 108, r
        assert abs(r["sm_utilization"] - 108 / 132) < 1e-9


def test_roofline_splits_the_batch_one_triton_tile():
    """The Triton rows carry their launcher's automatic split-K count (kernels/split_k.py): at M = 512, fc2's 36
    tiles of the sm90 tables' 128 x 128 entry split 3 ways, 108 programs, the bound the CUDA rows reach."""
    rows = [r for r in static_report.roofline_rows([], short=True)
            if r["shape"] == "DiT-XL/2 mlp fc2" and r["M"] == 512 and r["impl"].startswith(("triton", "cuda wgmma"))]
    triton = {r["impl"].split(" ", 1)[1]: r for r in rows if r["impl"].startswith("triton")}
    cuda = {r["impl"].split(" ", 2)[2]: r for r in rows if r["impl"].startswith("cuda wgmma")}
    assert set(triton) == {"w8a8", f"w4a8 g{static_report.W4_GROUP}"} == set(cuda)
    for impl, r in triton.items():
        assert r["tile"] == "128x128x128 split 3" and r["ctas"] == 108, r
        assert abs(r["bound_us"] - cuda[impl]["bound_us"]) < 1e-9 and r["ideal_speedup_vs_bf16"] > 1.5, r
