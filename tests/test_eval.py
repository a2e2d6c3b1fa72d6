"""Evaluation stage on tiny in-process models: task table and answer extraction, data errors, generate (batched ==
one at a time == the reference loop), score (== naive full forwards), output files, CLI errors."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from conftest import make_model, make_tokenizer
from rora.cli import main
from rora.config import EvalConfig
from rora.registry import TASKS as TASK_NAMES
from rora.errors import ConfigError, DataError, MergeError
from rora.evaluation.data import load_examples, resolve_data_dir
from rora.evaluation.evaluate import EvalResults, evaluate
from rora.models import load_adapter
from rora.evaluation.generate import _BeamLayer, _groups, generate_reference, generate_responses
from rora.writing import layout_rows
from rora.evaluation.loglik import MIN_SHARED, _common_prefix, _shared_prefix  # noqa: E402
from rora.evaluation.score import (_plan, argmax, encode_pair,
                                   loglikelihoods)
from rora.evaluation.tasks import (TASKS, eval_prompt, extract_answer, get_task, parse_tasks, record_labels,
                                   response_of)

# The LLM-Adapters evaluation prompt, character for character (../shared/PROTOCOL.md).
REFERENCE_PROMPT = (
    'Below is an instruction that describes a task. Write a response that appropriately completes the request. '
    '\n\n                ### Instruction:\n                {instruction}\n\n                ### Response:\n                '
)


def test_eval_prompt_is_the_reference_prompt():
    assert eval_prompt("Q?") == REFERENCE_PROMPT.format(instruction="Q?")
    assert eval_prompt("x").count("request. \n\n") == 1 and "\n                \n" not in eval_prompt("x")


@pytest.mark.parametrize("task, response, expected", [
    ("boolq", "the correct answer is true", "true"),
    ("boolq", "False, so the answer is false, not true", "false"),  # case-sensitive: "False" is no match
    ("boolq", "True", ""),  # nothing matches -> ""
    ("boolq", "it is untrue", "true"),  # the reference's regex has no word boundaries
    ("piqa", "solution2 is better than solution1", "solution2"),  # first match wins
    ("piqa", "Solution1", ""),
    ("social_i_qa", "answer5", "answer5"),  # the pattern allows answer5 even where a task has 3 answers
    ("social_i_qa", "the correct answer is answer10", "answer1"),
    ("hellaswag", "ending5 or ending2", "ending2"),
    ("winogrande", "option2 option1", "option2"),
    ("ARC-Easy", "answer4.", "answer4"),
    ("ARC-Challenge", "", ""),
    ("openbookqa", "Answer3 answer2", "answer2"),
])
def test_extract_answer_reproduces_reference(task, response, expected):
    assert extract_answer(task, response) == expected


def test_response_is_text_after_last_response_marker():
    decoded = eval_prompt("Q") + "the correct answer is true ### Response:  option1 \n"
    assert response_of(decoded) == "option1"
    assert response_of(eval_prompt("Q") + "  answer2  ") == "answer2"


def test_task_table_and_labels():
    assert tuple(TASKS) == TASK_NAMES.names() and parse_tasks("all") == list(TASK_NAMES.names())
    assert parse_tasks("piqa, boolq") == ["piqa", "boolq"]
    assert {t.lmeval_metric for t in TASKS.values() if t.name in ("hellaswag", "ARC-Challenge", "openbookqa")} == {
        "acc_norm"}
    assert sum(t.lmeval_metric == "acc" for t in TASKS.values()) == 5
    siqa = TASKS["social_i_qa"]
    assert record_labels(siqa, "...\n\nAnswer format: answer1/answer2/answer3") == ("answer1", "answer2", "answer3")
    assert record_labels(TASKS["ARC-Easy"], "Answer format: answer1/answer2/answer3/answer4/answer5") == \
        TASKS["ARC-Easy"].labels
    assert record_labels(TASKS["boolq"], "no format line") == ("true", "false")
    with pytest.raises(ConfigError, match="did you mean 'piqa'.*known tasks: boolq, piqa"):
        get_task("piqaa")


def _write_task(root, task, records):
    (root / task).mkdir(parents=True, exist_ok=True)
    (root / task / "test.json").write_text(json.dumps(records))


def _rec(instruction, answer):
    return {"instruction": instruction, "input": "", "output": f"the correct answer is {answer}", "answer": answer}


def test_data_errors_and_limit(tmp_path, monkeypatch):
    monkeypatch.delenv("RORA_DATA_DIR", raising=False)
    with pytest.raises(DataError, match=r"does not exist; expected layout: <dir>/<task>/test.json"):
        resolve_data_dir(tmp_path / "nope")
    _write_task(tmp_path, "boolq", [_rec(f"q{i}? Answer format: true/false", "true") for i in range(5)])
    assert [r["instruction"][:2] for r in load_examples(TASKS["boolq"], tmp_path, limit=3)] == ["q0", "q1", "q2"]
    with pytest.raises(ConfigError, match="limit must be > 0"):
        load_examples(TASKS["boolq"], tmp_path, limit=0)
    with pytest.raises(DataError, match=r"piqa/test.json not found; expected layout"):
        load_examples(TASKS["piqa"], tmp_path)
    _write_task(tmp_path, "piqa", [_rec("a", "solution1"), {"instruction": "b"}])
    with pytest.raises(DataError, match=r"malformed record in .*piqa/test.json at index 1: lacks string field\(s\) answer"):
        load_examples(TASKS["piqa"], tmp_path)
    monkeypatch.setenv("RORA_DATA_DIR", str(tmp_path))
    assert resolve_data_dir(None) == tmp_path


PROMPTS = [eval_prompt(q) for q in (
    "Please answer the following question with true or false, question: is Paris the capital of France?",
    "A cat sat on the mat.",
    "Please choose the correct answer. Answer1: the mat Answer2: the cat Answer format: answer1/answer2",
    "the correct answer is",
    "Below is an instruction that describes a task: ending1 ending2 ending3 ending4 option1 option2 solution1",
)]


def _lively_model():
    """A tiny model whose random outputs differ from prompt to prompt (larger weights than make_model's)."""
    model = make_model(seed=0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    return model


def test_generate_batched_equals_one_at_a_time_and_reference(tokenizer):
    model = _lively_model()
    batched = generate_responses(model, tokenizer, PROMPTS, batch_size=3, max_new_tokens=12)
    single = generate_responses(model, tokenizer, PROMPTS, batch_size=1, max_new_tokens=12)
    reference = generate_reference(model, tokenizer, PROMPTS, max_new_tokens=12)
    assert batched == single == reference
    assert len(set(batched)) == len(PROMPTS)  # non-trivial outputs: every prompt gets its own response
    assert generate_responses(model, tokenizer, PROMPTS, batch_size=5, max_new_tokens=12) == batched  # deterministic



@pytest.mark.parametrize("tokens_per_pass", [512, 150, 1])  # one prefill pass per batch; two rows; one row each
def test_generate_shares_the_common_prefix_and_handles_tiny_prompts(tokenizer, monkeypatch, tokens_per_pass):
    # Prompts that share a long prefix (as a task's do) take the shared-cache path; one-token prompts have no cache.
    monkeypatch.setattr("rora.evaluation.generate.TOKENS_PER_PASS", tokens_per_pass)
    model = _lively_model()
    rows = [tokenizer(p).input_ids for p in PROMPTS]
    assert _common_prefix(rows, 10**6) >= MIN_SHARED
    prompts = PROMPTS + ["a", "b"]
    # batch 5: the second batch is ["a", "b"], one token each (no cache to share)
    assert generate_responses(model, tokenizer, prompts, batch_size=5, max_new_tokens=8) == \
        generate_reference(model, tokenizer, prompts, max_new_tokens=8)



@pytest.mark.parametrize("kind", ["gqa", "nonuniform", "peft"])
def test_generate_batched_equals_reference_on_gqa_pruned_and_adapted_models(kind, tokenizer, request):
    # The beam buffers take each layer's own KV shape; a PeftModel passes through the same calls.
    from peft import LoraConfig, get_peft_model

    model = _lively_model() if kind == "peft" else request.getfixturevalue(f"tiny_{kind}")
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    if kind == "peft":
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                 init_lora_weights=False)).eval()
    batched = generate_responses(model, tokenizer, PROMPTS, batch_size=5, max_new_tokens=8)
    assert batched == generate_reference(model, tokenizer, PROMPTS, max_new_tokens=8)
    assert len(set(batched)) > 1

