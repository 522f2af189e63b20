"""The tile-table loader: bucket picking, validation errors, and every shipped table loads."""
import glob
import json
import os

import pytest

from ditq.kernels import config_table as ct


def _write(tmp_path, monkeypatch, kernel, arch, data):
    monkeypatch.setattr(ct, "CONFIG_DIR", str(tmp_path))
    (tmp_path / f"{kernel}_{arch}.json").write_text(json.dumps(data))


def test_pick_by_bucket(tmp_path, monkeypatch):
    entries = [{"max_m": 16, "BM": 16}, {"max_m": 128, "BM": 64}, {"max_m": None, "BM": 128}]
    _write(tmp_path, monkeypatch, "k", "sm90", {"kernel": "k", "arch": "sm90", "entries": entries})
    table = ct.load_table("k", "sm90")
    assert [ct.pick(table, m)["BM"] for m in (0, 1, 16, 17, 128, 129, 16384)] == [16, 16, 16, 64, 64, 128, 128]
    assert ct.params(table[0]) == {"BM": 16}
    table[0]["BM"] = 999  # callers get copies: the cached table is unchanged
    assert ct.load_table("k", "sm90")[0]["BM"] == 16


@pytest.mark.parametrize("entries, msg", [
    ([], "non-empty"),
    ([{"BM": 1}], "max_m"),
    ([{"max_m": 16}], "last entry must have max_m null"),
    ([{"max_m": None}, {"max_m": None}], "exactly the last"),
    ([{"max_m": 64}, {"max_m": 16}, {"max_m": None}], "increasing"),
    ([{"max_m": 0}, {"max_m": None}], "increasing"),
    ([{"max_m": 16, "max_splits": 0}, {"max_m": None}], r"entry 0's max_splits must be an int >= 1.*got 0"),
    ([{"max_m": 16}, {"max_m": None, "max_splits": True}], "entry 1's max_splits must be an int >= 1"),
    ([{"max_m": None, "max_splits": 2.0}], "max_splits must be an int >= 1"),
    ([{"max_m": None, "max_splits": "4"}], "max_splits must be an int >= 1"),
])
def test_malformed_tables_are_refused(tmp_path, monkeypatch, entries, msg):
    _write(tmp_path, monkeypatch, "bad", "sm80", {"kernel": "bad", "arch": "sm80", "entries": entries})
    with pytest.raises(ct.ConfigError, match=msg):
        ct.load_table("bad", "sm80")


def test_split_cap_is_kept(tmp_path, monkeypatch):
    """An entry's optional max_splits (the bucket's cap on the automatic split-K count) loads as given."""
    entries = [{"max_m": 16, "BM": 16, "max_splits": 1}, {"max_m": None, "BM": 128}]
    _write(tmp_path, monkeypatch, "cap", "sm90", {"kernel": "cap", "arch": "sm90", "entries": entries})
    table = ct.load_table("cap", "sm90")
    assert ct.params(ct.pick(table, 3)) == {"BM": 16, "max_splits": 1} and "max_splits" not in table[1]


def test_header_and_missing_file_errors(tmp_path, monkeypatch):
    _write(tmp_path, monkeypatch, "k", "sm80", {"kernel": "other", "arch": "sm80", "entries": [{"max_m": None}]})
    with pytest.raises(ct.ConfigError, match="'kernel' is 'other'"):
        ct.load_table("k", "sm80")
    with pytest.raises(ct.ConfigError, match="does not exist"):
        ct.load_table("nope", "sm80")
    with pytest.raises(ct.ConfigError, match="unknown architecture"):
        ct.load_table("k", "sm75")
    (tmp_path / "j_sm80.json").write_text("{not json")
    with pytest.raises(ct.ConfigError, match="not valid JSON"):
        ct.load_table("j", "sm80")
    with pytest.raises(ValueError, match="M must be >= 0"):
        ct.pick([{"max_m": None}], -1)


def test_arch_for_capability():
    assert ct.arch_for_capability(8, 0) == "sm80"
    assert ct.arch_for_capability(8, 9) == "sm80"
    assert ct.arch_for_capability(9, 0) == "sm90"
    assert ct.arch_for_device("cpu") == "interpreter"
    with pytest.raises(ct.ConfigError, match="cc 8.0 or newer"):
        ct.arch_for_capability(7, 5)


def test_every_shipped_table_loads():
    paths = sorted(glob.glob(os.path.join(ct.CONFIG_DIR, "*.json")))
    for path in paths:
        kernel, arch = os.path.basename(path)[:-len(".json")].rsplit("_", 1)
        assert ct.load_table(kernel, arch), path
