"""Generation quality: repetition and distinct-2 on hand-made texts (exact values), the reference perplexity against
a hand computation, the held-out prompts, and the figures in evaluate() and `rora eval`."""
from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner
from conftest import make_model

from rora.artifacts import save_model_dir
from rora.cli import main
from rora.config import EvalConfig
from rora.errors import ConfigError
from rora.evaluation.evaluate import evaluate
from rora.evaluation.quality import (OPENINGS, distinct, generation_quality, quality_prompts, reference_perplexity,
                                     repetition, words)
from rora.evaluation.tasks import eval_prompt
from rora.evaluation.text import generate_text

pytestmark = pytest.mark.usefixtures("one_thread")


def test_words_are_lowercased_words_and_punctuation():
    assert words("Yes, yes!  It's 42.") == ["yes", ",", "yes", "!", "it", "'", "s", "42", "."]


@pytest.mark.parametrize("texts, expected", [
    (["a b c d a b c d"], (1, 5)),  # abcd bcda cdab dabc abcd: the last repeats the first
    (["Yes, yes, yes, yes"], (2, 4)),  # "yes , yes ," and ", yes , yes" each come twice
    (["a b c d a b c d", "one two three"], (1, 5)),  # pooled; a text shorter than 4 words has no 4-gram
    (["the cat sat on the mat"], (0, 3)),
    (["one two", ""], (0, 0)),
])
def test_repetition_counts_repeated_4grams(texts, expected):
    found = repetition(texts)
    assert (found["repeated"], found["ngrams"]) == expected
    assert found["repetition"] == (expected[0] / expected[1] if expected[1] else None)


def test_repetition_has_a_standard_error_over_continuations():
    # Per continuation: 1 of 5 repeated, 0 of 3: R = 1 / 8; residuals 1 - 5/8, 0 - 3/8.
    found = repetition(["a b c d a b c d", "the cat sat on the mat"])
    assert found["se"] == pytest.approx(math.sqrt(2 * ((3 / 8) ** 2 + (3 / 8) ** 2)) / 8)
    assert repetition(["a b c d a b c d"])["se"] is None  # one continuation: no spread to measure
    assert repetition(["a b c d"] * 3)["se"] == 0.0


def test_distinct_2_is_across_all_continuations():
    # (a b) (b a) (a b) + (a b) (b c): 3 distinct of 5
    assert distinct(["a b a b", "a b c"]) == {"distinct": 0.6, "unique": 3, "ngrams": 5}
    assert distinct(["x y", "x y"])["distinct"] == 0.5  # the same text for every prompt counts against it
    assert distinct(["x"])["distinct"] is None


@torch.no_grad()
def test_reference_perplexity_is_the_hand_computed_one(tokenizer):
    model, reference = make_model(), make_model(seed=1)
    written = generate_text(model, tokenizer, ["The capital of France is", "A cat sat on the mat and"],
                            {"max_new_tokens": 7})
    nll, tokens = 0.0, 0
    for g in written:
        ids = torch.tensor([g.prompt_ids + g.new_ids])
        logprobs = torch.log_softmax(reference(ids).logits[0].double(), -1)
        for j, token in enumerate(g.new_ids):
            nll -= float(logprobs[len(g.prompt_ids) + j - 1, token])
        tokens += len(g.new_ids)
    found = reference_perplexity(reference, written)
    assert found["tokens"] == tokens
    assert found["nll"] == pytest.approx(nll / tokens, rel=1e-5)
    assert found["perplexity"] == pytest.approx(math.exp(nll / tokens), rel=1e-5)


def test_held_out_prompts_are_openings_then_task_prompts_without_answers():
    records = [{"instruction": f"Is {i} even?", "input": "", "output": "the correct answer is SECRET",
                "answer": "SECRET"} for i in range(5)]
    found = quality_prompts(records, 3)
    assert [p["set"] for p in found] == ["text"] * 3 + ["task"] * 3
    assert [p["text"] for p in found[:3]] == list(OPENINGS[:3])
    assert found[3] == {"set": "task", "prompt": "Is 0 even?", "text": eval_prompt("Is 0 even?")}
    assert not any("SECRET" in p["text"] for p in found)
    assert len(quality_prompts(None, 100)) == len(OPENINGS) == 48 == len(set(OPENINGS))


