"""Honest numbers: standard errors of accuracies and paired comparisons of two models on the same examples.

Accuracy is a mean of 0/1 outcomes, so its standard error is lm-eval's `acc_stderr`: the sample standard
deviation over sqrt(n), i.e. sqrt(p (1 - p) / (n - 1)). The suite's figure is the plain mean of T task
accuracies; the tasks are independent samples, so its standard error is sqrt(sum se_t^2) / T.

Two models scored on the same examples are compared by the per-example difference d = b - a (in {-1, 0, 1}):
its mean is the accuracy difference and its standard error uses the same formula on d. Pairing removes the
variance the two models share (examples both get right or both get wrong), which is most of it, so a paired
difference is often significant where the two unpaired intervals overlap. A paired bootstrap (resampling
examples within each task, the same resample for both models) gives an interval that assumes no normality.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

Outcomes = Mapping[str, Sequence[float]]  # task -> per-example correctness (0/1), in a fixed example order
# BoolQ is a yes/no task whose accuracy a shifted answer prior moves by itself (distilling on BoolQ-style records
# once lifted it 13 points above the unpruned model): every table also gives the average without it.
PRIOR_TASK = "boolq"
WITHOUT_PRIOR = "average w/o boolq"


def _averages(per_task: Mapping) -> dict:
    """{"average": every task, WITHOUT_PRIOR: every task but BoolQ (only when BoolQ and another task are there)}."""
    found = {"average": dict(per_task)}
    if PRIOR_TASK in per_task and len(per_task) > 1:
        found[WITHOUT_PRIOR] = {t: v for t, v in per_task.items() if t != PRIOR_TASK}
    return found


def mean_se(values: Sequence[float]) -> tuple[float, float]:
    """(mean, standard error of the mean) with the n - 1 sample variance, as lm-eval's mean_stderr."""
    n = len(values)
    if n == 0:
        raise ValueError("no values")
    mean = sum(values) / n
    if n == 1:
        return mean, float("nan")
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def ratio_se(parts: Sequence[float], wholes: Sequence[float]) -> float:
    """Standard error of the pooled ratio sum(parts) / sum(wholes) over independent units (e.g. repeated 4-grams
    over all 4-grams, one unit per continuation), by the delta method (the ratio estimator's variance):
    sqrt(n / (n - 1) * sum((part - R * whole)^2)) / sum(wholes). NaN with fewer than two units or no whole."""
    if len(wholes) < 2 or not sum(wholes):
        return float("nan")
    return _se_of_mean(_linearised(parts, wholes))


def paired_ratio_se(a_parts: Sequence[float], a_wholes: Sequence[float], b_parts: Sequence[float],
                    b_wholes: Sequence[float]) -> float:
    """Standard error of the difference of two pooled ratios measured on the same units (two models' repetition on
    the same prompts), by the delta method: each unit's linearised contribution, differenced unit by unit, so what
    the units share cancels. ratio_se of one ratio is the case b = 0. NaN with fewer than two units or no whole."""
    n = len(a_wholes)
    if n < 2 or len(b_wholes) != n or not sum(a_wholes) or not sum(b_wholes):
        return float("nan")
    return _se_of_mean([x - y for x, y in zip(_linearised(a_parts, a_wholes), _linearised(b_parts, b_wholes))])


def _linearised(parts: Sequence[float], wholes: Sequence[float]) -> list[float]:
    """Each unit's contribution to the pooled ratio's error, (part - R * whole) / mean whole: zero-mean, and the
    ratio's delta-method variance is their mean square over n - 1."""
    r, mean_whole = sum(parts) / sum(wholes), sum(wholes) / len(wholes)
    return [(p - r * w) / mean_whole for p, w in zip(parts, wholes)]


def _se_of_mean(units: Sequence[float]) -> float:
    """sqrt(sum(u^2) / (n (n - 1))): the standard error of the mean of zero-mean units."""
    n = len(units)
    return math.sqrt(sum(u * u for u in units) / (n * (n - 1)))


