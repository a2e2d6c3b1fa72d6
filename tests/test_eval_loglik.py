"""The native log-likelihood engine (`rora-hf`) against lm-eval's own HF backend (HFLM): the same requests give the
same log-likelihoods, greedy flags, predictions, acc and acc_norm; on tiny models, on edge cases, and on
smollm2-135m over the real suite."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from conftest import make_model
from rora.cli import main
from rora.config import EvalConfig
from rora.registry import TASKS as TASK_NAMES
from rora.errors import DataError, ModelLoadError
from rora.evaluation.data import sample_indices
from rora.evaluation.evaluate import evaluate
from rora.evaluation.loglik import Row, batches, pack


def _instances(pairs):
    from lm_eval.api.instance import Instance

    # doc_id groups the choices of one example, as lm-eval's multiple-choice tasks do
    return [Instance("loglikelihood", {}, (c, k), idx=i, metadata=("t", doc, 0)) for i, (doc, c, k) in
            enumerate(pairs)]


def _both(model, tokenizer, pairs, max_length=None, **ours):
    from lm_eval.models.huggingface import HFLM

    from rora.evaluation.lmeval_backend import RoraLM

    kw = {"max_length": max_length} if max_length else {}
    theirs = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=3, device="cpu", **kw)
    mine = RoraLM(pretrained=model, tokenizer=tokenizer, batch_size=3, device="cpu", **kw, **ours)
    return (mine.loglikelihood(_instances(pairs), disable_tqdm=True),
            theirs.loglikelihood(_instances(pairs), disable_tqdm=True))


EDGE = [
    # (doc, context, continuation)
    (0, "The capital of France is", " Paris"),  # single-token choices
    (0, "The capital of France is", " the mat"),
    (0, "The capital of France is", " a cat sat on the mat because it was soft"),  # lengths differ
    (1, "A cat sat on the ", "mat"),  # the context's trailing space moves to the continuation
    (1, "A cat sat on the ", "mat."),  # one choice a prefix of another
    (2, "Pari", "s is the capital"),  # the pair tokenizes differently together than apart ("Paris" ...)
    (2, "Pari", "s, France"),
    (2, "Pari", "sian cats sat"),
    (3, "### Instruction: Please answer", " true"),  # shares its opening with the next example
    (4, "### Instruction: Please answer", " false"),
    (5, "", "The capital"),  # an empty context: lm-eval's prefix token conditions the continuation
]


def test_edge_cases_equal_hflm(tokenizer):
    model = make_model(seed=5)
    # lm-eval's split: "Pari" alone ends in a token that "Paris ..." does not have, so the continuation is whatever
    # follows the context's own token count in the whole encoding
    ctx = tokenizer("Pari").input_ids
    assert tokenizer("Paris is the capital").input_ids[:len(ctx)] != ctx
    mine, theirs = _both(model, tokenizer, EDGE)
    assert [g for _, g in mine] == [g for _, g in theirs]
    assert torch.allclose(torch.tensor([x for x, _ in mine]), torch.tensor([x for x, _ in theirs]), atol=1e-4)


def test_left_truncation_to_the_window_equals_hflm(tokenizer):
    model = make_model(seed=6)
    long = "Below is an instruction that describes a task. " * 4  # ~40 tokens; window 16
    pairs = [(0, long, " Paris"), (0, long, " the capital of France is Paris"), (1, "A cat", " sat on the mat")]
    mine, theirs = _both(model, tokenizer, pairs, max_length=16)
    assert torch.allclose(torch.tensor([x for x, _ in mine]), torch.tensor([x for x, _ in theirs]), atol=1e-4)
    assert mine[0][0] != mine[1][0]  # truncation kept different context lengths for the two choices


def test_batch_size_independence(tokenizer):
    model = make_model(seed=7)
    runs = [_both(model, tokenizer, EDGE, batch_tokens=budget)[0] for budget in (1, 40, 100000)]
    for run in runs[1:]:
        assert [g for _, g in run] == [g for _, g in runs[0]]
        assert torch.allclose(torch.tensor([x for x, _ in run]), torch.tensor([x for x, _ in runs[0]]), atol=1e-5)


def test_bfloat16_precision_autocasts_the_cpu_engine(tokenizer):
    """precision bfloat16 runs the engine's matmuls in bfloat16 on a CPU too (numbers near, not equal, to float32's);
    auto and float32 keep the model's float32 there."""
    model = make_model(seed=8)
    auto, _ = _both(model, tokenizer, EDGE)
    for precision in ("float32", "bfloat16"):
        found, _ = _both(model, tokenizer, EDGE, precision=precision)
        lls, ref = torch.tensor([x for x, _ in found]), torch.tensor([x for x, _ in auto])
        if precision == "float32":
            assert torch.equal(lls, ref)
        else:
            assert not torch.equal(lls, ref) and torch.allclose(lls, ref, rtol=0.05, atol=0.05)


