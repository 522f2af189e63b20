"""The shell scripts around a GPU run: they parse, the source hash follows the sources, and gpu_suite.sh refuses a
prebuilt extension that is not this tree's (a GPU call is too scarce to find a shell error or a stale build in)."""
import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPTS = ["benchmarks/gpu_suite.sh", "benchmarks/prebuild_extension.sh", "benchmarks/prepare_gpu_run.sh",
           "benchmarks/source_hash.sh", ".ci/run"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_parses(script):
    r = subprocess.run(["bash", "-n", os.path.join(ROOT, script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def _tree(tmp_path):
    """A copy of what the hash and the prebuilt check read: csrc/, setup.py, benchmarks/source_hash.sh."""
    shutil.copytree(os.path.join(ROOT, "csrc"), tmp_path / "csrc")
    shutil.copy(os.path.join(ROOT, "setup.py"), tmp_path / "setup.py")
    (tmp_path / "benchmarks").mkdir()
    shutil.copy(os.path.join(ROOT, "benchmarks", "source_hash.sh"), tmp_path / "benchmarks" / "source_hash.sh")
    return tmp_path


def _hash(tree):
    return subprocess.run(["bash", str(tree / "benchmarks" / "source_hash.sh")], capture_output=True, text=True,
                          check=True).stdout.strip()


def test_source_hash_follows_the_sources(tmp_path):
    tree = _tree(tmp_path)
    first = _hash(tree)
    assert re.fullmatch(r"[0-9a-f]{16}", first) and _hash(tree) == first
    (tree / "csrc" / "README.md").write_text("docs do not compile\n")
    assert _hash(tree) == first
    header = tree / "csrc" / "configs" / "gemm_tiles_sm90.h"
    header.write_text(header.read_text() + "\n// one more line\n")
    assert _hash(tree) != first


def _prebuilt_check(tree, info):
    """Run gpu_suite.sh's prebuilt() in ``tree`` with .prebuilt/BUILD_INFO = ``info`` (None: no folder)."""
    text = open(os.path.join(ROOT, "benchmarks", "gpu_suite.sh")).read()
    func = re.search(r"^prebuilt\(\) \{.*?^\}$", text, re.S | re.M).group(0)
    if info is not None:
        (tree / ".prebuilt").mkdir(exist_ok=True)
        (tree / ".prebuilt" / "BUILD_INFO").write_text(info)
    script = f"set -u\nexport TORCH_CUDA_ARCH_LIST=9.0a\n{func}\nprebuilt\n"
    # the function asks `python3` for the extension suffix and torch version: make that this test's interpreter
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    return subprocess.run(["bash", "-c", script], cwd=tree, capture_output=True, text=True, env=env)


def test_prebuilt_extension_is_refused_unless_it_is_this_trees(tmp_path):
    """No folder, no .so for this Python, other sources: each is refused with the reason, nothing is installed
    (the matching case installs and needs a GPU to pass its load check: gpu_suite.sh runs it there)."""
    import sysconfig

    import torch

    tree = _tree(tmp_path)
    r = _prebuilt_check(tree, None)
    assert r.returncode == 1 and "no .prebuilt/" in r.stdout
    right = f"sources {_hash(tree)}\ntorch {torch.__version__}\narchs 9.0a\ncommit abc\n"
    r = _prebuilt_check(tree, right)
    assert r.returncode == 1 and "no _C" in r.stdout and "for this Python" in r.stdout
    (tree / ".prebuilt" / ("_C" + sysconfig.get_config_var("EXT_SUFFIX"))).write_bytes(b"not a library")
    for wrong in (right.replace("sources ", "sources 0"), right.replace(f"torch {torch.__version__}", "torch 2.0.0"),
                  right.replace("archs 9.0a", "archs 8.0")):
        r = _prebuilt_check(tree, wrong)
        assert r.returncode == 1 and "built for other sources / torch / archs" in r.stdout, r.stdout
    assert not list((tree).glob("ditq/_C*")), "a refused extension was copied into the tree"
