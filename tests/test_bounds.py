"""Tests for locmoe_plugin.bounds (LocMoE Theorem 1 capacity bounds)."""

from __future__ import annotations

import itertools
import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from locmoe_plugin.bounds import (
    capacity_bounds,
    ec_min_erfc,
    ec_min_exact,
    ec_min_exp,
    p_delta,
    regularized_incomplete_beta,
)


# ---------------------------------------------------------------------------
# Check values from the LocMoE setting: d = 5120, n = 16, delta = 0.03
# ---------------------------------------------------------------------------


def test_check_values_exact_and_erfc():
    assert ec_min_exact(0.03, 5120, 16) == pytest.approx(1.9648, rel=1e-4)
    assert ec_min_erfc(0.03, 5120, 16) == pytest.approx(1.9664, rel=1e-4)
    # 4-decimal rounding of the published values
    assert round(ec_min_exact(0.03, 5120, 16), 4) == 1.9648
    assert round(ec_min_erfc(0.03, 5120, 16), 4) == 1.9664


def test_check_values_consistency():
    b = capacity_bounds(0.03, 5120, 16)
    assert set(b) == {
        "p_delta", "ec_min_exact", "ec_min_erfc", "ec_min_exp",
        "hidden_size", "num_experts", "delta",
    }
    assert b["hidden_size"] == 5120 and b["num_experts"] == 16 and b["delta"] == 0.03
    assert b["ec_min_exact"] == pytest.approx(1.0 / (16 * b["p_delta"]), rel=1e-15)
    assert b["ec_min_exp"] == pytest.approx(
        math.exp(0.03**2 * 5120 / (2 - 0.03**2)) / 16, rel=1e-15
    )
    json.dumps(b)  # JSON-serialisable


@pytest.mark.parametrize("d", [256, 1024, 4096, 5120, 8192])
@pytest.mark.parametrize("delta", [0.01, 0.03, 0.05])
@pytest.mark.parametrize("n", [1, 8, 64])
def test_exact_exceeds_exp_form(delta, d, n):
    assert ec_min_exact(delta, d, n) > ec_min_exp(delta, d, n)
    # erfc(z) <= exp(-z^2): the exp form is never above the erfc form
    assert ec_min_exp(delta, d, n) <= ec_min_erfc(delta, d, n)


@pytest.mark.parametrize(
    "delta,d,rel",
    [(0.03, 5120, 1e-3), (0.01, 16384, 1e-3), (0.02, 65536, 2e-3), (0.005, 1_000_000, 1e-3)],
)
def test_erfc_close_to_exact_for_large_d(delta, d, rel):
    assert ec_min_erfc(delta, d, 16) == pytest.approx(ec_min_exact(delta, d, 16), rel=rel)


def test_p_delta_closed_forms():
    # d = 2: angle uniform on the circle -> P(|cos| >= t) = 1 - (2/pi) asin(t)
    for t in (0.1, 0.5, 0.9):
        assert p_delta(t, 2) == pytest.approx(1 - 2 / math.pi * math.asin(t), rel=1e-13)
    # d = 3: cos uniform on [-1, 1] (Archimedes) -> P(|cos| >= t) = 1 - t
    for t in (0.03, 0.5, 0.99):
        assert p_delta(t, 3) == pytest.approx(1 - t, rel=1e-13)


def test_underflow_gives_inf():
    assert p_delta(0.9, 100_000) == 0.0
    b = capacity_bounds(0.9, 100_000, 16)
    assert b["ec_min_exact"] == math.inf
    assert b["ec_min_erfc"] == math.inf
    assert b["ec_min_exp"] == math.inf


def test_tiny_upper_tail_keeps_relative_accuracy():
    # 1 - CDF would round to 0 here; the tail is computed directly.
    p = p_delta(0.5, 1000)
    assert 0.0 < p < 1e-50
    assert math.isfinite(ec_min_exact(0.5, 1000, 16))


# ---------------------------------------------------------------------------
# Regularised incomplete beta against scipy
# ---------------------------------------------------------------------------

