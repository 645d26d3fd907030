"""The study statistics of agents.metrics: McNemar's exact test against hand-computed p-values and the
literal sum over extreme outcomes, bootstrap intervals against a slow literal loop and the normal
approximation, the paired interval's identities (identical modes give exactly [0, 0]; pairing narrows
the interval of correlated modes), shares, tool-call rates and how a map covers ground-truth regions."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest

from agents.metrics import (
    bootstrap_indices,
    bootstrap_interval,
    bootstrap_means,
    final_line_share,
    mask_mass_shares,
    mcnemar_exact_p,
    mcnemar_test,
    paired_difference_interval,
    region_enrichment,
    region_peaks,
    share,
    tool_call_rates,
)
from api_tool.errors import InvalidParameterError
from tests.tolerances import assert_sums_close


@pytest.mark.parametrize(
    ("b", "c", "p_value"),
    [
        (10, 2, Fraction(2 * (1 + 12 + 66), 2**12)),  # 0.0386
        (2, 10, Fraction(2 * (1 + 12 + 66), 2**12)),  # symmetric
        (0, 5, Fraction(2, 2**5)),  # 0.0625: five changes, all one way
        (1, 7, Fraction(2 * (1 + 8), 2**8)),
        (3, 3, Fraction(1)),  # balanced: capped at 1
        (0, 0, Fraction(1)),  # no discordant pair
        (0, 1, Fraction(1)),
    ],
)
def test_mcnemar_exact_p_on_hand_computed_cases(b: int, c: int, p_value: Fraction) -> None:
    assert mcnemar_exact_p(b, c) == float(p_value)  # dyadic fractions: exact in float64


def test_mcnemar_p_of_10_and_2_is_the_textbook_0_0386() -> None:
    assert round(mcnemar_exact_p(10, 2), 4) == 0.0386


def literal_two_sided_p(b: int, c: int) -> float:
    """The probability, under Binomial(b + c, 1/2), of every outcome at least as unbalanced as (b, c)."""
    n = b + c
    observed = abs(b - c)
    return float(sum(Fraction(math.comb(n, k), 2**n) for k in range(n + 1) if abs(2 * k - n) >= observed))


def test_mcnemar_exact_p_equals_the_literal_sum_over_extreme_outcomes() -> None:
    for b in range(0, 25, 3):
        for c in range(0, 25, 2):
            assert mcnemar_exact_p(b, c) == pytest.approx(literal_two_sided_p(b, c), rel=1e-12)


def test_mcnemar_exact_p_handles_many_discordant_pairs() -> None:
    p = mcnemar_exact_p(600, 500)  # 2**1100 overflows a float, not Python's integers
    assert 0.0 < p < 0.01 and mcnemar_exact_p(550, 550) == 1.0


def test_mcnemar_test_counts_the_discordant_pairs() -> None:
    first = [True, True, True, False, False, True, False]
    second = [True, False, False, True, False, True, False]
    result = mcnemar_test(first, second)
    assert (result.n, result.b, result.c) == (7, 2, 1)
    assert result.p_value == mcnemar_exact_p(2, 1)
    assert result.as_dict() == {"n": 7, "b": 2, "c": 1, "p_value": 1.0}
    with pytest.raises(InvalidParameterError, match="same items"):
        mcnemar_test([True], [True, False])
    with pytest.raises(InvalidParameterError, match="non-negative"):
        mcnemar_exact_p(-1, 2)


def test_bootstrap_interval_of_a_constant_is_degenerate() -> None:
    for value in (0.0, 1.0):
        interval = bootstrap_interval([value] * 17, resamples=500)
        assert interval.estimate == interval.low == interval.high == value


def test_bootstrap_is_reproducible_with_a_seed_and_moves_with_another() -> None:
    values = np.random.default_rng(1).random(50) < 0.6
    same = bootstrap_interval(values, seed=3, resamples=2000)
    assert same == bootstrap_interval(values, seed=3, resamples=2000)
    assert bootstrap_interval(values, seed=4, resamples=2000) != same
    assert same.n == 50 and same.resamples == 2000 and same.seed == 3 and same.level == 0.95


def test_bootstrap_means_equal_a_literal_loop_over_the_same_resamples() -> None:
    values = np.random.default_rng(2).normal(size=37)
    resamples = 2500  # three blocks: 1000, 1000, 500
    fast = bootstrap_means(values, resamples=resamples, seed=5)
    rows = [row for block in bootstrap_indices(len(values), resamples, seed=5) for row in block]
    literal = [sum(values[i] for i in row) / len(row) for row in rows]
    assert len(rows) == resamples
    assert_sums_close(fast, literal, n_terms=len(values), dtype=np.float64)
    interval = bootstrap_interval(values, resamples=resamples, seed=5)
    ordered = sorted(literal)
    position = 0.025 * (resamples - 1)  # numpy's default (linear) quantile, written out
    below = ordered[math.floor(position)]
    low = below + (position - math.floor(position)) * (ordered[math.ceil(position)] - below)
    assert_sums_close(interval.low, low, n_terms=len(values), dtype=np.float64)


def test_bootstrap_interval_of_an_accuracy_matches_the_normal_approximation() -> None:
    correct = np.zeros(400)
    correct[:320] = 1.0  # accuracy 0.8
    interval = bootstrap_interval(correct)
    half_width = 1.959964 * math.sqrt(0.8 * 0.2 / 400)  # 0.0392
    assert interval.estimate == 0.8
    assert interval.low == pytest.approx(0.8 - half_width, abs=0.006)
    assert interval.high == pytest.approx(0.8 + half_width, abs=0.006)


def test_difference_of_identical_modes_is_exactly_zero() -> None:
    correct = np.random.default_rng(3).random(80) < 0.5
    interval = paired_difference_interval(correct, correct)
    assert (interval.estimate, interval.low, interval.high) == (0.0, 0.0, 0.0)
    assert not interval.excludes_zero


def test_paired_difference_estimate_sign_and_significance() -> None:
    plain = [1, 0, 0, 1] * 30
    loop = [1, 1, 0, 1] * 30  # 30 wrong -> right, none lost
    interval = paired_difference_interval(plain, loop)
    assert interval.estimate == 0.25 and interval.excludes_zero and interval.low > 0.15
    reverse = paired_difference_interval(loop, plain)
    assert reverse.estimate == -0.25 and reverse.high < 0


def test_pairing_narrows_the_interval_of_correlated_modes() -> None:
    rng = np.random.default_rng(4)
    first = rng.random(300) < 0.7
    second = first.copy()
    second[:6] = ~second[:6]  # the two modes differ on 6 items only
    paired = paired_difference_interval(first, second)
    unpaired_width = (
        bootstrap_interval(first, seed=1).high
        - bootstrap_interval(first, seed=1).low
        + bootstrap_interval(second, seed=2).high
        - bootstrap_interval(second, seed=2).low
    ) / math.sqrt(2)  # the width of a difference of two independent means
    assert paired.high - paired.low < unpaired_width / 3
    result = mcnemar_test(first, second)
    assert paired.estimate == (result.c - result.b) / 300 and result.b + result.c == 6


def test_bootstrap_rejects_bad_input() -> None:
    with pytest.raises(InvalidParameterError, match="at least one item"):
        bootstrap_interval([])
    with pytest.raises(InvalidParameterError, match="level"):
        bootstrap_interval([1, 0], level=1.0)
    with pytest.raises(InvalidParameterError, match="NaN"):
        bootstrap_interval([1.0, float("nan")])
    with pytest.raises(InvalidParameterError, match="1-D"):
        bootstrap_interval([[1.0, 0.0]])
    with pytest.raises(InvalidParameterError, match="same items"):
        paired_difference_interval([1, 0], [1])
    with pytest.raises(InvalidParameterError, match="resamples"):
        bootstrap_interval([1, 0], resamples=0)


def test_shares_final_lines_and_tool_call_rates() -> None:
    assert share([True, False, True, True]).as_dict() == {"n": 4, "count": 3, "rate": 0.75}
    assert share([]).rate is None
    replies = ["The circle is red.\nFINAL: red", "red", "FINAL:", "**FINAL:** blue", ""]
    assert final_line_share(replies).as_dict() == {"n": 5, "count": 2, "rate": 0.4}
    rates = tool_call_rates([1, 0, 2, 0, 0], ["detail", "whole", "detail", "whole", "detail"])
    assert list(rates) == ["detail", "whole"]
    assert (rates["detail"].count, rates["detail"].n, rates["whole"].count) == (2, 3, 0)
    with pytest.raises(InvalidParameterError, match="groups"):
        tool_call_rates([1], [])


def test_mass_shares_enrichment_and_peaks_on_a_hand_made_map() -> None:
    weights = np.array([[4.0, 0.0, 0.0, 0.0], [0.0, 0.0, 2.0, 0.0], [0.0, 0.0, 0.0, 2.0]])
    masks = np.zeros((3, 3, 4), dtype=bool)
    masks[0, 0, 0] = True  # the peak
    masks[1, 1:, 2:] = True  # four pixels, both 2.0 values
    masks[2, 2, 0] = True  # no mass
    assert mask_mass_shares(weights, masks).tolist() == [0.5, 0.5, 0.0]
    assert region_enrichment(weights, masks).tolist() == [6.0, 1.5, 0.0]  # area shares 1/12, 4/12, 1/12
    assert region_peaks(weights, masks).tolist() == [1.0, 0.5, 0.0]


def test_region_measures_identities() -> None:
    rng = np.random.default_rng(5)
    weights = rng.random((6, 5))
    labels = rng.integers(0, 3, size=(6, 5))
    partition = np.stack([labels == k for k in range(3)])
    assert_sums_close(mask_mass_shares(weights, partition).sum(), 1.0, n_terms=30, dtype=np.float64)
    uniform = np.ones((6, 5))
    assert_sums_close(region_enrichment(uniform, partition), np.ones(3), n_terms=30, dtype=np.float64)
    empty = np.zeros((1, 6, 5), dtype=bool)
    assert region_enrichment(weights, empty).tolist() == [0.0] and region_peaks(weights, empty).tolist() == [0.0]
    assert mask_mass_shares(np.zeros((6, 5)), partition).tolist() == [0.0, 0.0, 0.0]
    with pytest.raises(InvalidParameterError, match="masks must be"):
        mask_mass_shares(weights, partition[:, :5])
    with pytest.raises(InvalidParameterError, match="non-negative"):
        region_peaks(-weights, partition)
