"""benchmarks/families.py: what the default layer choice quantizes in each family at its real size (meta device)."""
import importlib.util
import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _load():
    spec = importlib.util.spec_from_file_location("families", os.path.join(ROOT, "benchmarks", "families.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_families_table(tmp_path, capsys):
    mod = _load()
    out = tmp_path / "families.json"
    assert mod.main(["--families", "wan", "flux2", "sana", "--json", str(out), "--why"]) == 0
    printed = capsys.readouterr().out
    rows = {r["family"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"wan", "flux2", "sana"} and "| wan (Wan2.1-T2V-14B) |" in printed
    wan, flux2, sana = rows["wan"], rows["flux2"], rows["sana"]
    assert 14e9 < wan["params"] < 15e9 and 32e9 < flux2["params"] < 33e9  # the flagship configs
    # FLUX.2-dev's widest inputs (K = 18432 and 24576) are within the GEMMs' K: nearly all of it is quantized
    assert flux2["w8a8"]["quantized_share"] > 0.99 and not any("exceeds" in why for why in
                                                               flux2["w8a8"]["kept_by_reason"])
    for r in (wan, flux2):
        assert 0.49 < r["w8a8"]["bytes"] / r["bf16_bytes"] < 0.52 and 0.26 < r["w4a8"]["bytes"] / r["bf16_bytes"] < 0.29
    assert any("_keep_in_fp32_modules" in why for why in wan["w8a8"]["kept_by_reason"])
    # Sana's width 2240 is no multiple of 128: W4A8 g128 quantizes nothing, and the table shows it
    assert sana["w4a8"]["layers"] == 0 and sana["w4a8"]["bytes"] == sana["bf16_bytes"]
    # its MLP is 1x1 convolutions, quantized as linears: nearly all of the model is in GEMMs, W8A8 halves it
    assert sana["linear_params"] > 0.95 * sana["params"] and sana["w8a8"]["bytes"] < 0.52 * sana["bf16_bytes"]
    # at g64 the MLP's down projections (K = 5600) stay in bf16, and the reason names the group size that fits
    assert sana["w4a8_g64"]["layers"] < sana["w8a8"]["layers"] - 20 and \
        sana["w4a8_g64"]["kept_by_reason"]["group_size 64 does not divide K = 5600 (group_size 32 would)"] == 20
