"""Standard errors and paired comparisons against values computed by hand."""
import math

import pytest

from rora.evaluation.stats import (accuracy_table, gap_closed, mean_se, outcomes_from_records, paired_difference,
                                   paired_ratio_se, ratio_se, suite_se)


def test_mean_se_is_lm_evals_acc_stderr():
    # 3 of 4 correct: p = 0.75, sample variance = 4/3 * p(1-p) = 0.25, se = sqrt(0.25 / 4) = 0.25
    assert mean_se([1, 1, 1, 0]) == (0.75, pytest.approx(0.25))
    # 6 of 10: sqrt(0.6 * 0.4 / 9)
    assert mean_se([1] * 6 + [0] * 4)[1] == pytest.approx(math.sqrt(0.24 / 9))
    assert mean_se([1, 1, 1])[1] == 0.0


def test_ratio_se_by_hand_and_as_mean_se_with_equal_wholes():
    # R = 6 / 20 = 0.3; residuals 1 - 3, 5 - 3 = -2, 2: sqrt(2 / 1 * 8) / 20
    assert ratio_se([1, 5], [10, 10]) == pytest.approx(math.sqrt(16) / 20)
    parts = [0, 3, 1, 7, 2]
    assert ratio_se(parts, [8] * 5) == pytest.approx(mean_se([p / 8 for p in parts])[1])
    # Units of different sizes weigh by size: a big unit's share moves the ratio more than a small one's.
    r = 10 / 22
    assert ratio_se([0, 10], [2, 20]) == pytest.approx(math.sqrt(2 * ((0 - r * 2) ** 2 + (10 - r * 20) ** 2)) / 22)
    assert math.isnan(ratio_se([1], [4])) and math.isnan(ratio_se([0, 0], [0, 0]))


def test_paired_ratio_se_by_hand_and_its_special_cases():
    a_parts, b_parts, wholes = [0, 3, 1, 7, 2], [1, 2, 1, 5, 0], [8] * 5
    # equal wholes: the paired se of the per-unit differences of shares
    assert paired_ratio_se(a_parts, wholes, b_parts, wholes) == pytest.approx(
        mean_se([(a - b) / 8 for a, b in zip(a_parts, b_parts)])[1])
    # b all zero: the se of a alone
    assert paired_ratio_se(a_parts, [4, 8, 2, 10, 6], [0] * 5, [3] * 5) == pytest.approx(
        ratio_se(a_parts, [4, 8, 2, 10, 6]))
    # what the units share cancels: b = a plus one repeat in every unit differs by a constant share, se 0
    assert paired_ratio_se(a_parts, wholes, [p + 1 for p in a_parts], wholes) == pytest.approx(0.0, abs=1e-12)
    # by hand, wholes of different sizes: R_a = 3/10, R_b = 4/10, mean whole 5
    ua = [(1 - 0.3 * 4) / 5, (2 - 0.3 * 6) / 5]
    ub = [(2 - 0.4 * 4) / 5, (2 - 0.4 * 6) / 5]
    d = [x - y for x, y in zip(ua, ub)]
    assert paired_ratio_se([1, 2], [4, 6], [2, 2], [4, 6]) == pytest.approx(math.sqrt(sum(v * v for v in d) / 2))
    assert math.isnan(paired_ratio_se([1], [4], [1], [4])) and math.isnan(paired_ratio_se([1, 2], [3, 4], [1], [3]))


def test_suite_average_weighs_tasks_equally():
    per_task = {"a": [1, 1, 1, 0], "b": [1] * 6 + [0] * 4}
    avg, se = suite_se(per_task)
    assert avg == pytest.approx((0.75 + 0.6) / 2)
    assert se == pytest.approx(math.sqrt(0.25**2 + 0.24 / 9) / 2)
    table = accuracy_table(per_task)
    assert table["a"] == {"accuracy": 0.75, "se": pytest.approx(0.25), "n": 4}
    assert table["average"]["n"] == 14 and table["average"]["se"] == pytest.approx(se)


def test_paired_difference_by_hand():
    a = {"t": [1, 0, 0, 1, 0, 1, 0, 0]}
    b = {"t": [1, 1, 1, 1, 0, 1, 1, 0]}
    # d = [0, 1, 1, 0, 0, 0, 1, 0]: mean 3/8, sample var = (3 * (5/8)^2 + 5 * (3/8)^2) / 7 = 15/56
    res = paired_difference(a, b, bootstrap=0)
    assert res["t"]["difference"] == pytest.approx(0.375)
    assert res["t"]["se"] == pytest.approx(math.sqrt(15 / 56 / 8))
    assert res["t"]["significant"] is True  # 0.375 > 2 * 0.183
    assert res["average"]["difference"] == pytest.approx(0.375)
    assert "ci95" not in res["t"]


def test_pairing_finds_what_unpaired_intervals_miss():
    # b fixes 12 of a's 60 misses on 100 shared examples and breaks none: unpaired intervals overlap, pairing does not
    a = {"t": [1] * 40 + [0] * 60}
    b = {"t": [1] * 52 + [0] * 48}
    unpaired = math.hypot(mean_se(a["t"])[1], mean_se(b["t"])[1])
    assert 0.12 < 2 * unpaired  # inside the unpaired noise
    res = paired_difference(a, b, bootstrap=500, seed=1)
    assert res["t"]["significant"] is True
    low, high = res["t"]["ci95"]
    assert 0.0 < low < 0.12 < high < 0.25


def test_identical_models_are_not_significant_and_sizes_must_match():
    a = {"t": [1, 0, 1]}
    res = paired_difference(a, a, bootstrap=100)
    assert res["t"] == {"difference": 0.0, "se": 0.0, "significant": False, "ci95": [0.0, 0.0]}
    with pytest.raises(ValueError):
        paired_difference(a, {"t": [1, 0]})


def test_bootstrap_is_seeded_and_brackets_the_average():
    a = {"x": [0, 1] * 30, "y": [1, 0, 0] * 20}
    b = {"x": [1, 1] * 30, "y": [1, 1, 0] * 20}
    one, two = paired_difference(a, b, seed=3), paired_difference(a, b, seed=3)
    assert one == two
    low, high = one["average"]["ci95"]
    assert low <= one["average"]["difference"] <= high


def test_gap_closed_for_accuracy_and_loss():
    assert gap_closed(0.50, 0.40, 0.45) == pytest.approx(0.5)
    assert gap_closed(3.0, 7.0, 4.0) == pytest.approx(0.75)  # a loss: lower is better, same formula
    assert gap_closed(0.5, 0.5, 0.6) is None


def test_outcomes_from_records_orders_by_index():
    records = [{"task": "a", "index": 1, "correct": False}, {"task": "a", "index": 0, "correct": True},
               {"task": "b", "index": 0, "correct": True}]
    assert outcomes_from_records(records) == {"a": [1, 0], "b": [1]}