def suite_se(per_task: Outcomes) -> tuple[float, float]:
    """(average of the task means, its standard error): tasks weigh equally whatever their size."""
    stats = [mean_se(v) for v in per_task.values()]
    mean = sum(m for m, _ in stats) / len(stats)
    return mean, math.sqrt(sum(se**2 for _, se in stats)) / len(stats)


def accuracy_table(per_task: Outcomes) -> dict:
    """{task: {"accuracy", "se", "n"}, "average": {"accuracy", "se", "n"}} for one model."""
    out = {t: dict(zip(("accuracy", "se"), mean_se(v)), n=len(v)) for t, v in per_task.items()}
    for name, tasks in _averages(per_task).items():
        avg, se = suite_se(tasks)
        out[name] = {"accuracy": avg, "se": se, "n": sum(len(v) for v in tasks.values())}
    return out


def paired_difference(a: Outcomes, b: Outcomes, *, bootstrap: int = 2000, seed: int = 0) -> dict:
    """b - a per task and for the suite average, each with its paired standard error, a 95% paired-bootstrap
    interval and whether |difference| exceeds two standard errors. Both must hold the same tasks and examples."""
    if list(a) != list(b) or any(len(a[t]) != len(b[t]) for t in a):
        raise ValueError("paired comparison needs the same tasks and the same number of examples per task")
    diffs = {t: [float(y) - float(x) for x, y in zip(a[t], b[t])] for t in a}
    boot = _bootstrap_means(diffs, bootstrap, seed) if bootstrap else None
    out = {}
    for t, d in diffs.items():
        mean, se = mean_se(d)
        out[t] = _verdict(mean, se, boot[t] if boot else None)
    for name, tasks in _averages(diffs).items():
        mean, se = suite_se(tasks)
        out[name] = _verdict(mean, se, boot[name] if boot else None)
    return out


def _verdict(mean: float, se: float, draws: list[float] | None) -> dict:
    found = {"difference": mean, "se": se, "significant": bool(se == se and abs(mean) > 2 * se)}
    if se == 0.0:  # identical on every example: no difference at all, not an infinitely precise one
        found["significant"] = False
    if draws:
        draws = sorted(draws)
        found["ci95"] = [draws[int(0.025 * (len(draws) - 1))], draws[int(0.975 * (len(draws) - 1))]]
    return found


def _bootstrap_means(diffs: Mapping[str, Sequence[float]], iters: int, seed: int) -> dict[str, list[float]]:
    """Bootstrap distribution of each task's mean difference and of their average (examples resampled within
    each task: the suite average weighs tasks equally, so the resample keeps every task's size)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    draws = {}
    for t, d in diffs.items():
        d = np.asarray(d, dtype=np.float64)
        draws[t] = d[rng.integers(0, len(d), size=(iters, len(d)))].mean(axis=1)
    for name, tasks in _averages(diffs).items():
        draws[name] = np.mean([draws[t] for t in tasks], axis=0)
    return {k: v.tolist() for k, v in draws.items()}


def gap_closed(base: float, pruned: float, recovered: float) -> float | None:
    """Share of the pruning gap that recovery closed, (recovered - pruned) / (base - pruned); None without a gap.
    Works for losses too (a negative gap: base lower than pruned)."""
    gap = base - pruned
    return None if gap == 0 else (recovered - pruned) / gap


def outcomes_from_records(records: Sequence[Mapping]) -> dict[str, list[int]]:
    """Per-example correctness by task, in example-index order, from evaluate()'s records."""
    by_task: dict[str, list[tuple[int, int]]] = {}
    for r in records:
        by_task.setdefault(r["task"], []).append((int(r["index"]), int(bool(r["correct"]))))
    return {t: [c for _, c in sorted(v)] for t, v in by_task.items()}
