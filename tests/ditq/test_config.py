"""QuantConfig: defaults, presets, validation errors, round trip."""
import pytest

from ditq import QuantConfig
from ditq.config import QuantConfigError


def test_defaults_follow_bits():
    assert QuantConfig(weight_bits=8).group_size is None
    assert QuantConfig(weight_bits=4).group_size == 128
    assert QuantConfig(weight_bits=4, group_size=32).weight_format.group_size == 32


def test_presets_and_overrides():
    c = QuantConfig.preset("w4a8", group_size=64, act_scheme="dynamic")
    assert (c.weight_bits, c.group_size, c.act_scheme) == (4, 64, "dynamic")
    c = QuantConfig.preset("w8a8")
    assert (c.weight_bits, c.group_size) == (8, None)
    assert QuantConfig.preset("w8a8", weight_bits=4).group_size == 128
    with pytest.raises(QuantConfigError, match="unknown preset"):
        QuantConfig.preset("w2a8")


@pytest.mark.parametrize("kw, match", [
    (dict(weight_bits=3), "weight_bits must be 4 or 8"),
    (dict(weight_bits=True), "weight_bits must be 4 or 8"),
    (dict(weight_bits=4, group_size=48), "group_size must be None"),
    (dict(weight_bits=4, group_size=None), "need a group size"),
    (dict(weight_bits=8, group_size=128), "one scale per output channel"),
    (dict(act_bits=4), "act_bits must be 8"),
    (dict(act_scheme="smooth"), "act_scheme must be one of"),
    (dict(calibration="last-step"), "calibration must be one of"),
    (dict(calibration=[]), "step list is empty"),
    (dict(calibration=[0, -1]), "non-negative"),
    (dict(calibration=[1, 1]), "must not repeat"),
    (dict(calibration=3), "calibration must be one of"),
    (dict(backend="cublas"), "backend must be one of"),
    (dict(skip=[""]), "non-empty strings"),
    (dict(include=5), "list of fnmatch patterns"),
    (dict(default_skip="yes"), "default_skip"),
    (dict(weight_method="awq"), "weight_method must be one of"),
    (dict(weight_method=None), "weight_method must be one of"),
])
def test_bad_settings_raise_clear_errors(kw, match):
    with pytest.raises(QuantConfigError, match=match):
        QuantConfig(**kw)


def test_calibration_modes():
    assert QuantConfig().calibration_steps() == [0]
    assert QuantConfig(calibration="all-steps").calibration_steps() is None
    assert QuantConfig(calibration=[5, 2]).calibration_steps() == [2, 5]


def test_dict_round_trip_and_unknown_fields():
    c = QuantConfig(weight_bits=4, group_size=64, skip=["proj*"], include="blocks.*", calibration=[0, 3])
    d = c.to_dict()
    assert d["include"] == ["blocks.*"]
    assert QuantConfig.from_dict(d) == c
    with pytest.raises(QuantConfigError, match="unknown QuantConfig fields"):
        QuantConfig.from_dict({**d, "bits": 4})
    g = QuantConfig(weight_bits=4, weight_method="gptq")
    assert QuantConfig.from_dict(g.to_dict()).weight_method == "gptq"
    old = {k: v for k, v in g.to_dict().items() if k != "weight_method"}  # a config written before the field
    assert QuantConfig.from_dict(old).weight_method == "rtn"


def test_group_size_is_checked_against_the_kernels_own_description():
    from ditq import backends
    from ditq.config import QuantConfigError
    built = backends.kernel_group_sizes()
    with pytest.raises(QuantConfigError, match=r"group_size 512 is not built into the GPU kernels .* runs "
                                               + ", ".join(map(str, built))):
        QuantConfig(weight_bits=4, group_size=512)
    if backends.unavailable_reason("cuda-emulated", "cpu") is None:
        with pytest.raises(QuantConfigError, match="not built into backend 'cuda-emulated'"):
            QuantConfig(weight_bits=4, group_size=512, backend="cuda-emulated")
    assert QuantConfig(weight_bits=4, group_size=512, backend="torch").group_size == 512  # the reference runs any


def test_preset_mistakes_say_what_is_accepted():
    with pytest.raises(QuantConfigError, match=r"unknown preset \['w8a8'\]; choose one of \['w4a8', 'w8a8'\]"):
        QuantConfig.preset(["w8a8"])
    with pytest.raises(QuantConfigError, match=r"unknown QuantConfig fields \['bits'\] in the preset's overrides; "
                                               r"known: \['act_bits'"):
        QuantConfig.preset("w8a8", bits=4)


@pytest.mark.parametrize("field", ["skip", "include"])
@pytest.mark.parametrize("value, match", [
    ({"proj*": 1}, r"got a dict$"),
    ({"proj*", "norm*"}, r"got a set \(pass sorted\(...\) of it\)"),
    (frozenset({"proj*"}), r"got a frozenset \(pass sorted"),
    (b"proj*", "got a bytes"),
], ids=["dict", "set", "frozenset", "bytes"])
def test_pattern_containers_without_a_meaning_or_an_order_are_refused(field, value, match):
    """A dict's keys would silently act as the patterns; a set's order changes from process to process, so the
    same config would be written into checkpoint headers differently each run."""
    with pytest.raises(QuantConfigError, match=f"^{field} must be a list of fnmatch patterns .*" + match):
        QuantConfig(**{field: value})


def test_pattern_sequences_and_iterators_are_kept_in_order():
    assert QuantConfig(skip=("b*", "a*")).skip == ["b*", "a*"]
    assert QuantConfig(include=(p for p in ["z*", "y*"])).include == ["z*", "y*"]  # consumed once, in order
    assert QuantConfig(skip="proj*").skip == ["proj*"]
