"""The emulator catches the Hopper mistakes it claims to (csrc/emu/hopper.h): each deliberately broken variant
of the probe GEMM tile (tests/csrc/hopper_probe.cpp) is reported with a kind and the source lines of the
mistake under every fiber order and landing mode, while the correct kernel passes everywhere (so none of
these can pass by reporting everything)."""
import importlib.util
import os

import numpy as np
import pytest

_spec = importlib.util.spec_from_file_location("test_emulator_hopper", os.path.join(os.path.dirname(__file__),
                                                                                    "test_emulator_hopper.py"))
th = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(th)
hp = th.hp

SCHEDULES = [("forward", 0), ("reverse", 0), ("random", 1), ("random", 2)]
LANDINGS = ["issue", "wait"]

# bug -> (accepted kinds, markers of which the report must name at least one, markers it must name all of)
BROKEN = {
    # the accumulators are read (and the thread exits) with the last k tile's wgmmas never retired
    "no_final_wait": ({"wgmma-pending"}, ["wgmma_ss"], []),
    # a consumer waiting with the wrong parity passes a phase early: its wgmma reads a stage the TMA has not
    # written yet (or is still writing), or, when the phase it waits for needs its own release, nobody moves
    "wrong_parity": ({"shared-unwritten", "tma-in-flight", "deadlock"}, ["wgmma_ss", "wait_full"], []),
    # the phase waits for a byte that never comes: the deadlock report names the barrier and both counts
    "expect_too_many": ({"deadlock"}, [], ["wait_full", "init_full"]),
    # the phase completes once the A box landed: B's bytes count toward the next phase, still in flight
    "expect_too_few": ({"tma-in-flight", "shared-unwritten"}, ["tma_b", "wgmma_ss"], ["wgmma_ss"]),
    "no_mbar_init_fence": ({"mbarrier"}, [], ["tma_a", "init_full"]),
    # thread 77 skips one wgmma: its next one meets the others' (different descriptors), or they wait forever
    "skip_wgmma": ({"divergent-collective", "deadlock"}, [], ["wgmma_ss"]),
    "no_wgmma_fence": ({"wgmma-fence"}, [], ["wgmma_ss"]),
    "touch_accum": ({"wgmma-accumulator"}, [], ["wgmma_ss"]),
    "use_before_init": ({"mbarrier"}, [], ["use_before_init"]),
    # the stage is released before its wgmmas retire: the producer's next TMA load overwrites their operands
    "early_release": ({"race"}, [], ["tma_a", "wgmma_ss"]),
}


def run(bug, order="forward", seed=0, landing="wait"):
    return th.run_gemm(64, 50, 40, 544, bug=bug, order=order, seed=seed, landing=landing)


@pytest.mark.parametrize("bug", sorted(BROKEN))
def test_broken_hopper_kernel_is_reported_with_kind_and_lines(bug):
    kinds, any_of, all_of = BROKEN[bug]
    for order, seed in SCHEDULES:
        for landing in LANDINGS:
            res, _, _ = run(bug, order, seed, landing)
            ctx = f"{bug} under {order}/{seed}/{landing}"
            assert res.rc == 1, f"{ctx}: not reported ({res})"
            assert res.kind in kinds, f"{ctx}: reported as {res.kind!r}: {res.msg}"
            assert res.msg.startswith(f"ditq emulator [{res.kind}] in block (0,0,0) of kernel gemm_tile: "), res.msg
            if any_of:
                assert any(hp.where(m) in res.msg for m in any_of), f"{ctx}: names none of {any_of}: {res.msg}"
            for m in all_of:
                assert hp.where(m) in res.msg, f"{ctx}: does not name {hp.where(m)} (@{m}): {res.msg}"
            assert "thread" in res.msg


def test_correct_twin_passes_everywhere():
    for order, seed in SCHEDULES:
        for landing in LANDINGS:
            res, out, want = run("none", order, seed, landing)
            assert res.rc == 0, res
            np.testing.assert_array_equal(out, want)