def test_prefill_groups_bound_padded_tokens():
    assert _groups([70, 60, 50, 40, 10, 0], 150) == [[0, 1], [2, 3, 4], [5]]
    assert _groups([70, 60], 1) == [[0], [1]]  # at least one row per pass


def test_layout_gives_every_token_its_solo_position():
    rows = [[5, 6, 7, 8, 9], [5, 6, 7, 1], [5, 6, 7, 2, 3, 4]]
    ids, mask = layout_rows(rows, 3, pad_id=0, device="cpu")
    positions = mask.cumsum(-1) - 1
    for j, r in enumerate(rows):
        assert ids[j][mask[j] == 1].tolist() == r
        assert positions[j][mask[j] == 1].tolist() == list(range(len(r)))
    assert ids[:, :3].tolist() == [[5, 6, 7]] * 3 and mask[:, :3].all()
    plain, plain_mask = layout_rows(rows, 0, pad_id=0, device="cpu")
    assert plain[1].tolist() == [0, 0, 5, 6, 7, 1] and plain_mask[1].tolist() == [0, 0, 1, 1, 1, 1]


@pytest.mark.parametrize("beam_idx", [[1, 0, 0, 2, 3, 3], [3, 0, 1, 5, 2, 4]])  # within groups; across (fallback)
def test_beam_layer_matches_dynamic_layer(beam_idx):
    from transformers.cache_utils import DynamicLayer

    torch.manual_seed(0)
    k, v = torch.randn(3, 2, 5, 4), torch.randn(3, 2, 5, 4)
    beams, ref = _BeamLayer(k, 3, 2, 5, room=1), DynamicLayer()
    for j in range(3):
        beams.put(j, k[j], v[j], 5)
    ref.update(k.repeat_interleave(2, 0), v.repeat_interleave(2, 0))
    if beam_idx[0] == 3:  # a cross-group reorder is only valid when the prompt rows differ per beam: make them so
        ref.keys, ref.values = torch.randn(6, 2, 5, 4), torch.randn(6, 2, 5, 4)
        beams._buf[0][:, :, :5], beams._buf[1][:, :, :5] = ref.keys, ref.values
    idx = torch.tensor(beam_idx)
    for step in range(3):  # grows past its room once
        new_k, new_v = torch.randn(6, 2, 1, 4), torch.randn(6, 2, 1, 4)
        for layer in (beams, ref):
            layer.update(new_k, new_v)
            layer.reorder_cache(idx)
    assert beams.get_seq_length() == ref.get_seq_length() == 8
    assert torch.equal(beams.keys, ref.keys) and torch.equal(beams.values, ref.values)

