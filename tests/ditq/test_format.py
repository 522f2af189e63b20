import pytest

from ditq.format import LAYOUT, LAYOUT_VERSION, FormatError, WeightFormat


def test_packed_shapes_follow_the_canonical_layout():
    assert WeightFormat(8).packed_shapes(6, 32) == {"qweight": (6, 32), "scales": (6,)}
    assert WeightFormat(4, 64).packed_shapes(6, 256) == {"qweight": (6, 128), "scales": (4, 6)}


def test_round_trip_through_dict():
    fmt = WeightFormat(4, 128)
    assert WeightFormat.from_dict(fmt.to_dict()) == fmt
    assert fmt.to_dict()["layout"] == LAYOUT and fmt.to_dict()["layout_version"] == LAYOUT_VERSION


@pytest.mark.parametrize("kwargs, msg", [
    (dict(bits=3), "bits must be one of"),
    (dict(bits=4, group_size=None), "need a group size"),
    (dict(bits=4, group_size=48), "group_size must be None"),
    (dict(bits=8, group_size=128), "one scale per output channel"),
    (dict(bits=4, group_size=128, layout_version=LAYOUT_VERSION + 1), "version"),
    (dict(bits=8, layout="marlin"), "layout 'marlin'"),
])
def test_bad_formats_are_refused_with_a_reason(kwargs, msg):
    with pytest.raises(FormatError, match=msg):
        WeightFormat(**kwargs)


def test_group_that_does_not_divide_k():
    with pytest.raises(FormatError, match="does not divide in_features K = 200"):
        WeightFormat(4, 64).check_in_features(200)


def test_unknown_fields_in_a_checkpoint_header():
    with pytest.raises(FormatError, match="unknown weight-format fields"):
        WeightFormat.from_dict({"bits": 8, "zero_point": True})


def test_qmax():
    assert WeightFormat(8).qmax == 127 and WeightFormat(4, 32).qmax == 7