def test_generation_quality_figures_and_examples(tokenizer):
    model, reference = make_model(), make_model(seed=1)
    records = [{"instruction": "Is the sky blue?"}, {"instruction": "Is grass red?"}]
    q = generation_quality(model, tokenizer, reference, records, prompts=2, new_tokens=6)
    written = generate_text(model, tokenizer, [p["text"] for p in quality_prompts(records, 2)],
                            {"max_new_tokens": 6, "chat": False})
    texts = [g.text for g in written]
    assert q["prompts"] == 4 and q["new_tokens"] == 6 and [e["text"] for e in q["examples"]] == texts
    assert [e["prompt"] for e in q["examples"]] == [*OPENINGS[:2], "Is the sky blue?", "Is grass red?"]
    assert q["repetition"] == repetition(texts)["repetition"] and q["distinct_2"] == distinct(texts)["distinct"]
    assert q["reference_ppl"] == pytest.approx(reference_perplexity(reference, written)["perplexity"])
    assert q["counts"]["written_tokens"] == sum(len(g.new_ids) for g in written)
    assert q["by_set"]["text"]["prompts"] == q["by_set"]["task"]["prompts"] == 2
    assert q["by_set"]["text"]["distinct_2"] == distinct(texts[:2])["distinct"]
    # the sets pool their own continuations' scores (each continuation is scored once, for both figures)
    for name, part in (("text", written[:2]), ("task", written[2:])):
        assert q["by_set"][name]["reference_ppl"] == pytest.approx(reference_perplexity(reference, part)["perplexity"])
    # Without a reference the model scores its own text; a reference with another vocabulary is refused.
    self_scored = generation_quality(model, tokenizer, None, None, prompts=2, new_tokens=6)
    assert self_scored["reference_ppl"] == pytest.approx(reference_perplexity(model, written[:2])["perplexity"])
    assert set(self_scored["by_set"]) == {"text"}
    with pytest.raises(ConfigError, match="vocabulary"):
        generation_quality(model, tokenizer, make_model(vocab=400), prompts=1, new_tokens=2)


@pytest.fixture
def eval_data(tmp_path):
    (tmp_path / "data" / "boolq").mkdir(parents=True)
    (tmp_path / "data" / "boolq" / "test.json").write_text(json.dumps(
        [{"instruction": f"Is {i} even?\n\nAnswer format: true/false", "input": "", "output": "", "answer": "true"}
         for i in range(2)]))
    return tmp_path / "data"


def test_evaluate_reports_generation_quality(tokenizer, eval_data, tmp_path):
    model, reference = make_model(), make_model(seed=1)
    cfg = EvalConfig(tasks=["boolq"], generation_prompts=2, generation_tokens=5)
    res = evaluate(model, tokenizer, cfg, data_dir=eval_data, out=tmp_path / "r.json", progress=False,
                   reference=reference, reference_name="the base")
    assert res.generation == generation_quality(model, tokenizer, reference, prompts=2, new_tokens=5)
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["generation"]["repetition"] == res.generation["repetition"] and data["reference"] == "the base"
    assert "generation: 2 held-out prompts, 5 greedy tokens each" in (tmp_path / "r.md").read_text()
    off = evaluate(model, tokenizer, cfg.replace(generation=False), data_dir=eval_data, progress=False)
    assert off.generation is None and "generation" not in off.to_markdown()


def test_cli_eval_scores_a_pruned_model_against_the_unpruned_one(tokenizer, eval_data, tmp_path):
    from rora.models import load_model

    save_model_dir(make_model(heads=4, kv_heads=2), tokenizer, tmp_path / "model")
    pruned = tmp_path / "pruned"
    assert CliRunner().invoke(main, ["prune", str(tmp_path / "model"), "--ratio", "0.5", "--importance", "l2",
                                     "--out", str(pruned)]).exit_code == 0
    args = ["eval", str(pruned), "--tasks", "boolq", "--data-dir", str(eval_data), "--generation-prompts", "2",
            "--generation-tokens", "5"]
    result = CliRunner().invoke(main, args + ["--out", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["reference"] == str(tmp_path / "model")  # the model the pruned one was made from
    (m, tok), (base, _) = load_model(pruned), load_model(tmp_path / "model")
    assert data["generation"]["reference_ppl"] == pytest.approx(
        generation_quality(m, tok, base, prompts=2, new_tokens=5)["reference_ppl"])
    assert f"under {tmp_path / 'model'}" in result.output
    itself = CliRunner().invoke(main, args + ["--reference", str(pruned), "--out", str(tmp_path / "s.json")])
    assert itself.exit_code == 0 and json.loads((tmp_path / "s.json").read_text())["reference"] == str(pruned)
