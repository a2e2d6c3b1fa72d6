"""The summary's generation section: figures per model, three example continuations side by side, and the warning
when the recovered model repeats itself far more than the unpruned one."""
from __future__ import annotations

from pathlib import Path

import pytest

from rora.pipelines.run import PipelineResult
from rora.pipelines.summary import REPETITION_LIMIT, generation_lines, repetition_warning, summary_table


def _quality(repetition: float, texts: list[str]) -> dict:
    sets = ["text", "text", "text", "task"]
    prompts = ["Volcanoes form where", "The engineers tested | the bridge by", "Once", "Is 2 even?"]
    return {"prompts": 4, "repetition": repetition, "distinct_2": 0.5, "reference_ppl": 3.25, "new_tokens": 48,
            "by_set": {"text": {"prompts": 3}, "task": {"prompts": 1}},
            "examples": [{"set": s, "prompt": p, "text": t} for s, p, t in zip(sets, prompts, texts)]}


def _result(base: float, recovered: float) -> PipelineResult:
    result = PipelineResult(out=Path("."))
    result.generation = {
        "base": _quality(base, ["plates meet.", "loading it\nwith trucks.", "upon a time", "true"]),
        "pruned": _quality(0.3, ["the the", "x", "y", "z"]),
        "recovered": _quality(recovered, ["yes, yes, yes", "yes " * 100, "yes", "Yes, yes, yes"]),
    }
    return result


def test_the_summary_shows_the_figures_and_three_examples_side_by_side():
    table = summary_table(_result(0.12, 0.15))
    assert "Generation: greedy continuations (48 new tokens) of held-out prompts (3 text openings, 1 task prompts)" \
        in table
    assert "| model | repetition (% of 4-grams) | text openings / task prompts | distinct-2 | reference perplexity | " \
           "tokens written |" in table
    assert "| base | 12.0 | - / - | 0.500 | 3.25 | - |" in table
    assert "| recovered | 15.0 | - / - | 0.500 | 3.25 | - |" in table
    lines = table.splitlines()
    head = lines.index("| prompt | base | pruned | recovered |")
    rows = lines[head + 2:head + 5]
    assert rows[0] == "| Volcanoes form where | plates meet. | the the | yes, yes, yes |"
    assert rows[1].startswith("| The engineers tested \\| the bridge by | loading it with trucks. | x | yes yes")
    assert rows[1].endswith("… |") and len(rows[1].split(" | ")[3].removesuffix(" |")) == 160
    assert rows[2] == "| Is 2 even? | true | z | Yes, yes, yes |"  # two openings, then a task prompt
    assert "Warning" not in table


def test_warning_when_the_recovered_model_repeats_far_more():
    assert repetition_warning(_result(0.12, REPETITION_LIMIT * 0.12).generation) is None
    warning = repetition_warning(_result(0.12, 0.72).generation)
    assert warning.startswith("Warning: the recovered model repeats itself: 72.0% of its 4-grams are repeats, "
                              "6.00x the unpruned model's 12.0%")
    assert warning in summary_table(_result(0.12, 0.72)).splitlines()
    assert "repeats none" in repetition_warning(_result(0.0, 0.1).generation)
    assert repetition_warning({"recovered": {"repetition": 0.9}}) is None  # nothing to compare with


def _by_set(quality: dict, text: float, task: float, written: int) -> dict:
    quality["by_set"]["text"]["repetition"], quality["by_set"]["task"]["repetition"] = text, task
    quality["counts"] = {"written_tokens": written}
    return quality


def test_each_prompt_set_is_held_to_the_limit():
    """A model that answers the task prompts in a few words and stops has few task 4-grams, so its overall figure is
    its openings': it passes overall (15% against 22%) but repeats 2.6x as much on the openings, and is warned."""
    result = _result(0.22, 0.15)
    _by_set(result.generation["base"], 0.116, 0.337, 186)
    _by_set(result.generation["recovered"], 0.30, 0.0, 101)
    warning = repetition_warning(result.generation)
    assert warning.startswith("Warning: the recovered model repeats itself on the text openings: 30.0% of its 4-grams "
                              "are repeats, 2.59x the unpruned model's 11.6% (the limit is 1.5x).")
    table = summary_table(result)
    assert "| base | 22.0 | 11.6 / 33.7 | 0.500 | 3.25 | 46.5 |" in table  # 186 tokens over 4 continuations
    assert "| recovered | 15.0 | 30.0 / 0.0 | 0.500 | 3.25 | 25.2 |" in table
    _by_set(result.generation["recovered"], 0.17, 0.0, 101)  # within 1.5x on both sets and overall
    assert repetition_warning(result.generation) is None
    _by_set(result.generation["recovered"], 0.17, 0.6, 101)  # the worst offence is the one named
    assert " on the task prompts: 60.0% of its 4-grams are repeats, 1.78x the unpruned model's 33.7%" in \
        repetition_warning(result.generation)


def test_only_text_prompts_give_three_openings():
    g = {"base": _quality(0.1, ["a", "b", "c", "d"])}
    for e in g["base"]["examples"]:
        e["set"] = "text"
    lines = generation_lines(g)
    head = lines.index("| prompt | base |")
    assert lines[head + 2:] == ["| Volcanoes form where | a |", "| The engineers tested \\| the bridge by | b |",
                                "| Once | c |"]


def test_standard_errors_show_in_the_table_and_the_warning():
    result = _result(0.22, 0.15)
    _by_set(result.generation["base"], 0.116, 0.337, 186)
    _by_set(result.generation["recovered"], 0.30, 0.0, 101)
    recovered = result.generation["recovered"]
    recovered["repetition_se"], recovered["by_set"]["text"]["repetition_se"] = 0.021, 0.052
    assert "| recovered | 15.0 ± 2.1 | 30.0 ± 5.2 / 0.0 | 0.500 | 3.25 | 25.2 |" in summary_table(result)
    assert "on the text openings: 30.0 ± 5.2% of its 4-grams are repeats, 2.59x" in \
        repetition_warning(result.generation)


def test_a_share_of_an_accuracy_gap_inside_the_noise_is_not_reported():
    """The pruned model 10 points below the unpruned one on 200 examples of a task is a real gap, and the share
    closed is reported; 1 point on a second task's average is noise, and its share is '-', with the reason."""
    from rora.pipelines.summary import evaluation_statistics

    def outcomes(right: int, n: int = 200) -> list[int]:
        return [1] * right + [0] * (n - right)

    real = {"base": {"piqa": outcomes(120)}, "pruned": {"piqa": outcomes(100)}, "recovered": {"piqa": outcomes(110)}}
    shares = evaluation_statistics(real)["gap_closed"]["recovered"]
    assert shares == {"average": pytest.approx(0.5)}  # (no BoolQ, no second average)
    noise = {label: {"boolq": outcomes(60), "piqa": outcomes(c)} for label, c in
             (("base", 101), ("pruned", 100), ("recovered", 120))}
    noise["pruned"]["boolq"] = outcomes(160)  # BoolQ's gap is large (the other way), the average's too
    stats = evaluation_statistics(noise)
    assert stats["comparisons"]["pruned - base"]["average w/o boolq"]["significant"] is False
    assert stats["gap_closed"]["recovered"]["average w/o boolq"] is None
    assert stats["gap_closed"]["recovered"]["average"] is not None
    result = PipelineResult(out=Path("."))
    result.outcomes = noise
    table = summary_table(result)
    assert "| recovered | " in table and "(accuracy w/o BoolQ: '-', the pruned model's gap" in table