_A = [0.5, 1.0, 2.5]
_B = [0.5, 3.0, 100.0, 2559.5, 1e5]
_X = [0.0, 1e-6, 1e-3, 0.01, 0.3, 0.5, 0.9, 1.0]


@pytest.mark.parametrize("a,b", list(itertools.product(_A, _B)))
def test_betainc_matches_scipy(a, b):
    special = pytest.importorskip("scipy.special")
    for x in _X:
        ours = regularized_incomplete_beta(a, b, x)
        ref = float(special.betainc(a, b, x))
        assert ours == pytest.approx(ref, rel=1e-10, abs=1e-300), (a, b, x)


@pytest.mark.parametrize("b", [2559.5, 1e5, 1e6])
def test_betainc_large_b_near_mean_matches_scipy(b):
    special = pytest.importorskip("scipy.special")
    a = 0.5
    mean = (a + 1) / (a + b + 2)  # symmetry-switch point
    for f in (0.05, 0.5, 0.99, 1.0, 1.01, 2.0, 5.0, 20.0):
        x = f * mean
        ours = regularized_incomplete_beta(a, b, x)
        assert ours == pytest.approx(float(special.betainc(a, b, x)), rel=1e-11), (b, x)
        # the upper tail, as p_delta uses it
        if b == 2559.5:
            tail = p_delta(math.sqrt(x), 5120)
            assert tail == pytest.approx(float(special.betaincc(a, b, x)), rel=1e-11), x


def test_betainc_edges_and_symmetry():
    assert regularized_incomplete_beta(0.5, 3.0, 0.0) == 0.0
    assert regularized_incomplete_beta(0.5, 3.0, 1.0) == 1.0
    # x chosen so that 1 - x is exact in binary floating point
    for a, b, x in [(0.5, 2559.5, 2.0**-12), (2.5, 3.0, 0.75), (1.0, 1.0, 0.25)]:
        s = regularized_incomplete_beta(a, b, x) + regularized_incomplete_beta(b, a, 1 - x)
        assert s == pytest.approx(1.0, abs=1e-14)
    # Beta(1, 1) is uniform
    assert regularized_incomplete_beta(1.0, 1.0, 0.37) == pytest.approx(0.37, rel=1e-14)


@pytest.mark.parametrize(
    "args,match",
    [
        ((0.5, 3.0, -0.1), r"x must be in \[0, 1\]"),
        ((0.5, 3.0, 1.5), r"x must be in \[0, 1\]"),
        ((0.5, 3.0, float("nan")), r"x must be in \[0, 1\]"),
        ((0.0, 3.0, 0.5), r"a must be a finite number > 0"),
        ((-1.0, 3.0, 0.5), r"a must be a finite number > 0"),
        ((0.5, 0.0, 0.5), r"b must be a finite number > 0"),
        ((0.5, float("inf"), 0.5), r"b must be a finite number > 0"),
    ],
)
def test_betainc_invalid(args, match):
    with pytest.raises(ValueError, match=match):
        regularized_incomplete_beta(*args)


def test_betainc_nonconvergence_raises(monkeypatch):
    import locmoe_plugin.bounds as bounds

    monkeypatch.setattr(bounds, "_MAX_ITER", 2)
    with pytest.raises(ArithmeticError, match="did not converge"):
        bounds.regularized_incomplete_beta(0.5, 2559.5, 5e-4)


# ---------------------------------------------------------------------------
# Monotonicity (property test)
# ---------------------------------------------------------------------------

_delta = st.floats(min_value=1e-4, max_value=0.999, allow_nan=False, allow_infinity=False)


@settings(max_examples=150, deadline=None)
@given(d1=_delta, d2=_delta, d=st.integers(min_value=2, max_value=200_000),
       n=st.integers(min_value=1, max_value=1024))
def test_monotone_in_delta(d1, d2, d, n):
    lo, hi = min(d1, d2), max(d1, d2)
    p_lo, p_hi = p_delta(lo, d), p_delta(hi, d)
    assert 0.0 <= p_hi <= p_lo <= 1.0
    if hi - lo > 1e-6 * hi and p_hi > 1e-300:
        assert p_hi < p_lo
    e_lo, e_hi = ec_min_exact(lo, d, n), ec_min_exact(hi, d, n)
    assert e_lo <= e_hi
    assert ec_min_erfc(lo, d, n) <= ec_min_erfc(hi, d, n)
    assert ec_min_exp(lo, d, n) <= ec_min_exp(hi, d, n)


