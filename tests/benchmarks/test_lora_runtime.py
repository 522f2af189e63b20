"""benchmarks/lora_runtime.py runs and gives the README's "LoRA." figures (one cell: the tiny FLUX, W8A8, the
moderate adapter, seed 0; the whole table takes about a minute)."""
import importlib.util
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow
def test_lora_runtime_gives_the_readme_figures():
    spec = importlib.util.spec_from_file_location("lora_runtime", os.path.join(ROOT, "benchmarks", "lora_runtime.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    row = mod.measure("flux", "w8a8", 0.05, seed=0)
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    # the table's first FLUX W8A8 row: | FLUX W8A8 | <effect seed 0> / <seed 1> | <run time seed 0> / <seed 1> |
    # <merged seed 0> / <seed 1> | <no LoRA> |
    m = re.search(r"\| FLUX W8A8 \| (\d+) / \d+ \| (\d+\.\d) / \d+\.\d \| (\d+\.\d) / \d+\.\d \|", readme)
    assert m, "README's LoRA figures not found"
    effect, runtime, merged = float(m.group(1)), float(m.group(2)), float(m.group(3))
    assert abs(row["runtime_lora_db"] - runtime) <= 0.15 and abs(row["merge_then_quantize_db"] - merged) <= 0.15
    assert abs(row["adapter_effect_db"] - effect) <= 0.6
    assert row["adapter_effect_db"] < row["runtime_lora_db"] - 10  # the adapter matters next to the quantization
