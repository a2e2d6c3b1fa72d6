"""On-policy distillation: the prompts it continues, the positions its KL covers, the pool the student writes (its
own greedy text, refreshed each round), exact resume mid-round, and bad settings."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import (assert_sigkill_resume_is_bit_identical, even_odd_records, make_model, make_tokenizer,
                      recover_worker, tiny_recover_config)

from rora.config import RecoverConfig
from rora.errors import ConfigError
from rora.evaluation.text import continue_ids, writing_settings
from rora.recovery.data import IGNORE_INDEX, Example, collate, tokenize_record
from rora.recovery.distill import DistillLoss
from rora.recovery.on_policy import PREFIX_TOKENS, as_example, pool_prompts, prompt_of
from rora.recovery.trainer import recover

pytestmark = pytest.mark.usefixtures("one_thread")


def kd_config(**kw):
    return tiny_recover_config(**{"objective": "kd", "on_policy": 4, "on_policy_tokens": 6, **kw})


def test_prompts_are_a_records_prompt_or_a_texts_first_tokens(tokenizer):
    record = tokenize_record({"instruction": "Is the sky blue?", "input": "", "output": "the correct answer is true"},
                             tokenizer, 256, train_on_inputs=False)
    n_prompt = record.labels.index(next(t for t in record.labels if t != IGNORE_INDEX))
    assert prompt_of(record, 256) == record.input_ids[:n_prompt] and 0 < n_prompt < len(record)
    assert prompt_of(record, 3) == record.input_ids[n_prompt - 3:n_prompt]  # the end of a long prompt: where it writes
    text = Example(input_ids=list(range(40)), labels=list(range(40)))
    assert prompt_of(text, 256) == list(range(PREFIX_TOKENS))
    train = [Example(input_ids=[i] * 20, labels=[i] * 20) for i in range(5)]
    one, again = pool_prompts(train, 7, 3, 0, 0, 256), pool_prompts(train, 7, 3, 0, 0, 256)
    assert one == again and len(one) == 7 and {p[0] for p in one[:5]} == set(range(5))  # seeded, each once, cycled
    assert pool_prompts(train, 7, 3, 1, 0, 256) != one and pool_prompts(train, 7, 3, 0, 1, 256) != one


def test_written_kl_covers_exactly_the_written_tokens(tokenizer):
    """DistillLoss(written=True) is the full-logit KL summed over the positions that predict a written token."""
    from peft import get_peft_model

    from rora.recovery.methods import peft_config

    teacher, student = make_model(seed=4).eval(), make_model(seed=0)
    pm = get_peft_model(student, peft_config(RecoverConfig(rank=4, dropout=0.0), student)).eval()
    rows = [[3, 5, 6, 7, 8, 9], [2, 11, 12, 13, 14, 15, 16, 17]]  # [prompt length, prompt..., written...]
    batch = [as_example(r) for r in rows]
    assert batch[0].input_ids == [5, 6, 7, 8, 9] and batch[0].labels == [IGNORE_INDEX] * 3 + [8, 9]
    ids, labels = collate(batch, tokenizer.pad_token_id)
    kd, sft = DistillLoss(pm, teacher, 1.0, 4, sft=True)(ids, labels, torch.tensor([5, 7]), written=True)
    with torch.no_grad():
        log_s, log_t = pm(input_ids=ids).logits.log_softmax(-1), teacher(input_ids=ids).logits.log_softmax(-1)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1)
    positions = [(0, 2), (0, 3), (1, 1), (1, 2), (1, 3), (1, 4), (1, 5)]  # each predicts a written token
    assert torch.allclose(kd, sum(kl[b, j] for b, j in positions), rtol=1e-4) and sft == 0


def test_the_student_writes_its_pool_greedily_each_round(tokenizer, monkeypatch, tmp_path):
    """Each round's pool: the student's greedy continuations of that round's prompts; round 0's is the bare
    student's own text (a new adapter changes nothing yet)."""
    import rora.recovery.trainer as trainer

    teacher, student = make_model(seed=4), make_model(seed=0)
    bare = copy.deepcopy(student).eval()
    cfg = kd_config(max_steps=6)  # 4 continuations, 2 a step: a new pool at steps 0, 2 and 4
    pools, original = {}, trainer._Run.written_batch

    def spy(self):
        batch = original(self)
        pools.setdefault(self.pool["round"], copy.deepcopy(self.pool["rows"]))
        return batch

    monkeypatch.setattr(trainer._Run, "written_batch", spy)
    result = recover(student, tokenizer, even_odd_records(40), cfg, tmp_path / "out", progress=False, teacher=teacher)
    assert sorted(pools) == [0, 1, 2] and all(len(rows) == 4 for rows in pools.values())
    logged = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in logged if "loss" in r]
    assert len(steps) == 6 and all(r["written_kl"] > 0 for r in steps)
    figures = {"continuations": 4, "new_tokens": 6, "rounds": 3, "written_kl_first": steps[0]["written_kl"],
               "written_kl_last": steps[-1]["written_kl"]}
    assert result.on_policy == figures
    assert json.loads((tmp_path / "out" / "rora.json").read_text())["report"]["on_policy"] == figures
    from rora.pipelines.summary import recovery_lines

    line = recovery_lines({"lr": 5e-3, "on_policy": figures})[-1]
    assert line.startswith("- on-policy distillation: the student wrote 4 greedy continuations of 6 tokens per round, "
                           "3 rounds") and f"{figures['written_kl_first']:.3f} -> {figures['written_kl_last']:.3f}" in line
    train = trainer._training_data(even_odd_records(40), tokenizer, cfg).train
    settings, stops = writing_settings(bare, tokenizer, {"max_new_tokens": 6, "temperature": 0.0})
    for round_, rows in pools.items():
        prompts = pool_prompts(train, 4, cfg.seed, round_, 0, cfg.cutoff_len - 6)
        assert [r[1:1 + r[0]] for r in rows] == prompts
        assert all(0 < len(r) - 1 - r[0] <= 6 for r in rows)
    written = continue_ids(bare, [r[1:1 + r[0]] for r in pools[0]], settings, stops, 2)
    assert [r[1 + r[0]:] for r in pools[0]] == [new for new, _ in written]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("on-policy-worker")
    for name, seed in (("student", 0), ("teacher", 1)):
        make_model(seed=seed).save_pretrained(root / name)
        make_tokenizer().save_pretrained(root / name)
    (root / "data.json").write_text(json.dumps(even_odd_records(40)))
    return root


def test_a_run_killed_mid_round_resumes_bit_identically(saved, tmp_path):
    # 6 continuations, 2 a step: rounds start at steps 0, 3, 6; the kill at step 4's checkpoint is mid-round, so
    # only the pool saved with the checkpoint gives step 5 the continuations the uninterrupted run trained on.
    cfg = kd_config(on_policy=6, max_steps=8).to_dict()
    worker = lambda out, **env: recover_worker(saved, saved / "student", saved / "teacher", out, cfg, **env)  # noqa: E731
    full, resumed = assert_sigkill_resume_is_bit_identical(worker, tmp_path / "full", tmp_path / "killed", steps=8)
    assert resumed["val_metrics"] == full["val_metrics"]


@pytest.mark.parametrize("settings, match", [
    ({"on_policy": 3}, "multiple of recover.micro_batch_size"),
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
    got = chunked_kl(hidden, head, t_hidden, t_head, 1.0, 4, bans)  # chunk 4: the bans span two chunks
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
