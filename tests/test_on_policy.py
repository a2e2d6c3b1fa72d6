"""On-policy distillation: the prompts it continues, the positions its KL covers, what the student writes at each
step (its own greedy text), the no-repeat teacher, exact resume, and bad settings."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import (assert_sigkill_resume_is_bit_identical, even_odd_records, make_model, recover_worker,
                      save_student_and_teacher, tiny_recover_config)

from rora.config import RecoverConfig
from rora.errors import ConfigError
from rora.writing import continue_ids, writing_settings
from rora.recovery.data import IGNORE_INDEX, Example, collate, tokenize_record
from rora.recovery.distill import DistillLoss
from rora.recovery.on_policy import PREFIX_TOKENS, prompt_of, step_prompts
from rora.recovery.trainer import recover

pytestmark = pytest.mark.usefixtures("one_thread")


def kd_config(**kw):
    return tiny_recover_config(**{"objective": "kd", "on_policy": 2, "on_policy_tokens": 6, **kw})


def test_prompts_are_a_records_prompt_or_a_texts_first_tokens(tokenizer):
    record = tokenize_record({"instruction": "Is the sky blue?", "input": "", "output": "the correct answer is true"},
                             tokenizer, 256, train_on_inputs=False)
    n_prompt = record.labels.index(next(t for t in record.labels if t != IGNORE_INDEX))
    assert prompt_of(record, 256) == record.input_ids[:n_prompt] and 0 < n_prompt < len(record)
    assert prompt_of(record, 3) == record.input_ids[n_prompt - 3:n_prompt]  # the end of a long prompt: where it writes
    text = Example(input_ids=list(range(40)), labels=list(range(40)))
    assert prompt_of(text, 256) == list(range(PREFIX_TOKENS))
    train = [Example(input_ids=[i] * 20, labels=[i] * 20) for i in range(5)]
    one, again = step_prompts(train, 7, 3, 0, 0, 256), step_prompts(train, 7, 3, 0, 0, 256)
    assert one == again and len(one) == 7 and {p[0] for p in one[:5]} == set(range(5))  # seeded, each once, cycled
    assert step_prompts(train, 7, 3, 1, 0, 256) != one and step_prompts(train, 7, 3, 0, 1, 256) != one


def test_written_kl_covers_exactly_the_written_tokens(tokenizer):
    """DistillLoss(written=True) is the full-logit KL summed over the positions that predict a written token."""
    from peft import get_peft_model

    from rora.recovery.methods import peft_config

    teacher, student = make_model(seed=4).eval(), make_model(seed=0)
    pm = get_peft_model(student, peft_config(RecoverConfig(rank=4, dropout=0.0), student)).eval()
    # prompts 5 6 7 and 11 12, written 8 9 and 13 14 15 16 17: labels on the written tokens only
    batch = [Example([5, 6, 7, 8, 9], [IGNORE_INDEX] * 3 + [8, 9]),
             Example([11, 12, 13, 14, 15, 16, 17], [IGNORE_INDEX] * 2 + [13, 14, 15, 16, 17])]
    ids, labels = collate(batch, tokenizer.pad_token_id)
    kd, sft, _ = DistillLoss(pm, teacher, 1.0, 4, sft=True)(ids, labels, torch.tensor([5, 7]), written=True)
    with torch.no_grad():
        log_s, log_t = pm(input_ids=ids).logits.log_softmax(-1), teacher(input_ids=ids).logits.log_softmax(-1)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1)
    positions = [(0, 2), (0, 3), (1, 1), (1, 2), (1, 3), (1, 4), (1, 5)]  # each predicts a written token
    assert torch.allclose(kd, sum(kl[b, j] for b, j in positions), rtol=1e-4) and sft == 0


def test_the_student_writes_greedily_at_every_step(tokenizer, monkeypatch, tmp_path):
    """Each step trains on what the student, as it is then, writes from that step's prompts; at step 0 that is the
    bare student's own greedy text (a new adapter changes nothing yet)."""
    import rora.recovery.trainer as trainer

    teacher, student = make_model(seed=4), make_model(seed=0)
    bare = copy.deepcopy(student).eval()
    cfg = kd_config(max_steps=6)
    written, original = [], trainer._Run.written_batch

    def spy(self):
        batch = original(self)
        written.append(copy.deepcopy(batch))
        return batch

    monkeypatch.setattr(trainer._Run, "written_batch", spy)
    result = recover(student, tokenizer, even_odd_records(40), cfg, tmp_path / "out", progress=False, teacher=teacher)
    train = trainer._training_data(even_odd_records(40), tokenizer, cfg).train
    assert len(written) == 6 and all(len(batch) == 2 for batch in written)
    for step, batch in enumerate(written):
        prompts = step_prompts(train, 2, cfg.seed, step, 0, cfg.cutoff_len - 6)
        assert [e.input_ids[:len(p)] for e, p in zip(batch, prompts)] == prompts
        assert all(e.labels[:len(p)] == [IGNORE_INDEX] * len(p) and e.labels[len(p):] == e.input_ids[len(p):]
                   and 0 < len(e) - len(p) <= 6 for e, p in zip(batch, prompts))
    settings, stops = writing_settings(bare, tokenizer, {"max_new_tokens": 6, "temperature": 0.0})
    prompts = step_prompts(train, 2, cfg.seed, 0, 0, cfg.cutoff_len - 6)
    assert [e.input_ids[len(p):] for e, p in zip(written[0], prompts)] == \
        [new for new, _ in continue_ids(bare, prompts, settings, stops, 2)]
    logged = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in logged if "loss" in r]
    assert len(steps) == 6 and all(r["written_kl"] > 0 for r in steps)
    figures = {"continuations": 2, "new_tokens": 6, "no_repeat": 0, "written_kl_first": steps[0]["written_kl"],
               "written_kl_last": steps[-1]["written_kl"]}
    assert result.on_policy == figures
    assert json.loads((tmp_path / "out" / "rora.json").read_text())["report"]["on_policy"] == figures
    from rora.pipelines.summary import recovery_lines

    line = recovery_lines({"lr": 5e-3, "on_policy": {**figures, "no_repeat": 4}})[-1]
    assert line.startswith("- on-policy distillation: the student wrote 2 greedy continuations of 6 tokens at every "
                           "step, graded by the teacher without repeating a 4-gram") and \
        f"{figures['written_kl_first']:.3f} -> {figures['written_kl_last']:.3f}" in line


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return save_student_and_teacher(tmp_path_factory.mktemp("on-policy-worker"), even_odd_records(40))