def _naive_loglikelihood(model, tokenizer, context, continuation):
    ctx, cont = encode_pair(tokenizer, context, continuation)
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
    return sum(logprobs[len(ctx) + j - 1, t].item() for j, t in enumerate(cont))


SCORE_REQUESTS = [
    (eval_prompt("is the sky blue? Answer format: true/false") + "the correct answer is ", ("true", "false")),
    (eval_prompt("pick one") + "the correct answer is ", ("answer1", "answer2", "answer3")),
    ("The capital of France is", ("Paris", "the mat", "a cat sat")),  # candidates differ before their last token
    ("A cat sat on the ", ("mat", "mat.")),  # one candidate is a prefix of another
]


def test_score_equals_naive_full_forward(tokenizer):
    model = _lively_model()
    rows, _ = _plan(tokenizer, SCORE_REQUESTS)
    assert len(rows) < sum(len(c) for _, c in SCORE_REQUESTS)  # some examples share one forward pass
    fast = loglikelihoods(model, tokenizer, SCORE_REQUESTS, batch_size=3)
    naive = [[_naive_loglikelihood(model, tokenizer, c, k) for k in cands] for c, cands in SCORE_REQUESTS]
    assert torch.allclose(torch.tensor(sum(fast, [])), torch.tensor(sum(naive, [])), atol=1e-4)
    assert argmax([1.0, 3.0, 3.0]) == 1
    # Prompts that open with the same instruction header start from one shared KV cache: same numbers.
    rows, gathers = _plan(tokenizer, SCORE_REQUESTS[:2])
    assert _shared_prefix(model.model, rows, min(g.pos for g in gathers), "cpu")[0] >= 20
    shared = loglikelihoods(model, tokenizer, SCORE_REQUESTS[:2], batch_size=2)
    assert torch.allclose(torch.tensor(sum(shared, [])), torch.tensor(sum(naive[:2], [])), atol=1e-4)


