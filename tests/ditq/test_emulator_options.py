"""emulator_options: process-wide settings, restored after the block, nested and across threads."""
import threading
import time

import pytest

from ditq.backends import cuda_backend

pytestmark = pytest.mark.skipif(not cuda_backend.built(), reason="the emulator lives in ditq._C, not built here")

DEFAULT = ("forward", 0, "wait", False)


@pytest.fixture(autouse=True)
def defaults():
    from ditq.emulator import get_emulator_options, set_emulator_options
    set_emulator_options(*DEFAULT)
    yield
    left = tuple(get_emulator_options())
    set_emulator_options(*DEFAULT)
    assert left == DEFAULT + (True, "sm_80", "wait", 132), f"a test left the emulator options set: {left}"


def test_nested_blocks_restore_the_outer_options():
    from ditq.emulator import emulator_options, get_emulator_options
    with emulator_options(order="reverse", seed=1, cp_async="issue", race_check=True):
        with emulator_options(order="random", seed=7, cp_async="barrier", race_check=False):
            assert tuple(get_emulator_options())[:4] == ("random", 7, "barrier", False)
        assert tuple(get_emulator_options())[:4] == ("reverse", 1, "issue", True)
    assert tuple(get_emulator_options())[:4] == DEFAULT


def test_block_restores_after_an_exception():
    from ditq.emulator import emulator_options, get_emulator_options
    with pytest.raises(KeyError):
        with emulator_options(order="reverse"):
            raise KeyError("x")
    assert tuple(get_emulator_options())[:4] == DEFAULT
    with pytest.raises(ValueError, match="emulator order must be one of"):
        with emulator_options(order="sideways"):
            pass
    assert tuple(get_emulator_options())[:4] == DEFAULT


def test_two_threads_interleaved_leave_the_defaults():
    """Thread A enters, thread B enters while A is inside, A leaves, then B leaves. Without a lock A's exit
    restores the defaults under B, and B's exit restores A's options for good. With it, B's block waits for A's
    and each block sees its own options."""
    from ditq.emulator import emulator_options, get_emulator_options
    a_inside, a_may_leave, b_may_leave = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def thread_a():
        with emulator_options(order="reverse", seed=1, cp_async="issue", race_check=True):
            a_inside.set()
            a_may_leave.wait(10)
            seen["a"] = tuple(get_emulator_options())[:4]

    def thread_b():
        a_inside.wait(10)
        with emulator_options(order="random", seed=2, cp_async="barrier", race_check=False):
            seen["b_entered_at"] = time.monotonic()
            b_may_leave.wait(10)
            seen["b"] = tuple(get_emulator_options())[:4]

    ta, tb = threading.Thread(target=thread_a), threading.Thread(target=thread_b)
    ta.start()
    tb.start()
    a_inside.wait(10)
    time.sleep(0.2)  # B is now blocked on entering (or, unlocked, already inside)
    released_a = time.monotonic()
    a_may_leave.set()
    ta.join(10)
    b_may_leave.set()
    tb.join(10)
    assert not ta.is_alive() and not tb.is_alive()
    assert seen["a"] == ("reverse", 1, "issue", True)
    assert seen["b"] == ("random", 2, "barrier", False)
    assert seen["b_entered_at"] >= released_a  # B's block waited for A's
    assert tuple(get_emulator_options())[:4] == DEFAULT


def test_mem_check_is_a_knob_on_by_default():
    from ditq.emulator import emulator_options, get_emulator_options
    assert get_emulator_options().mem_check
    with emulator_options(mem_check=False):
        assert not get_emulator_options().mem_check
    assert get_emulator_options().mem_check


def test_arch_and_async_landing_are_knobs_restored_after_the_block():
    from ditq.emulator import emulator_options, get_emulator_options
    assert (get_emulator_options().arch, get_emulator_options().async_landing) == ("sm_80", "wait")
    with emulator_options(arch="sm_90a", async_landing="issue"):
        assert (get_emulator_options().arch, get_emulator_options().async_landing) == ("sm_90a", "issue")
        with emulator_options(arch="sm_80"):
            assert (get_emulator_options().arch, get_emulator_options().async_landing) == ("sm_80", "wait")
        assert (get_emulator_options().arch, get_emulator_options().async_landing) == ("sm_90a", "issue")
    assert (get_emulator_options().arch, get_emulator_options().async_landing) == ("sm_80", "wait")
    with pytest.raises(ValueError, match="emulator arch must be one of"):
        with emulator_options(arch="sm_100"):
            pass
    with pytest.raises(ValueError, match="emulator async_landing must be one of"):
        with emulator_options(async_landing="never"):
            pass


def test_direct_hopper_op_validates_its_arguments():
    import torch
    with pytest.raises(ValueError, match="emulator arch must be 0"):
        torch.ops.ditq_C.emulator_set_hopper(2, 1)
    with pytest.raises(ValueError, match="emulator async_landing must be 0"):
        torch.ops.ditq_C.emulator_set_hopper(0, 5)
    assert list(torch.ops.ditq_C.emulator_get_hopper()) == [0, 1]
