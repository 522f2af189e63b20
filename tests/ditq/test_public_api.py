"""The public API (``ditq.__all__``) as a new user meets it: ``help()`` on each export says what it does."""

import math


def test_public_api_is_documented():
    """help() on each export shows what it does, not a generated signature (a dataclass without a docstring
    gets its __init__ signature as __doc__)."""
    import ditq
    for name in ditq.__all__:
        doc = getattr(ditq, name).__doc__ or ""
        assert doc.strip() and not doc.startswith(f"{name}("), name
    from ditq.report import LayerReport
    assert not LayerReport.__doc__.startswith("LayerReport(")


def test_sqnr_refuses_what_is_not_a_tensor():
    import pytest
    import torch

    import ditq
    with pytest.raises(TypeError, match="sqnr takes two tensors, got list and Tensor"):
        ditq.sqnr([1.0, 2.0], torch.ones(2))
    assert ditq.sqnr(torch.tensor([3.0, 4.0]), torch.tensor([3.0, 3.0])) == pytest.approx(10 * math.log10(25))
