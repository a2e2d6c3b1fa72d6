"""The lm-eval protocol offline: rora's shipped task YAMLs over <task>/lmeval_*.jsonl, on a tiny in-memory model,
checked against acc / acc_norm computed by hand from full forward passes."""
from __future__ import annotations

import json

import pytest
import torch
import yaml

from conftest import make_model
from rora.config import EvalConfig
from rora.evaluation.evaluate import evaluate
from rora.evaluation.lmeval_bridge import LMEVAL_DIR
from rora.evaluation.score import encode_pair
from rora.evaluation.tasks import TASKS

BOOLQ = [
    {"question": "is paris the capital of france", "answer": True, "passage": "Paris is the capital of France."},
    {"question": "is a cat a dog", "answer": False, "passage": "A cat sat on the mat."},
    {"question": "is the mat red", "answer": False, "passage": "The mat is blue."},
]
ARC = [
    {"question": "Where did the cat sit?", "choices": {"text": ["on the mat", "Paris", "in the sky"],
                                                        "label": ["A", "B", "C"]}, "answerKey": "A"},
    {"question": "What is the capital of France?", "choices": {"text": ["a cat", "Paris"], "label": ["A", "B"]},
     "answerKey": "B"},
]
WINOGRANDE = [
    {"sentence": "The cat sat on the mat because _ was soft.", "option1": "the cat", "option2": "the mat",
     "answer": "2"},
    {"sentence": "Paris is in France, so _ is a city.", "option1": "Paris", "option2": "France", "answer": "1"},
]
HELLASWAG = [
    {"ind": 1, "activity_label": "Cats", "ctx_a": "A cat sits on a mat.", "ctx_b": "it", "ctx": "A cat sits on a mat. it",
     "endings": ["sleeps.", "flies to [title] Paris.", "reads.", "sings."], "source_id": "x", "split": "val",
     "split_type": "indomain", "label": "0"},
]


def _write(root, task, split, rows):
    (root / task).mkdir(parents=True, exist_ok=True)
    (root / task / f"lmeval_{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _ll(model, tokenizer, context, continuation):
    ctx, cont = encode_pair(tokenizer, context, continuation)
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=torch.tensor([ctx + cont])).logits[0].float(), -1)
    return sum(logprobs[len(ctx) + j - 1, t].item() for j, t in enumerate(cont))


def _by_hand(pairs_per_doc, choices_per_doc, golds, model, tokenizer):
    acc = acc_norm = 0
    for pairs, choices, gold in zip(pairs_per_doc, choices_per_doc, golds):
        lls = [_ll(model, tokenizer, c, k) for c, k in pairs]
        acc += max(range(len(lls)), key=lambda i: lls[i]) == gold
        norm = [ll / len(ch) for ll, ch in zip(lls, choices)]
        acc_norm += max(range(len(norm)), key=lambda i: norm[i]) == gold
    return acc / len(golds), acc_norm / len(golds)


def test_shipped_yamls_cover_every_task():
    names = {yaml.load(p.read_text(), Loader=_Loader)["task"] for p in LMEVAL_DIR.glob("*.yaml")}
    assert names == {t.lmeval_task for t in TASKS.values()}


class _Loader(yaml.SafeLoader):
    pass


_Loader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))


def test_lmeval_offline_matches_hand_computed_accuracy(tmp_path, tokenizer):
    root = tmp_path / "data"
    _write(root, "boolq", "validation", BOOLQ)
    _write(root, "ARC-Easy", "test", ARC)
    _write(root, "winogrande", "validation", WINOGRANDE)
    _write(root, "hellaswag", "validation", HELLASWAG)
    model = make_model(seed=3)
    cfg = EvalConfig(tasks=["boolq", "ARC-Easy", "winogrande", "hellaswag"], protocol="lm-eval", batch_size=4)
    res = evaluate(model, tokenizer, cfg, data_dir=root, out=tmp_path / "r.json", progress=False)
    assert {t: r["source"] for t, r in res.per_task.items()} == dict.fromkeys(cfg.tasks, "offline")
    assert [res.per_task[t]["n"] for t in cfg.tasks] == [3, 2, 2, 1]

    # BoolQ: lm-eval's prompt, choices " no"/" yes".
    boolq = _by_hand([[(f"{d['passage']}\nQuestion: {d['question']}?\nAnswer:", f" {c}") for c in ("no", "yes")]
                      for d in BOOLQ], [["no", "yes"]] * 3, [int(d["answer"]) for d in BOOLQ], model, tokenizer)
    arc = _by_hand([[(f"Question: {d['question']}\nAnswer:", f" {c}") for c in d["choices"]["text"]] for d in ARC],
                   [d["choices"]["text"] for d in ARC], [d["choices"]["label"].index(d["answerKey"]) for d in ARC],
                   model, tokenizer)
    # WinoGrande: partial evaluation, the option goes into the context and the rest of the sentence is scored.
    wino_pairs, wino_choices = [], []
    for d in WINOGRANDE:
        i = d["sentence"].index("_")
        ctxs = [d["sentence"][:i] + d[o] for o in ("option1", "option2")]
        wino_pairs.append([(c, " " + d["sentence"][i + 1:].strip()) for c in ctxs])
        wino_choices.append(ctxs)
    wino = _by_hand(wino_pairs, wino_choices, [int(d["answer"]) - 1 for d in WINOGRANDE], model, tokenizer)
    for task, (acc, acc_norm) in (("boolq", boolq), ("ARC-Easy", arc), ("winogrande", wino)):
        r = res.per_task[task]
        assert (r["acc"], r["acc_norm"]) == pytest.approx((acc, acc_norm)), task
        assert r["accuracy"] == r[TASKS[task].lmeval_metric]
    # HellaSwag runs through lm-eval's own preprocessing ("[title]" removed from the endings).
    hs = [x for x in res.records if x["task"] == "hellaswag"][0]
    assert "[title]" not in "".join(str(x) for x in hs.values()) and len(hs["loglikelihoods"]) == 4
    assert res.average == pytest.approx(sum(r["accuracy"] for r in res.per_task.values()) / 4)
    md = (tmp_path / "r.md").read_text()
    assert "acc_norm (%)" in md and "| winogrande | 2 |" in md