def test_score_through_peft_model(tokenizer):
    from peft import LoraConfig, get_peft_model

    model = _lively_model()
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"],
                                            init_lora_weights=False)).eval()
    fast = loglikelihoods(peft, tokenizer, SCORE_REQUESTS[:2])
    naive = [[_naive_loglikelihood(peft, tokenizer, c, k) for k in cands] for c, cands in SCORE_REQUESTS[:2]]
    assert torch.allclose(torch.tensor(sum(fast, [])), torch.tensor(sum(naive, [])), atol=1e-4)
    with peft.disable_adapter():  # the adapter changes the numbers, so the test above saw it
        base = loglikelihoods(peft, tokenizer, SCORE_REQUESTS[:1])
    assert abs(base[0][0] - fast[0][0]) > 1e-3


@pytest.fixture
def small_data(tmp_path):
    root = tmp_path / "data"
    _write_task(root, "boolq", [
        _rec("Please answer the following question with true or false, question: is Paris in France?\n\n"
             "Answer format: true/false", "true"),
        _rec("Please answer the following question with true or false, question: is a cat a dog?\n\n"
             "Answer format: true/false", "false"),
        _rec("question: is the mat red?\n\nAnswer format: true/false", "false"),
    ])
    _write_task(root, "social_i_qa", [
        _rec("Please choose the correct answer to the question: where did the cat sit?\n\n"
             "Answer1: the mat Answer2: the sky Answer3: Paris\n\nAnswer format: answer1/answer2/answer3", "answer1"),
        _rec("question?\n\nAnswer format: answer1/answer2/answer3", "answer3"),
    ])
    return root


