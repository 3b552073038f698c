from kimi_operator.render.labels import bounded, common


def test_short_values_are_kept() -> None:
    assert bounded("kimi-k2-5") == "kimi-k2-5"


def test_long_values_are_bounded_and_distinct() -> None:
    a, b = bounded("x" * 70 + "a"), bounded("x" * 70 + "b")
    assert len(a) == 63
    assert len(b) == 63
    assert a != b


def test_common_labels() -> None:
    assert common("KimiModel", "m") == {
        "app.kubernetes.io/managed-by": "kimi-operator",
        "kimi-operator.io/kimimodel": "m",
    }