def test_a_killed_run_resumes_bit_identically(saved, tmp_path):
    # The resumed run writes, at each step, what the uninterrupted one wrote: same adapter, same prompts.
    cfg = kd_config(max_steps=8, on_policy_no_repeat=3).to_dict()
    worker = lambda out, **env: recover_worker(saved, saved / "student", saved / "teacher", out, cfg, **env)  # noqa: E731
    full, resumed = assert_sigkill_resume_is_bit_identical(worker, tmp_path / "full", tmp_path / "killed", steps=8)
    assert resumed["val_metrics"] == full["val_metrics"]


@pytest.mark.parametrize("settings, match", [
    ({"on_policy": 4, "objective": "sft"}, "needs objective kd"),
    ({"on_policy": 4, "on_policy_tokens": 256}, "less than recover.cutoff_len"),
    ({"on_policy": -2}, "on_policy"),
])
def test_bad_on_policy_settings_are_refused(settings, match):
    with pytest.raises(ConfigError, match=match):
        RecoverConfig(**{"micro_batch_size": 2, "batch_size": 4, "cutoff_len": 256, **settings})


def test_on_policy_without_a_teacher_is_refused_before_anything_is_written(tokenizer, tmp_path):
    with pytest.raises(ConfigError, match="needs objective kd"):  # no teacher: the objective resolves to sft
        recover(make_model(seed=0), tokenizer, even_odd_records(20), tiny_recover_config(on_policy=2), tmp_path / "o",
                progress=False)
    assert not (tmp_path / "o").exists()


def test_repeat_bans_leave_out_what_would_repeat_an_ngram_of_the_continuation():
    from rora.recovery.on_policy import repeat_bans

    # row 0: prompt 7 7 7, written 1 2 3 1 2 3; row 1: prompt 5, written 4 4 4 4
    ids = torch.tensor([[7, 7, 7, 1, 2, 3, 1, 2, 3, 0], [5, 4, 4, 4, 4, 0, 0, 0, 0, 0]])
    keep = torch.zeros(2, 9, dtype=torch.bool)
    keep[0, 2:8] = True  # positions 2..7 predict the written tokens (kept rows 0..5)
    keep[1, 0:4] = True  # positions 0..3 predict 4 4 4 4 (kept rows 6..9)
    bans = repeat_bans(ids, keep, 3).tolist()
    # Row 0, position 7 (after the written "1 2"): "1 2" was followed by 3 -> 3 is left out (kept row 5); the
    # prompt's "7 7 7" never counts. Row 1, position 3: "4 4" was followed by 4 at position 2 -> 4 (kept row 9).
    assert bans == [[5, 3], [9, 4]]
    assert repeat_bans(ids, torch.zeros(2, 9, dtype=torch.bool), 3).shape == (0, 2)


def test_banned_kl_is_the_kl_to_the_renormalised_teacher(tokenizer):
    from rora.recovery.distill import chunked_kl

    torch.manual_seed(0)
    head, t_head = torch.nn.Linear(8, 20, bias=False), torch.nn.Linear(8, 20, bias=False)
    hidden = torch.randn(6, 8, requires_grad=True)
    t_hidden = torch.randn(6, 8)
    bans = torch.tensor([[1, 3], [1, 7], [4, 0]])
    got, _ = chunked_kl(hidden, head, t_hidden, t_head, 1.0, 4, bans)  # chunk 4: the bans span two chunks
    got.backward()
    grad = hidden.grad.clone()
    hidden.grad = None
    t_logits = t_head(t_hidden).detach()
    t_logits[bans[:, 0], bans[:, 1]] = float("-inf")
    log_t, log_s = t_logits.log_softmax(-1), head(hidden).log_softmax(-1)
    p_t = log_t.exp()
    want = torch.where(p_t > 0, p_t * (log_t - log_s), torch.zeros(())).sum()
    want.backward()
    assert torch.allclose(got, want, rtol=1e-5) and torch.allclose(grad, hidden.grad, atol=1e-6)


def test_cli_recover_reports_on_policy(saved, tmp_path):
    from click.testing import CliRunner

    from rora.cli import main

    out = tmp_path / "rec"
    result = CliRunner().invoke(main, [
        "recover", str(saved / "student"), "--teacher", str(saved / "teacher"), "--data", str(saved / "data.json"),
        "--out", str(out), "--rank", "4", "--max-steps", "2", "--batch-size", "4", "--micro-batch-size", "2",
        "--val-set-size", "8", "--lr", "5e-3", "--on-policy", "2", "--on-policy-tokens", "5",
        "--on-policy-no-repeat", "3"])
    assert result.exit_code == 0, result.output
    figures = json.loads((out / "rora.json").read_text())["report"]["on_policy"]
    assert figures["continuations"] == 2 and figures["new_tokens"] == 5 and figures["no_repeat"] == 3
    assert ("on-policy      the student wrote 2 greedy continuations of 5 tokens at every step, graded by the "
            "teacher without repeating a 3-gram") in result.output
