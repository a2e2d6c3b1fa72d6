"""Recovery data: sources and formats, record errors, the seeded split, labels (-100 on the prompt), EOS,
dropping over-long examples, and length-grouped micro-batches."""
from __future__ import annotations

import json

import pytest

from rora.config import RecoverConfig
from rora.errors import DataError
from rora.recovery.data import (
    IGNORE_INDEX, collate, epoch_micro_batches, load_records, prepare, split_train_val, step_plan, tokenize_record,
)
from rora.recovery.prompts import training_prompt

REC = {"instruction": "Please answer true or false: is Paris in France?", "input": "", "output": "the correct answer is true"}


def test_prompt_tokens_carry_ignore_index_and_eos_is_appended(tokenizer):
    ex = tokenize_record(REC, tokenizer, cutoff_len=256, train_on_inputs=False)
    full = tokenizer(training_prompt(**REC))["input_ids"]
    assert ex.input_ids == full + [tokenizer.eos_token_id]
    labelled = [t for t in ex.labels if t != IGNORE_INDEX]
    n_prompt = ex.labels.index(labelled[0])
    assert all(t == IGNORE_INDEX for t in ex.labels[:n_prompt]) and n_prompt > 10
    assert ex.labels[n_prompt:] == ex.input_ids[n_prompt:]  # the response and the EOS carry labels
    assert tokenizer.decode(labelled[:-1]).strip() == REC["output"]
    assert labelled[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ex.input_ids[:n_prompt]) + tokenizer.decode(ex.input_ids[n_prompt:-1]) == training_prompt(**REC)


def test_train_on_inputs_labels_everything(tokenizer):
    ex = tokenize_record(REC, tokenizer, cutoff_len=256, train_on_inputs=True)
    assert ex.labels == ex.input_ids


def test_cutoff_drops_longer_examples_and_skips_eos_at_exact_length(tokenizer):
    n = len(tokenizer(training_prompt(**REC))["input_ids"])
    assert tokenize_record(REC, tokenizer, cutoff_len=n - 1, train_on_inputs=False) is None
    exact = tokenize_record(REC, tokenizer, cutoff_len=n, train_on_inputs=False)
    assert len(exact) == n and exact.input_ids[-1] != tokenizer.eos_token_id
    records = [REC] * 30 + [{**REC, "instruction": REC["instruction"] * 8}] * 5
    data = prepare(records, tokenizer, RecoverConfig(cutoff_len=n + 1, val_set_size=4))
    assert data.dropped_too_long == 5 and len(data.train) + len(data.val) == 30


def test_sources_file_jsonl_directory_and_alpaca_format(tmp_path):
    recs = [REC, {"instruction": "Summarize", "input": "a long text", "output": "short"}, {"instruction": "Hi", "output": "Hello"}]
    (tmp_path / "a.json").write_text(json.dumps(recs))
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    for task in ("boolq", "piqa"):
        (tmp_path / "dir" / task).mkdir(parents=True)
        (tmp_path / "dir" / task / "train.json").write_text(json.dumps(recs))
        (tmp_path / "dir" / task / "test.json").write_text(json.dumps([REC] * 7))  # never read
    assert load_records(tmp_path / "a.json") == load_records(tmp_path / "a.jsonl") == load_records(recs)
    assert load_records(recs)[2] == {"instruction": "Hi", "input": "", "output": "Hello"}
    assert len(load_records(tmp_path / "dir")) == 6


def test_bad_records_and_sources_name_the_problem(tmp_path):
    with pytest.raises(DataError, match=r"record 1 has no 'output' field"):
        load_records([REC, {"instruction": "x", "input": ""}])
    with pytest.raises(DataError, match=r"record 0 field 'instruction' must be a string"):
        load_records([{"instruction": 3, "output": "x"}])
    with pytest.raises(DataError, match="empty"):
        load_records([])
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(DataError, match="empty"):
        load_records(tmp_path / "empty.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        load_records(tmp_path / "bad.json")
    with pytest.raises(DataError, match="not found"):
        load_records(tmp_path / "missing.json")
    with pytest.raises(DataError, match="no <task>/train.json"):
        load_records(tmp_path)


def test_hub_id_fails_clearly_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError, match="cannot load dataset 'no-such-org/no-such-data'.*offline"):
        load_records("no-such-org/no-such-data")


def test_split_is_seeded_disjoint_and_never_empty():
    recs = [{"instruction": str(i), "input": "", "output": "x"} for i in range(50)]
    train, val = split_train_val(recs, 10, seed=42)
    assert (len(train), len(val)) == (40, 10)
    assert {r["instruction"] for r in train}.isdisjoint(r["instruction"] for r in val)
    assert split_train_val(recs, 10, seed=42) == (train, val) != split_train_val(recs, 10, seed=1)
    assert split_train_val(recs, 10, seed=42, max_train_examples=5)[0] == train[:5]
    with pytest.raises(DataError, match="val_set_size 50 leaves no training examples"):
        split_train_val(recs, 50, seed=42)


def test_length_grouping_covers_every_example_and_cuts_padding():
    import random

    rng = random.Random(0)
    lengths = [rng.randint(20, 250) for _ in range(1000)]

    def padding(batches):
        return sum(len(b) * max(lengths[i] for i in b) - sum(lengths[i] for i in b) for b in batches)

    grouped = epoch_micro_batches(lengths, 8, seed=42, epoch=0, group_by_length=True)
    plain = epoch_micro_batches(lengths, 8, seed=42, epoch=0, group_by_length=False)
    assert sorted(i for b in grouped for i in b) == list(range(1000))
    assert padding(grouped) < 0.1 * padding(plain)
    assert grouped == epoch_micro_batches(lengths, 8, seed=42, epoch=0, group_by_length=True)
    assert grouped != epoch_micro_batches(lengths, 8, seed=42, epoch=1, group_by_length=True)
    plan = step_plan(lengths, 8, accumulation=2, total_steps=100, seed=42, group_by_length=True)
    assert len(plan) == 100 and all(len(s) == 2 for s in plan)  # 125 micro-batches per epoch: crosses into epoch 2


def test_collate_right_pads_with_ignored_labels(tokenizer):
    a = tokenize_record(REC, tokenizer, 256, False)
    b = tokenize_record({**REC, "output": "no"}, tokenizer, 256, False)
    ids, labels = collate([a, b], pad_id=0)
    assert ids.shape == labels.shape == (2, max(len(a), len(b)))
    short = min(len(a), len(b))
    row = 0 if len(a) == short else 1
    assert (labels[row, short:] == IGNORE_INDEX).all() and (ids[row, short:] == 0).all()
