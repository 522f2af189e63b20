"""``ditq.kernels.describe()``: each Triton kernel family says once what it takes, and says it truly: every
listed group size runs exactly under the interpreter (or on a GPU), an unlisted one is refused, the
architectures are the tile tables', and no module of the package imports the ``ditq`` runtime."""
import ast
import glob
import os
import re
import subprocess
import sys

import pytest
import torch

import ditq.kernels
from ditq import testing
from ditq.kernels import config_table, w4a8, w8a8
from ditq.quant import reference as ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
KERNELS_DIR = os.path.dirname(ditq.kernels.__file__)


def test_keys_and_values():
    d = ditq.kernels.describe()
    assert set(d) == {"quantize_act", "gemm_w8a8", "gemm_w4a8", "norm_quantize"}
    assert set(d["quantize_act"]) == set(d["norm_quantize"]) == {"k_multiple", "max_k", "archs", "interpreter"}
    gemm_keys = {"weight_bits", "group_sizes", "k_multiple", "max_k", "layout", "layout_version", "archs",
                 "interpreter"}
    assert set(d["gemm_w8a8"]) == gemm_keys
    assert set(d["gemm_w4a8"]) == gemm_keys | {"max_int_group_scale", "int_scale_groups"}
    assert d["gemm_w4a8"]["max_int_group_scale"] == 16
    assert d["gemm_w4a8"]["int_scale_groups"] == {80: [32, 64, 128], 90: [32, 64, 128, 256]}
    assert d["gemm_w8a8"]["weight_bits"] == 8 and d["gemm_w8a8"]["group_sizes"] is None
    assert d["gemm_w8a8"]["k_multiple"] == 16 and d["gemm_w8a8"]["max_k"] == 32768
    assert d["gemm_w4a8"]["weight_bits"] == 4 and d["gemm_w4a8"]["group_sizes"] == list(w4a8.GROUP_SIZES)
    assert d["gemm_w4a8"]["max_k"] == 32768
    for fam in d.values():
        assert fam["archs"] == [80, 90] and fam["interpreter"] is True
        assert isinstance(fam["k_multiple"], int) and fam["k_multiple"] >= 1
    for fam in ("gemm_w8a8", "gemm_w4a8"):
        assert isinstance(d[fam]["layout"], str) and d[fam]["layout"] and d[fam]["layout_version"] == 1
    assert d["gemm_w8a8"]["layout"] != d["gemm_w4a8"]["layout"]


def test_archs_follow_the_tile_tables(tmp_path, monkeypatch):
    """archs is read from configs/, not restated: a table directory without sm80 drops 80."""
    for name in os.listdir(config_table.CONFIG_DIR):
        if not name.startswith("w8a8_sm80"):
            (tmp_path / name).write_bytes(open(os.path.join(config_table.CONFIG_DIR, name), "rb").read())
    monkeypatch.setattr(config_table, "CONFIG_DIR", str(tmp_path))
    assert w8a8.describe()["archs"] == [90]
    assert w4a8.describe()["archs"] == [80, 90]


def test_group_sizes_have_one_home(monkeypatch):
    """The launcher's check, the config picker and describe() all read w4a8.GROUP_SIZES."""
    monkeypatch.setattr(w4a8, "GROUP_SIZES", (64, 128))
    assert w4a8.describe()["group_sizes"] == [64, 128]
    with pytest.raises(ValueError, match="group_size must be one of"):
        w4a8.kernel_config(16, "cpu", 32)
    with pytest.raises(ValueError, match="group_size must be one of"):
        w4a8.pack_weight(torch.zeros(2, 16, dtype=torch.uint8), 32)


@pytest.mark.parametrize("g", ditq.kernels.describe()["gemm_w4a8"]["group_sizes"])
def test_every_listed_group_size_runs_exactly(g):
    # M = 1 and odd M, N odd, K = 3 groups (not a multiple of the step, nor of G = 32's 64-k pack block);
    # the tile comes from the shipped table, as the runtime runs it
    for m in (1, 5):
        n, k = 7, 3 * g
        gen = torch.Generator().manual_seed(g + m)
        a = testing.random_int8(m, k, generator=gen)
        q = testing.random_int4(n, k, generator=gen)
        s = torch.rand(k // g, n, generator=gen) * 0.02 + 1e-4
        a_s = torch.rand(m, generator=gen) * 0.05 + 1e-3
        bias = torch.randn(n, generator=gen)
        w = w4a8.pack_weight(ref.pack_int4(q), g)
        out = torch.full((m, n), float("nan"), device=DEVICE)
        w4a8.gemm_w4a8(a.to(DEVICE), a_s.to(DEVICE), w.to(DEVICE), s.to(DEVICE), bias.to(DEVICE), g,
                       torch.float32, out=out)
        testing.assert_gemm_w4a8(out, a, a_s, q, s, g, bias, what=f"w4a8 G={g} M={m}")


@pytest.mark.parametrize("g", [g for g in (16, 48, 512, 1024, 0, -32) if g not in w4a8.GROUP_SIZES])
def test_unlisted_group_size_is_refused(g):
    a = torch.zeros(2, 512, dtype=torch.int8)
    with pytest.raises(ValueError, match=re.escape(f"group_size must be one of {w4a8.GROUP_SIZES}")):
        w4a8.gemm_w4a8(a, torch.ones(1), torch.zeros(3, 256, dtype=torch.uint8), torch.ones(512 // abs(g or 1), 3),
                       None, g, torch.float32)
    with pytest.raises(ValueError, match="group_size must be one of"):
        w4a8.pack_weight(torch.zeros(3, 256, dtype=torch.uint8), g)


def _imports(path):
    tree = ast.parse(open(path).read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            yield node.module


def test_no_module_imports_the_runtime():
    """Statically: no import of ditq (other than ditq.kernels itself) or diffusers anywhere in kernels/."""
    files = sorted(glob.glob(os.path.join(KERNELS_DIR, "*.py")))
    assert len(files) >= 6
    for path in files:
        for name in _imports(path):
            root = name.split(".")[0]
            assert root != "diffusers" and (root != "ditq" or name.startswith("ditq.kernels")), (path, name)


def test_package_imports_standalone():
    """Dynamically: loaded as a package of its own (no ditq on the path), every module imports and pulls in
    neither ditq nor diffusers."""
    code = f"""
import importlib, importlib.util, os, sys
d = {KERNELS_DIR!r}
spec = importlib.util.spec_from_file_location("standalone_kernels", os.path.join(d, "__init__.py"),
                                              submodule_search_locations=[d])
pkg = importlib.util.module_from_spec(spec); sys.modules["standalone_kernels"] = pkg; spec.loader.exec_module(pkg)
for f in sorted(os.listdir(d)):
    if f.endswith(".py") and f != "__init__.py":
        importlib.import_module("standalone_kernels." + f[:-3])
print(sorted(pkg.describe()))
bad = sorted(m for m in sys.modules if m.split(".")[0] in ("ditq", "diffusers"))
assert not bad, bad
"""
    env = dict(os.environ, PYTHONPATH="")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd="/",
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "gemm_w4a8" in proc.stdout
