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
    # the split cap column, as many rules as the array has rows
    body = text.split("kSm90TileRules[] = {", 1)[1].split("};", 1)[0]
    assert len(rules) == body.count("{") and all(len(r) == 4 and r[3] >= 1 for r in rules)


def test_auto_schedule_follows_the_documented_rule():
    # the header's static_assert cases: a third of a wave -> 3 uniform splits, a full wave -> none, capped by the
    # k units; one wave + 12 tiles -> the 12 split 9 ways (the k units); a tail of 68 > 132 / 2 -> none
    cases = ((36, 9), (108, 9), (144, 36), (144, 9), (9, 36), (9, 2), (264, 36), (200, 36), (6, 4))
    got = [static_report.sm90_auto_schedule(t, u, 132 if t != 6 else 4) for t, u in cases]
    assert got == [(0, 3), (108, 1), (132, 11), (132, 9), (0, 14), (0, 2), (264, 1), (200, 1), (4, 2)]


def test_capped_and_forced_schedules():
    """A cap (kSm90TileRules' max_splits) bounds the automatic count; a forced count splits the last wave."""
    assert static_report.sm90_auto_schedule(144, 9, 132, 3) == (132, 3)
    assert static_report.sm90_auto_schedule(36, 9, 132, 2) == (0, 2)
    assert static_report.sm90_auto_schedule(144, 9, 132, 1) == (144, 1)
    forced = [static_report.sm90_forced_schedule(t, s, 132) for t, s in
              ((144, 4), (36, 4), (132, 2), (264, 2), (200, 2), (144, 1))]
    assert forced == [(132, 4), (0, 4), (0, 2), (132, 2), (132, 2), (144, 1)]


def test_auto_schedule_matches_the_build():
    """The model is the build's schedule (when ditq._C is built), over a grid of cases: automatic (the default
    cap, and the cap of M's bucket read from the header) and forced."""
    import pytest
    import torch
    from ditq.backends import cuda_backend
    if not cuda_backend.built() or not hasattr(torch.ops.ditq_C, "gemm_sm90_max_splits"):
        pytest.skip("ditq._C with gemm_sm90_schedule(m, splits) is not built")
    op = torch.ops.ditq_C.gemm_sm90_schedule
    _, rules = static_report.sm90_tiles()
    for r in rules:  # the build's caps are the header's
        for m in ((r[0], 1) if r[0] > 0 else (1 << 20,)):
            want = next(q[3] for q in rules if q[0] < 0 or m <= q[0])
            assert torch.ops.ditq_C.gemm_sm90_max_splits(m) == want
    for sms in (4, 78, 114, 132):
        for tiles in (1, 3, 36, 100, 131, 132, 133, 144, 200, 264, 270, 300, 1000):
            for units in (1, 2, 9, 36):
                assert tuple(op(tiles, units, sms)) == static_report.sm90_auto_schedule(tiles, units, sms)
                assert tuple(op(tiles, units, sms, 512)) == static_report.sm90_auto_schedule(
                    tiles, units, sms, torch.ops.ditq_C.gemm_sm90_max_splits(512))
                for s in {1, 2, 3, units}:
                    if s <= units:
                        assert tuple(op(tiles, units, sms, -1, s)) == \
                            static_report.sm90_forced_schedule(tiles, s, sms), (tiles, units, sms, s)
    with pytest.raises(ValueError, match=r"forced split count must be in \[1, 9\]"):
        op(144, 9, 132, -1, 10)
    with pytest.raises(ValueError, match=r"forced split count must be in \[1, 9\]"):
        op(144, 9, 132, -1, 0)


def test_roofline_splits_the_tail_of_fc1():
    """DiT-XL/2 at batch 1 (M = 512), fc1 (N = 4608, K = 1152): 144 tiles of 128 x 128 = one wave of 132 whole
    tiles + 12 tails split 9 ways (240 CTAs): 1 + 1 / 9 tile times instead of 2 (55% of the SMs busy)."""
    rows = [r for r in static_report.roofline_rows([], short=True)
            if r["shape"] == "DiT-XL/2 mlp fc1" and r["M"] == 512 and r["impl"] == "cuda wgmma w8a8"]
    assert len(rows) == 1
    r = rows[0]
    assert r["tile"] == "128x128x128 132 whole + 12 split 9" and r["ctas"] == 240, r
    assert abs(r["sm_utilization"] - 144 / (132 * (1 + 1 / 9))) < 1e-9
    # the reduction: after its slice, each tail tile's last CTA stores its partial and reads the 9 back, 10 x 64 KB
    # on one SM; the bound is the tiles' bound plus that
    per_sm = static_report.L2_BYTES_PER_CLK_SM * static_report.SM_CLOCK_HZ
    assert abs(r["reduce_us"] - 10 * 128 * 128 * 4 / per_sm * 1e6) < 1e-9 and r["reduce_us"] > 5
    d = static_report.common.DATASHEET["H100-SXM"]
    unreduced = max(2 * 512 * 4608 * 1152 / (d["int8_ops"] * r["sm_utilization"]),
                    r["min_mb"] * 1e6 / d["hbm_bytes_s"]) * 1e6
    assert abs(r["bound_us"] - unreduced - r["reduce_us"]) < 1e-9
    # with that cost charged, the model bounds a smaller forced tail count lower than 9
    assert r["model_tail_splits"] < 9


