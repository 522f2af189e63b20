"""The test-wide time cap in tests/conftest.py (``DITQ_TEST_DEADLINE``): tests past it skip, a SIGTERM still
gets pytest's summary and JUnit XML. Each case runs pytest in a subprocess on a copy of the conftest."""
import os
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))

TESTS = '''
import os, time

import pytest

def test_first():
    assert 1 + 1 == 2

def test_waits():
    open(os.environ["STARTED_FLAG"], "w").close()
    time.sleep(float(os.environ.get("WAIT_S", "0")))


@pytest.mark.cuda
def test_on_the_gpu():
    pass
'''


def run_pytest(tmp_path, deadline, wait_s=0.0, terminate=False):
    shutil.copy(os.path.join(HERE, "conftest.py"), tmp_path / "conftest.py")
    (tmp_path / "test_sample.py").write_text(TESTS)
    flag, xml = tmp_path / "started", tmp_path / "report.xml"
    env = dict(os.environ, STARTED_FLAG=str(flag), WAIT_S=str(wait_s))
    env.pop("PYTEST_XDIST_WORKER", None)
    if deadline is None:
        env.pop("DITQ_TEST_DEADLINE", None)
    else:
        env["DITQ_TEST_DEADLINE"] = str(deadline)
    proc = subprocess.Popen([sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "-p", "no:xdist",
                             "-p", "no:randomly", "-ra", f"--junitxml={xml}", "--rootdir", str(tmp_path),
                             str(tmp_path)],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if terminate:
        t0 = time.time()
        while not flag.exists():
            assert proc.poll() is None and time.time() - t0 < 120, "the waiting test never started"
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=180)
    return proc.returncode, out, (ET.parse(xml).getroot() if xml.exists() else None)


def test_a_passed_deadline_skips_every_test_with_the_reason(tmp_path):
    rc, out, xml = run_pytest(tmp_path, time.time() - 1)
    assert rc == 0, out
    assert "3 skipped" in out and "out of time" in out, out
    assert xml is not None and xml.find(".//testsuite").get("skipped") == "3"
    # under a deadline the cuda-marked test runs first, though defined last
    order = [line.split("::")[1].split()[0] for line in out.splitlines() if "test_sample.py::" in line]
    assert order == ["test_on_the_gpu", "test_first", "test_waits"], out


def test_sigterm_under_a_deadline_still_reports(tmp_path):
    rc, out, xml = run_pytest(tmp_path, time.time() + 3600, wait_s=60, terminate=True)
    assert rc == pytest.ExitCode.INTERRUPTED, out
    assert "KeyboardInterrupt" in out and "test_first PASSED" in out, out
    assert xml is not None, "no JUnit XML after SIGTERM"


def test_a_malformed_deadline_is_a_usage_error(tmp_path):
    rc, out, xml = run_pytest(tmp_path, "soon")
    assert rc == pytest.ExitCode.USAGE_ERROR, out
    assert "DITQ_TEST_DEADLINE must be a Unix time" in out
