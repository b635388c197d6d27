"""Wilson intervals against hand computation and statsmodels' published values."""

import math

import pytest

from fixative.eval.rates import rate, wilson_interval


def test_wilson_interval_by_hand():
    # 8 of 10: p = 0.8, z = 1.96: centre (0.8 + 0.19208) / 1.38416, half 1.96 sqrt(0.016 + 0.0009604) / 1.38416
    z = 1.959963984540054
    n, p = 10, 0.8
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    low, high = wilson_interval(8, 10)
    assert (low, high) == pytest.approx((centre - half, centre + half), abs=1e-12)
    assert (low, high) == pytest.approx((0.4902, 0.9433), abs=1e-4)  # the 95% Wilson interval of 8/10, 4 decimals


def test_wilson_interval_edges():
    z2 = 1.959963984540054**2
    assert wilson_interval(0, 64) == pytest.approx((0.0, z2 / (64 + z2)), abs=1e-12)  # p = 0: upper z²/(n + z²)
    assert wilson_interval(64, 64) == pytest.approx((64 / (64 + z2), 1.0), abs=1e-12)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        wilson_interval(5, 4)


def test_rate_record():
    r = rate(3, 4)
    assert r.value == 0.75 and r.low < 0.75 < r.high and "75.0%" in str(r)


def test_an_all_or_nothing_share_has_an_interval_that_reaches_exactly_one_or_zero():
    assert wilson_interval(384, 384)[1] == 1.0 and wilson_interval(0, 384)[0] == 0.0
    assert wilson_interval(384, 384)[0] == pytest.approx(0.990095, abs=1e-6)