def test_lmeval_protocol_passes_its_precision_to_the_engine(data_dir, tokenizer):
    model = make_model(seed=3)
    cfg = EvalConfig(tasks=["piqa"], protocol="lm-eval", limit=3, prose="none", generation=False)
    runs = {p: evaluate(model, tokenizer, cfg.replace(precision=p), data_dir=data_dir, progress=False)
            for p in ("auto", "bfloat16")}
    lls = {p: [r["loglikelihoods"] for r in res.records] for p, res in runs.items()}
    assert lls["auto"] != lls["bfloat16"] and runs["bfloat16"].config["precision"] == "bfloat16"
    assert torch.allclose(torch.tensor(lls["auto"]), torch.tensor(lls["bfloat16"]), rtol=0.05, atol=0.05)


def test_pack_encodes_a_context_once_and_batches_by_tokens():
    row = pack([([5, 6, 7], [8, 9]), ([5, 6, 7], [8, 10, 11]), ([5, 6, 7], [12])])
    # nodes: 5 6 7 | 8 (shared by the first two) | 10 ; the last continuation token of each is never input
    assert row.tokens == [5, 6, 7, 8, 10] and row.parents == [-1, 0, 1, 2, 3] and row.depths == [0, 1, 2, 3, 4]
    assert row.scored == [[(2, 8), (3, 9)], [(2, 8), (3, 10), (4, 11)], [(2, 12)]] and row.chain == 3
    assert batches([10, 30, 20, 5], max_tokens=60) == [[1, 2], [0, 3]]  # longest first, <= 60 padded tokens
    assert batches([10, 30], max_tokens=1) == [[1], [0]] and isinstance(row, Row)


def test_lmeval_protocol_engines_agree_on_real_files(data_dir, tokenizer):
    """evaluate(protocol='lm-eval'): the rora engine and lm-eval's HFLM give the same records and metrics, with
    lm-eval's standard errors."""
    model = make_model(seed=3)
    cfg = EvalConfig(tasks=["boolq", "hellaswag", "winogrande"], protocol="lm-eval", limit=3)
    res = {engine: evaluate(model, tokenizer, cfg.replace(engine=engine),
                            data_dir=data_dir, progress=False) for engine in ("rora", "lm-eval")}
    ours, theirs = res["rora"], res["lm-eval"]
    _assert_same(ours, theirs, atol=1e-4)
    for r in ours.per_task.values():
        assert r["engine"] == "rora" and r["n"] == 3 and r["examples_per_s"] > 0
        assert r["acc_stderr"] == pytest.approx((r["acc"] * (1 - r["acc"]) * 3 / 2) ** 0.5 / 3 ** 0.5)


def _assert_same(ours, theirs, atol):
    assert [(x["task"], x["index"]) for x in ours.records] == [(x["task"], x["index"]) for x in theirs.records]
    for a, b in zip(ours.records, theirs.records):
        assert a["loglikelihoods"] == pytest.approx(b["loglikelihoods"], abs=atol), (a["task"], a["index"])
        assert (a["prediction"], a["correct"], a["acc"], a["acc_norm"]) == \
            (b["prediction"], b["correct"], b["acc"], b["acc_norm"]), (a["task"], a["index"])
    for task in ours.per_task:
        for key in ("accuracy", "acc", "acc_norm", "acc_stderr", "acc_norm_stderr", "n"):
            assert ours.per_task[task][key] == theirs.per_task[task][key], (task, key)


