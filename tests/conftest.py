"""Test-wide setup. With no GPU, Triton kernels run under its interpreter; the flag must be set before
triton is first imported (diffusers imports it), so it is set here, before anything else.

A time cap (benchmarks/gpu_suite.sh runs the cuda tests under ``timeout``): ``DITQ_TEST_DEADLINE``, a Unix time
in seconds, makes every test that would start after it skip ("out of time"), so pytest ends on its own before
the cap, prints its summary of failures and writes its JUnit XML. A killed pytest reports nothing, and on a
GPU lent for minutes the failures' tracebacks are the run's most valuable output. With the variable set, a
SIGTERM that comes anyway (the cap itself) is turned into KeyboardInterrupt, which pytest also answers with its
summary and report of what ran. Under a deadline the `cuda`-marked tests run first, the `gpu`-marked ones after."""
import os
import signal
import threading
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

_DEADLINE_KEY = pytest.StashKey[float]()


def _interrupt(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM (or timeout's KILL) ends the process
    raise KeyboardInterrupt("SIGTERM: the test run's time cap")


def pytest_configure(config):
    text = os.environ.get("DITQ_TEST_DEADLINE")
    if not text:
        return
    try:
        config.stash[_DEADLINE_KEY] = float(text)
    except ValueError:
        raise pytest.UsageError(f"DITQ_TEST_DEADLINE must be a Unix time in seconds, got {text!r}") from None
    if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread only
        signal.signal(signal.SIGTERM, _interrupt)


def pytest_runtest_setup(item):
    deadline = item.config.stash.get(_DEADLINE_KEY, None)
    if deadline is not None and time.time() >= deadline:
        pytest.skip("out of time: DITQ_TEST_DEADLINE has passed (the run's time cap)")


def pytest_collection_modifyitems(config, items):
    if _DEADLINE_KEY in config.stash:  # under a time cap the cuda tests go first, the gpu-marked CPU tests after
        items.sort(key=lambda item: "cuda" not in item.keywords)  # (a stable sort: file order within each)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