# ---------------------------------------------------------------------------
# Monte Carlo on the unit sphere
# ---------------------------------------------------------------------------


def _mc_share(d: int, deltas, samples: int, seed: int, chunk: int = 25_000):
    """Share of uniform unit vectors in R^d with |cos| >= delta to e_0."""
    torch = pytest.importorskip("torch")
    g = torch.Generator().manual_seed(seed)
    # float32 draws into one reused buffer: float64 randn and fresh
    # allocations are several times slower on CPU
    buf = torch.empty(chunk, d, dtype=torch.float32)
    counts = [0] * len(deltas)
    done = 0
    while done < samples:
        m = min(chunk, samples - done)
        v = buf[:m]
        torch.randn(m, d, generator=g, out=v)
        c0 = (v[:, 0] / v.norm(dim=1)).abs()  # |cos| to the gate vector e_0
        for i, t in enumerate(deltas):
            counts[i] += int((c0 >= t).sum())
        done += m
    return [c / samples for c in counts]


def _assert_within_4se(q_hat, p, samples):
    se = math.sqrt(p * (1 - p) / samples)
    assert abs(q_hat - p) <= 4 * se, (q_hat, p, se)


def test_monte_carlo_d64():
    deltas = (0.1, 0.2, 0.3)
    samples = 200_000
    shares = _mc_share(64, deltas, samples, seed=1234)
    for t, q_hat in zip(deltas, shares):
        _assert_within_4se(q_hat, p_delta(t, 64), samples)


def test_monte_carlo_d512():
    samples = 100_000  # p ~ 0.024, 4 SE ~ 8 % of p
    (q_hat,) = _mc_share(512, (0.1,), samples, seed=99)
    _assert_within_4se(q_hat, p_delta(0.1, 512), samples)


# ---------------------------------------------------------------------------
# Input validation
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [1.5, 0.0, 1.0, -0.2, float("nan")])
def test_invalid_delta(bad):
    for fn, args in [
        (p_delta, (bad, 5120)),
        (ec_min_exact, (bad, 5120, 16)),
        (ec_min_erfc, (bad, 5120, 16)),
        (ec_min_exp, (bad, 5120, 16)),
        (capacity_bounds, (bad, 5120, 16)),
    ]:
        with pytest.raises(ValueError) as ei:
            fn(*args)
        msg = str(ei.value)
        assert "outside (0, 1)" in msg
        assert "cosine similarity threshold" in msg
        assert "~0.03" in msg


def test_invalid_delta_exact_message():
    with pytest.raises(ValueError) as ei:
        p_delta(1.5, 5120)
    assert str(ei.value) == (
        "delta 1.5 is outside (0, 1): delta is a cosine similarity threshold; "
        "the LocMoE paper measured ~0.03"
    )


@pytest.mark.parametrize("bad", ["x", None, True])
def test_delta_not_a_number(bad):
    with pytest.raises(ValueError, match="cosine similarity threshold"):
        p_delta(bad, 5120)


@pytest.mark.parametrize("bad", [1, 0, -5, 2.5, "5120", None, True])
def test_invalid_hidden_size(bad):
    with pytest.raises(ValueError, match=r"hidden size d must be an integer >= 2"):
        ec_min_exact(0.03, bad, 16)
    with pytest.raises(ValueError, match=r"hidden size d must be an integer >= 2"):
        p_delta(0.03, bad)


@pytest.mark.parametrize("bad", [0, -1, 1.5, "16", None, False])
def test_invalid_num_experts(bad):
    for fn in (ec_min_exact, ec_min_erfc, ec_min_exp, capacity_bounds):
        with pytest.raises(ValueError, match=r"number of experts n must be an integer >= 1"):
            fn(0.03, 5120, bad)


def test_integral_float_sizes_accepted():
    assert ec_min_exact(0.03, 5120.0, 16.0) == ec_min_exact(0.03, 5120, 16)