# Fewer than the issue's 30 examples per task: HFLM, the slow side, needs 6.6 TFLOP for 30 of each, minutes on 2
# CPU cores, so the tasks with long rows (BoolQ passages, HellaSwag endings, ARC) take 5-6 and the rest 10-20 (~2.5
# TFLOP for both engines together: about a minute on a quiet 2-core CPU, several on a busy one).
# benchmarks/bench_loglik.py makes the same comparison on 30 examples of every task, base and pruned (480/480
# identical predictions).
SMOLLM2_N = {"boolq": 5, "hellaswag": 5, "ARC-Easy": 6, "ARC-Challenge": 6, "piqa": 10, "social_i_qa": 10,
             "winogrande": 20, "openbookqa": 20}


def test_smollm2_engine_equals_hflm_on_the_suite(data_dir, smollm2):
    model, tok = smollm2
    for task in TASK_NAMES.names():
        cfg = EvalConfig(tasks=[task], protocol="lm-eval", limit=SMOLLM2_N[task], generation=False,
                         prose="none")  # accuracy only
        ours = evaluate(model, tok, cfg.replace(engine="rora"), data_dir=data_dir, progress=False)
        theirs = evaluate(model, tok, cfg.replace(engine="lm-eval"), data_dir=data_dir, progress=False)
        _assert_same(ours, theirs, atol=1e-4)


def test_sample_is_seeded_and_bounded(data_dir, tokenizer):
    a = sample_indices(1000, 5, seed=1, task="boolq")
    assert a == sorted(a) and len(set(a)) == 5 and a == sample_indices(1000, 5, seed=1, task="boolq")
    assert a != sample_indices(1000, 5, seed=2, task="boolq") != sample_indices(1000, 5, seed=1, task="piqa")
    with pytest.raises(DataError, match="--sample 11 is larger than boolq, which has 10 examples"):
        sample_indices(10, 11, seed=0, task="boolq")
    res = evaluate(make_model(), tokenizer, EvalConfig(tasks=["piqa"], protocol="lm-eval", sample=3, seed=4),
                   data_dir=data_dir, progress=False)
    assert [x["index"] for x in res.records] == sample_indices(1838, 3, seed=4, task="piqa")
    score = evaluate(make_model(), tokenizer, EvalConfig(tasks=["piqa"], protocol="score", sample=3, seed=4),
                     data_dir=data_dir, progress=False)
    assert [x["index"] for x in score.records] == sample_indices(1838, 3, seed=4, task="piqa")
    with pytest.raises(ModelLoadError, match="no tokenizer"):
        evaluate(make_model(), None, EvalConfig(tasks=["piqa"], protocol="lm-eval", limit=1), data_dir=data_dir)


@pytest.fixture
def tiny_dir(tmp_path, tokenizer):
    from rora.artifacts import save_model_dir

    path = tmp_path / "tiny"
    save_model_dir(make_model(), tokenizer, path)
    return path