def test_deadlock_report_gives_the_barrier_counts():
    """A wrong expect_tx shows as its numbers: the stage is 8192 + 8192 bytes, the producer expects one more."""
    res, _, _ = run("expect_too_many")
    assert "expect_tx 16385 bytes, received 16384 bytes" in res.msg, res.msg
    assert "1 of 1 arrivals" in res.msg and "for parity 0 of mbarrier at static shared byte 0" in res.msg, res.msg


def test_missing_final_wait_reads_poison_when_results_land_lazily():
    """Without the race checker the missing wgmma_wait_group still shows: in the lazy landing mode the
    accumulators hold poison when the kernel reads them (and the exit check reports the pending wgmma)."""
    res, out, want = th.run_gemm(64, 50, 40, 544, bug="no_final_wait", landing="wait", race_check=False)
    assert res.kind == "wgmma-pending"
    assert (out != want).any()


def test_emulator_recovers_after_a_hopper_error():
    for bug in ("early_release", "expect_too_few", "touch_accum"):
        assert run(bug)[0].rc == 1
    res, out, want = run("none", "random", 7)
    assert res.rc == 0, res
    np.testing.assert_array_equal(out, want)


def _proxy(fence):
    rng = np.random.default_rng(3)
    a = rng.integers(-128, 128, (64, 32), dtype=np.int8)
    b = rng.integers(-128, 128, (8, 32), dtype=np.int8)
    out = np.full((128, 4), -7, dtype=np.int32)
    res = hp.call(hp.load().probe_proxy_fence, int(fence), hp.ptr(a), hp.ptr(b), hp.ptr(out))
    want = a.astype(np.int64) @ b.astype(np.int64).T
    got = np.zeros((64, 8), dtype=np.int64)
    for t in range(128):
        for i in range(4):
            got[th.isa_d(t, i)] = out[t, i]
    return res, got, want


def test_generic_stores_read_by_wgmma_need_the_async_proxy_fence():
    res, got, want = _proxy(fence=True)
    assert res.rc == 0, res
    np.testing.assert_array_equal(got, want)
    res, _, _ = _proxy(fence=False)
    assert res.rc == 1 and res.kind == "proxy-fence", res
    assert hp.where("generic_store") in res.msg and hp.where("fence_wgmma") in res.msg, res.msg


def test_setmaxnreg_must_be_warpgroup_uniform():
    out = np.zeros(128, dtype=np.int32)
    assert hp.call(hp.load().probe_setmaxnreg, 0, hp.ptr(out)).rc == 0
    res = hp.call(hp.load().probe_setmaxnreg, 1, hp.ptr(out))
    assert res.rc == 1 and res.kind == "divergent-collective", res
    assert hp.where("setmaxnreg_a") in res.msg and hp.where("setmaxnreg_b") in res.msg, res.msg


MISUSE = {
    1: ("mbarrier", "misuse_reinit", "re-initialises"),
    2: ("mbarrier", "misuse_extra_arrive", "more arrivals than the init count"),
    3: ("tma-pending", "misuse_unwaited_tma", "before the block exited"),
    4: ("config", "misuse_unbuilt_map", "never built"),
    5: ("mbarrier", "misuse_tx_overflow", "past the ISA's 2^20 - 1"),
}


@pytest.mark.parametrize("mode", sorted(MISUSE), ids=lambda m: MISUSE[m][1])
def test_mbarrier_and_tma_misuse_is_reported(mode):
    kind, marker, text = MISUSE[mode]
    g = np.arange(1024, dtype=np.uint8)
    res = hp.call(hp.load().probe_misuse, mode, hp.ptr(g))
    assert res.rc == 1 and res.kind == kind, res
    assert hp.where(marker) in res.msg and text in res.msg, res.msg
    assert hp.call(hp.load().probe_misuse, 0, hp.ptr(g)).rc == 0
