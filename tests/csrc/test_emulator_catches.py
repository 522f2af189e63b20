"""The SIMT emulator catches what it claims (csrc/README.md): deliberately broken kernels
(tests/csrc/emu_probe.cpp) are reported with the right kind and source lines under every fiber order, and
their fixed twins pass under every order x cp.async mode (so none of these tests can pass by reporting
everything)."""
import importlib.util
import os

import pytest

_spec = importlib.util.spec_from_file_location("emu_probe", os.path.join(os.path.dirname(__file__), "emu_probe.py"))
probe = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(probe)

SCHEDULES = [("forward", 0), ("reverse", 0), ("random", 1), ("random", 2), ("random", 3)]
CP_MODES = ["issue", "wait", "barrier"]

# name -> (kind, markers whose lines the report must name)
BROKEN = {
    "block_sum_missing_sync": ("race", ["missing_sync_write", "missing_sync_read"]),
    "two_stage_early_wait": ("cp-async-in-flight", ["early_wait_read"]),
    "early_return": ("deadlock", ["early_return_shfl"]),
    "write_write": ("race", ["ww_write"]),
    "read_write": ("race", ["rw_read", "rw_write"]),
    "divergent_barrier": ("divergent-barrier", ["div_bar_a", "div_bar_b"]),
    "divergent_collective": ("divergent-collective", ["div_coll_a", "div_coll_b"]),
    "out_of_range": ("shared-address", ["oob_write"]),
    "misaligned_cp_async": ("misaligned", ["misaligned_cp"]),
    "partial_warp": ("partial-warp", ["partial_shfl"]),
}
FIXED = ["block_sum_ok", "two_stage_ok", "early_return_ok", "write_write_ok", "read_write_ok", "warp_ordered"]


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_broken_kernel_is_reported_with_kind_and_lines(name):
    kind, markers = BROKEN[name]
    for order, seed in SCHEDULES:
        for cp in CP_MODES:
            status, got_kind, msg = probe.run(name, order=order, seed=seed, cp_async=cp, race_check=True)
            assert status == "error", f"{name} under {order}/{seed}/{cp}: not reported ({status})"
            assert got_kind == kind, f"{name}: reported as {got_kind!r}, expected {kind!r}: {msg}"
            assert msg.startswith(f"ditq emulator [{kind}] in block (0,0,0): "), msg
            for m in markers:
                assert probe.where(m) in msg, f"{name}: the report does not name {probe.where(m)}: {msg}"
            assert "thread" in msg


@pytest.mark.parametrize("name", FIXED)
def test_fixed_twin_passes_everywhere(name):
    for order, seed in SCHEDULES:
        for cp in CP_MODES:
            status, kind, msg = probe.run(name, order=order, seed=seed, cp_async=cp, race_check=True)
            assert status == "ok", f"{name} under {order}/{seed}/{cp}: {status} {kind} {msg}"


def test_deadlock_report_names_waiting_and_returned_threads():
    _, _, msg = probe.run("early_return")
    # Thread 37 returned; the rest of its warp (32..63) waits at the shuffle; warp 0 finished normally.
    assert "threads 32-36, 38-63 wait at shfl.sync.bfly at " + probe.where("early_return_shfl") in msg, msg
    assert "threads 0-31, 37 have returned" in msg, msg


def test_missing_barrier_without_race_checker_depends_on_order():
    """Why the race checker and the orders both exist: without the checker, the missing barrier gives wrong
    data only in some orders (forward: thread 0 sums before the others store), right data in others."""
    assert probe.run("block_sum_missing_sync", order="forward", race_check=False)[0] == "wrong"
    assert probe.run("block_sum_missing_sync", order="reverse", race_check=False)[0] == "ok"


def test_early_wait_without_race_checker_needs_lazy_cp_async():
    """Waiting for one cp.async group too few gives wrong data only when copies land lazily (at the wait);
    the in-flight check above catches it in every mode."""
    results = {cp: probe.run("two_stage_early_wait", cp_async=cp, race_check=False)[0] for cp in CP_MODES}
    assert results == {"issue": "ok", "wait": "wrong", "barrier": "ok"}


def test_emulator_recovers_after_an_error():
    """A failed launch abandons its fibers mid-kernel; the next launch must start clean."""
    assert probe.run("early_return")[0] == "error"
    assert probe.run("two_stage_early_wait", cp_async="wait")[0] == "error"  # leaves copies in flight
    for name in ("block_sum_ok", "two_stage_ok"):
        assert probe.run(name, order="random", seed=5)[0] == "ok"


# ---- global memory: the launch registers its buffers, every ptx:: global access is checked ---------------------
GLOBAL_BROKEN = {
    # name -> (kind, marker of the reported line, the thread the report must name)
    "global_oob_read": ("global-address", "g_oob_read", "thread (63,0,0)"),
    "global_oob_write": ("global-address", "g_oob_write", "thread (63,0,0)"),
    "global_cp_async_oob": ("global-address", "g_cp_oob", "thread (63,0,0)"),
    "global_read_only_write": ("global-read-only", "g_ro_write", "thread (5,0,0)"),
    "global_unwritten_read": ("global-unwritten", "g_unwritten", "thread (0,0,0)"),
}


@pytest.mark.parametrize("name", sorted(GLOBAL_BROKEN))
def test_global_memory_bug_is_reported_with_kernel_block_thread_and_line(name):
    kind, marker, thread = GLOBAL_BROKEN[name]
    for order, seed in SCHEDULES:
        status, got_kind, msg = probe.run(name, order=order, seed=seed, cp_async="wait")
        assert status == "error" and got_kind == kind, f"{name} under {order}/{seed}: {status} {got_kind} {msg}"
        assert msg.startswith(f"ditq emulator [{kind}] in block (0,0,0) of kernel global_probe: "), msg
        assert thread in msg and probe.where(marker) in msg, msg
    if kind == "global-address":  # the report names the buffer and how far past it the access is
        assert "past the end of" in msg or "touches bytes" in msg, msg


def test_global_memory_fixed_twin_passes_everywhere():
    for order, seed in SCHEDULES:
        for cp in CP_MODES:
            status, kind, msg = probe.run("global_ok", order=order, seed=seed, cp_async=cp)
            assert status == "ok", f"global_ok under {order}/{seed}/{cp}: {status} {kind} {msg}"


def test_global_checker_can_be_switched_off():
    """With mem_check off the out-of-bounds read goes unseen (it reads the array's neighbour): the checker,
    not luck, is what reports it."""
    assert probe.run("global_oob_read", mem_check=False)[0] in ("ok", "wrong")
    assert probe.run("global_unwritten_read", mem_check=False)[0] in ("ok", "wrong")
    assert probe.run("global_oob_read", mem_check=True)[0] == "error"