@pytest.fixture
def lmeval_data(tmp_path):
    root = tmp_path / "data"
    (root / "boolq").mkdir(parents=True)
    rows = [{"question": "is paris in france", "answer": True, "passage": "Paris is in France."}] * 3
    (root / "boolq" / "lmeval_validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_cli_lmeval_engine_runs_and_writes(tiny_dir, lmeval_data, tmp_path):
    out = tmp_path / "r.json"
    args = ["eval", str(tiny_dir), "--tasks", "boolq", "--protocol", "lm-eval", "--sample", "2", "--seed", "1",
            "--data-dir", str(lmeval_data), "--out", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    found = json.loads(out.read_text())
    assert found["per_task"]["boolq"]["n"] == 2 and found["per_task"]["boolq"]["engine"] == "rora"
    assert found["config"]["sample"] == 2 and found["config"]["seed"] == 1
    assert "acc_stderr" in found["per_task"]["boolq"]


@pytest.mark.parametrize("extra, message", [
    (["--tasks", "boolq,piqaa"], "unknown task 'piqaa' (did you mean 'piqa'?)"),
    (["--tasks", "piqa"], "piqa/lmeval_validation.jsonl not found: the lm-eval protocol reads"),
    (["--tasks", "boolq", "--sample", "4"], "--sample 4 is larger than boolq, which has 3 examples"),
    (["--tasks", "boolq", "--sample", "2", "--limit", "2"], "eval.limit and eval.sample are exclusive"),
    (["--tasks", "boolq", "--engine", "vllm"], "eval.engine must be one of rora, lm-eval"),
    (["--tasks", "boolq", "--precision", "fp8"], "eval.precision must be one of auto, float32, bfloat16"),
    (["--tasks", "boolq", "--engine", "lm-eval", "--precision", "bfloat16"], "eval.precision applies to the rora"),
    (["--tasks", "boolq", "--no-tokenizer"], "tokenizer"),
])
def test_cli_lmeval_bad_input_one_line_exit_2(extra, message, tiny_dir, lmeval_data, tmp_path):
    if "--no-tokenizer" in extra:  # a model directory without its tokenizer
        extra = [e for e in extra if e != "--no-tokenizer"]
        for f in tiny_dir.iterdir():
            if "token" in f.name or f.name == "chat_template.jinja":
                f.unlink()
    args = ["eval", str(tiny_dir), "--protocol", "lm-eval", "--data-dir", str(lmeval_data), "--out",
            str(tmp_path / "r.json")] + extra
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and message in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "r.json").exists()


def test_registered_as_lmeval_backend(data_dir, tokenizer):
    """simple_evaluate(model="rora-hf") finds the backend by name (python -m rora.evaluation.lmeval_backend makes
    the same registration for lm-eval's command line)."""
    from lm_eval.evaluator import simple_evaluate
    from lm_eval.tasks import TaskManager

    from rora.evaluation.lmeval_backend import RoraLM
    from rora.evaluation.lmeval_bridge import LMEVAL_DIR

    manager = TaskManager(include_path=str(LMEVAL_DIR), include_defaults=False, metadata={"data_dir": str(data_dir)})
    res = simple_evaluate(model="rora-hf", model_args={"pretrained": make_model(), "tokenizer": tokenizer,
                                                       "batch_tokens": 64},
                          device="cpu", tasks=["rora_piqa"], task_manager=manager, limit=2, bootstrap_iters=1000)
    assert res["config"]["model"] == "rora-hf" and res["results"]["rora_piqa"]["acc_stderr,none"] >= 0
    assert len(res["samples"]["rora_piqa"]) == 2 and RoraLM.__name__ == "RoraLM"


def test_sampled_offline_task_scores_the_same_docs_as_the_whole_task(data_dir, tokenizer):
    # The offline loader builds only the sampled docs; they must be exactly the docs at those positions.
    model = make_model()
    seed = 1647  # its two openbookqa examples are at positions 1 and 3, so the first 4 hold them
    picked = evaluate(model, tokenizer, EvalConfig(tasks=["openbookqa"], protocol="lm-eval", sample=2, seed=seed),
                      data_dir=data_dir, progress=False)
    first = evaluate(model, tokenizer, EvalConfig(tasks=["openbookqa"], protocol="lm-eval", limit=4),
                     data_dir=data_dir, progress=False)
    by_index = {r["index"]: r for r in first.records}
    assert [r["index"] for r in picked.records] == [1, 3]
    for r in picked.records:
        assert r["loglikelihoods"] == pytest.approx(by_index[r["index"]]["loglikelihoods"], abs=1e-5)
        assert r["correct"] == by_index[r["index"]]["correct"]