@pytest.mark.parametrize("protocol", ["score", "generate"])
def test_evaluate_writes_documented_outputs(protocol, small_data, tmp_path, tokenizer):
    model = _lively_model()
    out = tmp_path / "res" / "results.json"
    cfg = EvalConfig(tasks=["boolq", "social_i_qa"], protocol=protocol, batch_size=2, max_new_tokens=6)
    res = evaluate(model, tokenizer, cfg, data_dir=small_data, out=out, model_name="tiny", progress=False)
    assert isinstance(res, EvalResults) and res.protocol == protocol
    assert [res.per_task[t]["n"] for t in ("boolq", "social_i_qa")] == [3, 2]
    for t, r in res.per_task.items():
        recs = [x for x in res.records if x["task"] == t]
        assert r["accuracy"] == sum(x["correct"] for x in recs) / len(recs)
        assert all(x["correct"] == (x["prediction"] == x["answer"]) for x in recs)
    assert res.average == pytest.approx(sum(r["accuracy"] for r in res.per_task.values()) / 2)
    if protocol == "score":  # predictions are the argmax of the labels the record allows
        for x in res.records:
            assert x["prediction"] == max(x["loglikelihoods"], key=x["loglikelihoods"].get)
        assert set(res.records[3]["loglikelihoods"]) == {"answer1", "answer2", "answer3"}
    else:
        assert all(x["prediction"] == extract_answer(x["task"], x["response"]) for x in res.records)
    data = json.loads(out.read_text())
    assert data["average"] == pytest.approx(res.average) and data["model"] == "tiny" and data["adapter"] is None
    for key in ("accuracy", "n", "protocol", "model", "adapter", "seconds", "examples_per_s"):
        assert key in data["per_task"]["boolq"], key
    lines = [json.loads(x) for x in (out.parent / "results.examples.jsonl").read_text().splitlines()]
    assert len(lines) == 5 and all({"task", "response", "prediction", "answer", "correct"} <= set(x) for x in lines)
    md = (out.parent / "results.md").read_text()
    assert "| boolq | 3 |" in md and "**average**" in md


def test_evaluate_checks_data_before_compute(small_data, tokenizer):
    model = make_model()
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    with pytest.raises(DataError, match="piqa/test.json not found"):
        evaluate(model, tokenizer, EvalConfig(tasks=["boolq", "piqa"]), data_dir=small_data, progress=False)
    assert calls == []


@pytest.fixture
def tiny_dir(tmp_path, tokenizer):
    from rora.artifacts import save_model_dir

    path = tmp_path / "tiny"
    save_model_dir(make_model(), tokenizer, path)
    return path


def test_cli_eval_prints_table_and_writes(tiny_dir, small_data, tmp_path):
    out = tmp_path / "r.json"
    args = ["eval", str(tiny_dir), "--tasks", "boolq", "--protocol", "score", "--limit", "2", "--data-dir",
            str(small_data), "--out", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "| boolq | 2 |" in result.output and json.loads(out.read_text())["per_task"]["boolq"]["n"] == 2
    again = CliRunner().invoke(main, args)  # an existing result is kept unless --overwrite
    assert again.exit_code == 2 and "--overwrite" in again.output
    assert CliRunner().invoke(main, args + ["--overwrite"]).exit_code == 0


@pytest.mark.parametrize("extra, message", [
    (["--tasks", "boolq,piqaa"], "unknown task 'piqaa' (did you mean 'piqa'?); known tasks: boolq, piqa"),
    (["--limit", "0"], "eval.limit must be > 0"),
    (["--protocol", "beam"], "eval.protocol must be one of generate, score, lm-eval"),
    (["--data-dir", "/nonexistent/dir"], "expected layout: <dir>/<task>/test.json"),
])
def test_cli_eval_bad_input_one_line_exit_2(extra, message, tiny_dir, small_data, tmp_path):
    args = ["eval", str(tiny_dir), "--data-dir", str(small_data), "--out", str(tmp_path / "r.json")] + extra
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and message in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "r.json").exists()


def test_adapter_that_does_not_fit_names_the_module(tmp_path, tiny_dir, small_data):
    from peft import LoraConfig, get_peft_model

    other = make_model(intermediate=80)  # the adapter was trained on a model with narrower MLPs
    get_peft_model(other, LoraConfig(r=2, target_modules=["up_proj"])).save_pretrained(tmp_path / "adapter")
    with pytest.raises(MergeError, match=r"model\.layers\.0\.mlp\.up_proj has shape"):
        load_adapter(make_model(), tmp_path / "adapter")
    result = CliRunner().invoke(main, ["eval", str(tiny_dir), "--adapter", str(tmp_path / "adapter"), "--data-dir",
                                       str(small_data), "--tasks", "boolq", "--out", str(tmp_path / "r.json")])
    assert result.exit_code == 2 and "does not fit the model: model.layers.0.mlp.up_proj" in result.output