def test_split_reduce_model():
    """The reduction's cost: none unsplit; (1 + S) partial tiles on one SM, Hopper's whole BM x BN and Triton's
    masked to M x N, and never under the chip-wide L2 time of all the partial bytes."""
    per_sm = static_report.L2_BYTES_PER_CLK_SM * static_report.SM_CLOCK_HZ
    f = static_report.split_reduce_us
    assert f("cuda wgmma", 128, 128, 512, 4608, 144, 144, 1, 132) == 0 == f("triton", 16, 128, 16, 1152, 9, 0, 1, 132)
    assert abs(f("cuda wgmma", 64, 128, 16, 1152, 9, 0, 14, 132) - 15 * 64 * 128 * 4 / per_sm * 1e6) < 1e-9
    assert abs(f("triton", 64, 128, 16, 1152, 9, 0, 14, 132) - 15 * 16 * 128 * 4 / per_sm * 1e6) < 1e-9
    many = f("triton", 128, 128, 16384, 1152, 1152, 0, 16, 132)  # far past a wave: L2-bound, in waves
    assert many >= 17 * 16384 * 1152 * 4 / static_report.L2_BYTES_S * 1e6
    assert f("cuda wgmma", 128, 128, 512, 1152, 36, 0, 3, 132) == f("triton", 128, 128, 512, 1152, 36, 0, 3, 132)


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
    tiles of the sm90 tables' 128 x 128 entry split 3 ways, 108 programs, the bound the CUDA rows reach (the same
    partial bytes: 4 x 64 KB per tile), under the unsplit launch's even with the reduction charged."""
    rows = [r for r in static_report.roofline_rows([], short=True)
            if r["shape"] == "DiT-XL/2 mlp fc2" and r["M"] == 512 and r["impl"].startswith(("triton", "cuda wgmma"))]
    triton = {r["impl"].split(" ", 1)[1]: r for r in rows if r["impl"].startswith("triton")}
    cuda = {r["impl"].split(" ", 2)[2]: r for r in rows if r["impl"].startswith("cuda wgmma")}
    assert set(triton) == {"w8a8", f"w4a8 g{static_report.W4_GROUP}"} == set(cuda)
    for impl, r in triton.items():
        assert r["tile"] == "128x128x128 split 3" and r["ctas"] == 108, r
        assert abs(r["bound_us"] - cuda[impl]["bound_us"]) < 1e-9 and r["reduce_us"] > 0, r
        d = static_report.common.DATASHEET["H100-SXM"]
        unsplit = static_report.schedule_bound("triton", r["gflop"] * 1e9, r["min_mb"] * 1e6, 128, 128, 512, 1152,
                                               36, 1, d)
        assert unsplit["reduce_us"] == 0 and r["bound_us"] < unsplit["bound_us"] / 1.5, (r, unsplit)


def test_roofline_takes_the_bucket_cap(monkeypatch):
    """A max_splits in kSm90TileRules caps the Hopper rows' automatic count (here 2 on the M <= 4096 bucket):
    fc2 at M = 512 splits 2 ways, fc1's tail 2 ways."""
    tiles, rules = static_report.sm90_tiles()
    capped = [r[:3] + (2,) if r[0] == 4096 else r for r in rules]
    monkeypatch.setattr(static_report, "sm90_tiles", lambda: (tiles, capped))
    rows = {r["shape"]: r for r in static_report.roofline_rows([], short=True)
            if r["M"] == 512 and r["impl"] == "cuda wgmma w8a8"}
    assert rows["DiT-XL/2 mlp fc2"]["tile"] == "128x128x128 split 2" and rows["DiT-XL/2 mlp fc2"]["ctas"] == 72
    assert rows["DiT-XL/2 mlp fc1"]["tile"] == "128x128x128 132 whole + 12 split 2"


def test_mma_rules_are_read_from_the_header():
    """kTileRules' five columns (arch_min, max_m, w8, w4, max_splits): every row read, tiles listed, caps >= 1."""
    tiles, rules = static_report.cuda_tiles()
    text = open(os.path.join(ROOT, "csrc", "configs", "gemm_tiles.h")).read()
    body = text.split("kTileRules[] = {", 1)[1].split("};", 1)[0]
    assert rules and len(rules) == body.count("{")
    assert all(len(r) == 5 and r[2] in tiles and r[3] in tiles and 1 <= r[4] <= 1024 for r in rules), rules


