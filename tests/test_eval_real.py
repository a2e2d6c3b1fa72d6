"""The evaluation stage on the shared commonsense data (skipped when it is missing) and, once, on smollm2-135m."""
from __future__ import annotations

import json

import pytest

from conftest import make_model
from rora.config import EvalConfig
from rora.registry import TASKS as TASK_NAMES
from rora.evaluation.data import load_examples
from rora.evaluation.evaluate import evaluate
from rora.evaluation.tasks import TASKS, ANSWER_PREFIX, eval_prompt, extract_answer, record_labels


@pytest.mark.parametrize("name", TASK_NAMES.names())
def test_real_records_parse_and_answers_extract(name, data_dir):
    task = TASKS[name]
    records = load_examples(task, data_dir, limit=50)
    assert len(records) == 50
    for rec in records:
        # The reference extraction recovers the gold label from the gold output, and the label is allowed.
        assert extract_answer(task, rec["output"]) == rec["answer"]
        assert rec["answer"] in record_labels(task, rec["instruction"])
        assert rec["input"] == ""
    with (data_dir / name / task.lmeval_file).open() as f:
        assert isinstance(json.loads(f.readline()), dict)


def test_real_lmeval_files_run_through_shipped_yamls(data_dir, tokenizer):
    """Every shipped YAML reads the real lmeval_*.jsonl schema (tiny model: only the plumbing is under test)."""
    res = evaluate(make_model(), tokenizer, EvalConfig(protocol="lm-eval", limit=2, batch_size=8),
                   data_dir=data_dir, progress=False)
    assert list(res.per_task) == list(TASK_NAMES.names())
    assert all(r["n"] == 2 and r["source"] == "offline" for r in res.per_task.values())
    choices = {t: len(next(x for x in res.records if x["task"] == t)["loglikelihoods"]) for t in TASK_NAMES.names()}
    assert choices == {"boolq": 2, "piqa": 2, "social_i_qa": 3, "hellaswag": 4, "winogrande": 2, "ARC-Easy": 4,
                       "ARC-Challenge": 4, "openbookqa": 4}


def test_smollm2_score_equals_lmeval_hf_backend(data_dir, smollm2):
    """On the real model, `score` log-likelihoods equal lm-eval's HFLM on the same (context, label) pairs."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from rora.evaluation.score import loglikelihoods

    model, tok = smollm2
    requests = []
    for name in ("boolq", "ARC-Easy"):
        for rec in load_examples(TASKS[name], data_dir, limit=1):
            requests.append((eval_prompt(rec["instruction"]) + ANSWER_PREFIX, record_labels(TASKS[name],
                                                                                            rec["instruction"])))
    ours = loglikelihoods(model, tok, requests, batch_size=4)
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=8, device="cpu")
    inst = [Instance("loglikelihood", {}, (c, k), i) for c, cands in requests for i, k in enumerate(cands)]
    theirs = [ll for ll, _ in lm.loglikelihood(inst, disable_tqdm=True)]
    assert sum(ours, []) == pytest.approx(theirs, abs=1e-3)
