"""The public API (``ditq.__all__``) as a new user meets it: ``help()`` on each export says what it does."""


def test_public_api_is_documented():
    """help() on each export shows what it does, not a generated signature (a dataclass without a docstring
    gets its __init__ signature as __doc__)."""
    import ditq
    for name in ditq.__all__:
        doc = getattr(ditq, name).__doc__ or ""
        assert doc.strip() and not doc.startswith(f"{name}("), name
    from ditq.report import LayerReport
    assert not LayerReport.__doc__.startswith("LayerReport(")