def test_mma_auto_splits_takes_the_cap():
    """auto_splits' rule: two waves' worth of CTAs, at most the cap (kTileRules' max_splits), at most the k units."""
    assert [static_report.mma_auto_splits(36, 72, 132, c) for c in (16, 8, 2, 1)] == [8, 8, 2, 1]
    assert static_report.mma_auto_splits(1, 99, 132) == static_report.MMA_MAX_SPLITS
    assert static_report.mma_auto_splits(18, 5, 132) == 5 and static_report.mma_auto_splits(300, 72, 132) == 1


def test_default_caps_are_read_from_the_headers(tmp_path, monkeypatch):
    """The default caps are the headers' constants (kMaxSplits, kSm90MaxSplits), read rather than repeated; the
    shipped rules all use them, as the build says; a header without the constant is an error naming it."""
    import pytest
    import torch
    from ditq.backends import cuda_backend
    if cuda_backend.built() and hasattr(torch.ops.ditq_C, "gemm_max_splits"):
        assert torch.ops.ditq_C.gemm_max_splits(90, 512) == static_report.MMA_MAX_SPLITS
        assert torch.ops.ditq_C.gemm_sm90_max_splits(512) == static_report.SM90_MAX_SPLITS
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "t.h").write_text("constexpr int kOther = 3;\nconstexpr int  kMaxSplits=7;  // cap\n")
    monkeypatch.setattr(static_report, "CSRC", str(tmp_path))
    assert static_report.header_int("t.h", "kMaxSplits") == 7 and static_report.header_int("t.h", "kOther") == 3
    with pytest.raises(ValueError, match="kMissing"):
        static_report.header_int("t.h", "kMissing")


def test_mma_auto_splits_matches_the_build():
    """The model is the build's count (gemm_auto_splits, when ditq._C is built), capped and at the rules' caps."""
    import pytest
    import torch
    from ditq.backends import cuda_backend
    if not cuda_backend.built() or not hasattr(torch.ops.ditq_C, "gemm_auto_splits"):
        pytest.skip("ditq._C with gemm_auto_splits is not built")
    tiles, rules = static_report.cuda_tiles()
    for arch_min, max_m, _, _, cap in rules:  # the build's caps are the header's
        assert torch.ops.ditq_C.gemm_max_splits(arch_min, max_m if max_m > 0 else 1 << 20) == cap
    for t, (bm, bn, bk) in ((t, s[:3]) for t, s in tiles.items()):
        for m, n, k, group in ((1, 1152, 1152, 0), (16, 4608, 1152, 128), (512, 1152, 4608, 0),
                               (77, 333, 4608, 32), (4096, 4608, 1152, 256)):
            ctas = -(-m // bm) * -(-n // bn)
            units = -(-k // max(group, bk))
            for sms, cap in ((132, 16), (132, 3), (108, 1), (8, 5)):
                want = static_report.mma_auto_splits(ctas, units, sms, cap)
                assert torch.ops.ditq_C.gemm_auto_splits(t, group, m, n, k, sms, 90, cap) == want, (t, m, n, k, cap)


def test_roofline_mma_rows_take_the_rule_cap(monkeypatch):
    """A bucket the Hopper rules hand over (-1) runs the mma.sync tile with auto_splits' count: at M = 512, fc2's
    36 tiles of 128 x 128 split 8 ways (two waves of 132 SMs), or 2 under a max_splits of 2 in kTileRules."""
    h_tiles, h_rules = static_report.sm90_tiles()
    monkeypatch.setattr(static_report, "sm90_tiles",
                        lambda: (h_tiles, [(r[0], -1, -1, r[3]) if r[0] == 4096 else r for r in h_rules]))
    tiles, rules = static_report.cuda_tiles()

    def fc2(cap=None):
        if cap is not None:
            monkeypatch.setattr(static_report, "cuda_tiles",
                                lambda: (tiles, [r[:4] + (cap,) if r[0] == 90 else r for r in rules]))
        return {r["impl"]: r for r in static_report.roofline_rows([], short=True)
                if r["shape"] == "DiT-XL/2 mlp fc2" and r["M"] == 512 and r["impl"].startswith("cuda ")}
    free, capped = fc2(), fc2(2)
    for impl in ("cuda w8a8", f"cuda w4a8 g{static_report.W4_GROUP}"):
        assert free[impl]["tile"] == "128x128x64 split 8" and free[impl]["ctas"] == 288, free[impl]
        assert capped[impl]["tile"] == "128x128x64 split 2" and capped[impl]["ctas"] == 72, capped[impl]
        assert capped[impl]["reduce_us"] < free[impl]["reduce_us"]
