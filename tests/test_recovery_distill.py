"""Distillation: the chunked KL equals the full-logit KL (value and gradients), a student equal to its teacher
has KL 0 and no gradient, kd lowers the held-out KL of a pruned model, held-out metrics, and bad input."""
from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import (assert_sigkill_resume_is_bit_identical, even_odd_records, make_model, make_tokenizer,
                      recover_worker, run_two_processes, subprocess_env, tiny_recover_config)
from safetensors.torch import load_file

from rora.config import RecoverConfig
from rora.errors import ConfigError
from rora.recovery.data import collate, tokenize_record
from rora.measure import heldout_metrics
from rora.recovery.distill import DistillLoss, chunked_kl, record_examples
from rora.recovery.trainer import partial_dir, recover

pytestmark = pytest.mark.usefixtures("one_thread")

PY = sys.executable


records = even_odd_records


def kd_config(**kw):
    return tiny_recover_config(**{"objective": "kd", **kw})


def _student(model, seed=0):
    """A PEFT-wrapped student whose lora_B is random (PEFT starts it at zero, which would zero lora_A's gradient)."""
    from peft import get_peft_model

    from rora.recovery.methods import peft_config

    pm = get_peft_model(model, peft_config(RecoverConfig(rank=4, dropout=0.0), model))
    torch.manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return pm.eval()


def _batch(tokenizer, n=4):
    """Examples of different lengths, right-padded: the padding must not count."""
    recs = [{"instruction": "x " * (3 * i) + "Is it true?", "input": "", "output": "the correct answer is true"}
            for i in range(n)]
    exs = [tokenize_record(r, tokenizer, 256, False) for r in recs]
    ids, labels = collate(exs, tokenizer.pad_token_id)
    lengths = torch.tensor([len(e) for e in exs])
    assert len(set(lengths.tolist())) == n  # every row but the longest has padding
    return ids, labels, lengths


def _full_logit_kl(student, teacher, ids, lengths, temperature):
    """The reference: both models' full logits, KL over the positions that predict a real token."""
    s = student(input_ids=ids).logits[:, :-1].float() / temperature
    with torch.no_grad():
        t = teacher(input_ids=ids).logits[:, :-1].float() / temperature
    keep = torch.arange(ids.shape[1] - 1)[None, :] < (lengths[:, None] - 1)
    kl = F.kl_div(s.log_softmax(-1)[keep], t.log_softmax(-1)[keep], log_target=True, reduction="sum")
    return kl * temperature**2


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_chunked_kl_equals_full_logit_kl_with_gradients(tokenizer, temperature):
    teacher = make_model(seed=1)
    student = _student(make_model(seed=0))
    ids, labels, lengths = _batch(tokenizer)
    params = [p for p in student.parameters() if p.requires_grad]
    ref = _full_logit_kl(student, teacher, ids, lengths, temperature)
    ref_grads = torch.autograd.grad(ref, params)
    assert ref > 1.0  # different models: a real divergence, not a trivial zero
    for chunk in (1, 7, 64, 10_000):
        kd, sft, _ = DistillLoss(student, teacher, temperature, chunk, sft=False)(ids, labels, lengths)
        assert float(sft) == 0.0
        torch.testing.assert_close(kd, ref, rtol=1e-5, atol=1e-5)
        grads = torch.autograd.grad(kd, params)
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)  # fp32 sums over ~250 positions
        assert any(g.abs().sum() > 0 for g in grads)


def test_chunked_kl_gradient_reaches_a_trainable_head():
    torch.manual_seed(0)
    hidden = torch.randn(11, 8, requires_grad=True)
    head, t_head = torch.nn.Linear(8, 30, bias=False), torch.nn.Linear(6, 30, bias=False)
    t_hidden = torch.randn(11, 6)
    for chunk in (3, 11):
        got, _ = chunked_kl(hidden, head, t_hidden, t_head, 1.7, chunk)
        g_h, g_w = torch.autograd.grad(got * 3.0, [hidden, head.weight])  # the upstream gradient is honoured
        s, t = head(hidden) / 1.7, t_head(t_hidden).detach() / 1.7
        ref = F.kl_div(s.log_softmax(-1), t.log_softmax(-1), log_target=True, reduction="sum") * 1.7**2
        r_h, r_w = torch.autograd.grad(ref * 3.0, [hidden, head.weight])
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(g_h, r_h, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(g_w, r_w, rtol=1e-5, atol=1e-6)


def test_unlikely_pairs_are_the_earlier_distinct_tokens_but_the_next_one():
    from rora.recovery.distill import unlikely_pairs

    # row 0: 5 6 5 7 (4 tokens), row 1: 8 8 9 then padding; keep: the positions that predict a real token
    ids = torch.tensor([[5, 6, 5, 7], [8, 8, 9, 0]])
    keep = torch.tensor([[True, True, True], [True, True, False]])
    got = sorted(map(tuple, unlikely_pairs(ids, keep).tolist()))
    # rows 0-2 (row 0's positions): {5} minus 6 / {5, 6} minus 5 / {5, 6} minus 7; rows 3-4: {8} minus 8 / {8} minus 9
    assert got == [(0, 5), (1, 6), (2, 5), (2, 6), (4, 8)]


def test_unlikelihood_term_and_its_gradient_match_autograd():
    """ChunkedKL with unlikelihood pairs: the first output is KL + u * -sum log(1 - p(c)), its gradient what autograd
    gives through softmax; the second output is the unlikelihood sum alone. Pairs span chunks, a row holds several."""
    torch.manual_seed(0)
    hidden = torch.randn(7, 8, requires_grad=True)
    head, t_head = torch.nn.Linear(8, 20, bias=False), torch.nn.Linear(8, 20, bias=False)
    t_hidden = torch.randn(7, 8)
    pairs = torch.tensor([[0, 3], [2, 1], [2, 4], [2, 19], [5, 0], [6, 7]])
    s, t = head(hidden), t_head(t_hidden).detach()
    ul_ref = -torch.log1p(-s.softmax(-1)[pairs[:, 0], pairs[:, 1]]).sum()
    kl_ref = F.kl_div(s.log_softmax(-1), t.log_softmax(-1), log_target=True, reduction="sum")
    r_h, r_w = torch.autograd.grad(kl_ref + 0.7 * ul_ref, [hidden, head.weight])
    assert float(ul_ref.detach()) > 0.1  # a real term, not a rounding
    for chunk in (3, 7):
        got, ul = chunked_kl(hidden, head, t_hidden, t_head, 1.0, chunk, unlikely=pairs, ul_weight=0.7)
        g_h, g_w = torch.autograd.grad(got, [hidden, head.weight])
        torch.testing.assert_close(ul, ul_ref.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got, (kl_ref + 0.7 * ul_ref).detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(g_h, r_h, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(g_w, r_w, rtol=1e-5, atol=1e-6)


def test_unlikelihood_lowers_the_probability_of_context_tokens(tokenizer):
    """A few steps on the KL + unlikelihood objective leave the student's probability of its context's other tokens
    lower than the KL alone does, from the same start: the term does what it is for."""
    from rora.recovery.distill import unlikely_pairs

    teacher = make_model(seed=1)
    ids, labels, lengths = _batch(tokenizer)
    keep = torch.arange(ids.shape[1] - 1)[None, :] < (lengths[:, None] - 1)
    pairs = unlikely_pairs(ids, keep)
    mass = {}
    for weight in (0.0, 2.0):
        student = _student(make_model(seed=0))
        loss = DistillLoss(student, teacher, 1.0, 16, sft=False, unlikelihood=weight)
        opt = torch.optim.SGD([p for p in student.parameters() if p.requires_grad], lr=0.05)
        for _ in range(5):
            kd, _, ul = loss(ids, labels, lengths)
            assert (float(ul) > 0) == (weight > 0)
            opt.zero_grad()
            kd.backward()
            opt.step()
        with torch.no_grad():
            probs = student(input_ids=ids).logits[:, :-1][keep].softmax(-1)
        mass[weight] = float(probs[pairs[:, 0], pairs[:, 1]].sum())
    assert mass[2.0] < 0.9 * mass[0.0]


def test_student_equal_to_teacher_has_zero_kl_and_zero_gradient(tokenizer):
    from peft import get_peft_model

    from rora.recovery.methods import peft_config

    teacher = make_model(seed=3)
    student = get_peft_model(copy.deepcopy(teacher), peft_config(RecoverConfig(rank=4), teacher)).eval()
    ids, labels, lengths = _batch(tokenizer)
    kd, _, _ = DistillLoss(student, teacher, 1.0, 5, sft=False)(ids, labels, lengths)
    kd.backward()
    assert abs(float(kd.detach())) < 1e-6
    grads = [p.grad for p in student.parameters() if p.requires_grad]
    assert grads and all(g is not None and float(g.abs().max()) == 0.0 for g in grads)
    m = heldout_metrics(teacher, teacher, tokenizer, record_examples(records(6), tokenizer, 256))
    assert m["kl"] == pytest.approx(0.0, abs=1e-6) and m["tokens"] > 0


def test_heldout_metrics_loss_is_the_whole_text_nll(tokenizer):
    model = make_model(seed=2)
    texts = ["A cat sat on the mat.", "The capital of France is Paris. the correct answer is true"]
    got = heldout_metrics(model, None, tokenizer, texts, batch_size=2, chunk_size=3)
    nll = n = 0
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor([tokenizer(text)["input_ids"]])
            nll += float(model(input_ids=ids, labels=ids).loss) * (ids.shape[1] - 1)
            n += ids.shape[1] - 1
    assert got["kl"] is None and got["tokens"] == n
    assert got["loss"] == pytest.approx(nll / n, rel=1e-5)
    other = heldout_metrics(model, make_model(seed=5), tokenizer, texts)
    assert other["kl"] > 0.01 and other["loss"] == pytest.approx(got["loss"], rel=1e-5)


def _pruned(teacher):
    from rora.architecture import keep_units, layer_shapes, sync_config

    student = copy.deepcopy(teacher)
    for layer in student.model.layers:
        keep_units(layer, student.config, keep_q=[0, 2, 3], keep_kv=[0, 2, 3], keep_channels=list(range(0, 96, 2)))
    sync_config(student.config, layer_shapes(student))
    return student


def test_kd_lowers_the_heldout_kl_of_a_pruned_model(tokenizer, tmp_path):
    teacher = make_model(seed=4)
    student = _pruned(teacher)
    held_out = record_examples(records(80)[60:], tokenizer, 256)
    before = heldout_metrics(student, teacher, tokenizer, held_out)
    out = tmp_path / "kd"
    result = recover(student, tokenizer, records(60), kd_config(max_steps=12, lr=1e-2), out, progress=False,
                     teacher=teacher)
    after = heldout_metrics(result.model, teacher, tokenizer, held_out)
    assert after["kl"] < 0.7 * before["kl"] and after["loss"] < before["loss"]
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in logged if "val_loss" in r]
    assert all(r["val_loss"] == r["val_kl"] and "val_text_loss" in r and "val_response_loss" in r for r in evals)
    assert result.best_val_loss == min(r["val_kl"] for r in evals) and result.val_metrics["val_kl"] == result.best_val_loss
    assert all("kl" in r for r in logged if "loss" in r)
    manifest = json.loads((out / "rora.json").read_text())
    assert manifest["config"]["objective"] == "kd" and manifest["report"]["teacher"] and manifest["report"]["peft"]["use_rslora"] is True


def test_kd_plus_sft_weighs_both_terms(tokenizer, tmp_path):
    teacher = make_model(seed=4)
    cfg = kd_config(objective="kd+sft", kd_weight=0.25, max_steps=2, eval_steps=1)
    recover(_pruned(teacher), tokenizer, records(30), cfg, tmp_path / "run", progress=False, teacher=teacher)
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in logged if "loss" in r]
    evals = [r for r in logged if "val_loss" in r]
    assert len(steps) == len(evals) == 2
    for r in steps:
        assert r["kl"] > 0 and r["sft"] > 0 and r["loss"] == pytest.approx(0.25 * r["kl"] + 0.75 * r["sft"], rel=1e-6)
    for r in evals:
        assert r["val_loss"] == pytest.approx(0.25 * r["val_kl"] + 0.75 * r["val_response_loss"], rel=1e-9)


def test_unlikelihood_enters_the_objective_and_is_logged_apart(tokenizer, tmp_path):
    """With unlikelihood u the step's objective is w * (KL + u * UL) + (1 - w) * SFT; the logged KL is the KL alone,
    and the validation objective (what the best adapter is chosen by) has no unlikelihood in it."""
    teacher = make_model(seed=4)
    cfg = kd_config(objective="kd+sft", kd_weight=0.25, unlikelihood=0.5, max_steps=2, eval_steps=1)
    recover(_pruned(teacher), tokenizer, records(30), cfg, tmp_path / "run", progress=False, teacher=teacher)
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in logged if "loss" in r]
    assert len(steps) == 2
    for r in steps:
        assert r["unlikelihood"] > 0 and r["kl"] > 0
        assert r["loss"] == pytest.approx(0.25 * (r["kl"] + 0.5 * r["unlikelihood"]) + 0.75 * r["sft"], rel=1e-5)
    for r in (r for r in logged if "val_loss" in r):
        assert r["val_loss"] == pytest.approx(0.25 * r["val_kl"] + 0.75 * r["val_response_loss"], rel=1e-9)


def test_the_objective_is_described_with_what_shapes_it():
    assert RecoverConfig(objective="sft").describe_objective() == "sft"
    assert RecoverConfig(objective="kd", kd_temperature=2.0).describe_objective() == "kd (T=2)"
    both = RecoverConfig(objective="kd+sft", kd_weight=0.6, unlikelihood=1.0)
    assert both.describe_objective() == "kd+sft (T=1, kd weight 0.6, unlikelihood 1)"
    assert RecoverConfig(objective="auto").describe_objective("kd") == "kd (T=1)"


@pytest.mark.parametrize("changes", [{"objective": "sft"}, {"kd_temperature": 2.0}, {"unlikelihood": -1.0}])
def test_unlikelihood_refuses_what_it_cannot_ride_on(changes):
    from rora.errors import ConfigError

    with pytest.raises(ConfigError, match="recover.unlikelihood"):
        RecoverConfig(**{"objective": "kd", "unlikelihood": 1.0, **changes})


def test_sft_with_a_teacher_logs_the_kl_too(tokenizer):
    teacher = make_model(seed=4)
    result = recover(_pruned(teacher), tokenizer, records(30), kd_config(objective="sft", max_steps=2), progress=False,
                     teacher=teacher)
    assert result.best_val_loss == result.val_metrics["val_response_loss"] and result.val_metrics["val_kl"] > 0


def test_teacher_in_bf16_keeps_rope_in_fp32():
    """prepare_teacher casts the weights only: `.to(bf16)` would round RoPE's fp32 inv_freq (0.4% off, a cosine
    off by up to 0.9 at position 1000), so every distillation target on a GPU (teacher_dtype auto = bf16) would
    drift from what the teacher computes at long positions."""
    from rora.recovery.distill import prepare_teacher

    teacher = make_model()
    inv_freq = teacher.model.rotary_emb.inv_freq.clone()
    prepare_teacher(teacher, "cpu", torch.bfloat16)
    assert {p.dtype for p in teacher.parameters()} == {torch.bfloat16}
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    assert teacher.model.rotary_emb.inv_freq.dtype == torch.float32
    assert torch.equal(teacher.model.rotary_emb.inv_freq, inv_freq)


@pytest.mark.parametrize("teacher, teacher_tok, match", [
    (lambda: make_model(vocab=400), None, r"vocabulary differs.*400 tokens, the student's 384"),
    (lambda: make_model(), lambda: make_tokenizer(vocab_size=300), r"tokenizer differs.*300 tokens vs the student's 384"),
    (lambda: _base_model(), None, r"not a causal LM"),
    (lambda: None, None, r"objective 'kd' needs a teacher"),
    ("student", None, r"teacher must be a separate model"),
])
def test_bad_teacher_is_refused_before_anything_is_written(tokenizer, tmp_path, teacher, teacher_tok, match):
    out = tmp_path / "run"
    student = make_model()
    with pytest.raises(ConfigError, match=match):
        recover(student, tokenizer, records(), kd_config(), out, progress=False,
                teacher=student if teacher == "student" else teacher(),
                teacher_tokenizer=teacher_tok() if teacher_tok else None)
    assert not out.exists()


def _base_model():
    from transformers import AutoModel

    return AutoModel.from_config(make_model().config)


@pytest.mark.parametrize("value", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_temperature_is_refused(value):
    with pytest.raises(ConfigError, match="recover.kd_temperature must be a finite number"):
        kd_config(kd_temperature=value)


# ---- plain text and teacher-written text --------------------------------------------------------------------------
TEXT = "The capital of France is Paris. A cat sat on the mat. " * 30


def test_text_is_packed_into_cutoff_length_sequences(tokenizer, tmp_path):
    from rora.recovery.data import pack_texts
    from rora.sources.text import read_documents

    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"text": "A cat sat."}) + "\n\n" + json.dumps({"text": TEXT}) + "\n")
    docs = read_documents(path)
    assert docs == ["A cat sat.", TEXT]
    seqs = pack_texts(docs, tokenizer, 16)
    stream = [t for d in docs for t in tokenizer(d)["input_ids"] + [tokenizer.eos_token_id]]
    assert [t for s in seqs for t in s.input_ids] == stream  # nothing lost, EOS between documents
    assert all(len(s) == 16 for s in seqs[:-1]) and 2 <= len(seqs[-1]) <= 16
    assert all(s.labels == s.input_ids for s in seqs)


@pytest.mark.parametrize("objective", ["kd", "sft"])
def test_recover_on_a_text_file(tokenizer, tmp_path, objective):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    teacher = make_model(seed=4)
    cfg = kd_config(objective=objective, text=str(path), cutoff_len=32, val_set_size=2, max_steps=4, lr=1e-2)
    result = recover(_pruned(teacher), tokenizer, None, cfg, progress=False, teacher=teacher)
    metrics = result.val_metrics
    assert metrics["val_response_loss"] == pytest.approx(metrics["val_text_loss"])  # plain text: every token labelled
    assert result.best_val_loss == pytest.approx(metrics["val_kl" if objective == "kd" else "val_text_loss"], rel=1e-6)


@pytest.mark.parametrize("content, match", [
    (b"", "holds no text"),
    (b"  \n\n ", "holds no text"),
    (b"caf\xe9 au lait", r"is not UTF-8 text \(invalid byte 0xe9 at offset 3\)"),
])
def test_bad_text_file_is_refused_before_anything_is_written(tokenizer, tmp_path, content, match):
    from rora.errors import DataError

    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    out = tmp_path / "run"
    with pytest.raises(DataError, match=match):
        recover(make_model(), tokenizer, None, kd_config(text=str(path)), out, progress=False, teacher=make_model())
    assert not out.exists()


def test_bad_text_sources_are_refused(tokenizer, tmp_path):
    from rora.errors import DataError

    bad = tmp_path / "rows.jsonl"
    bad.write_text('{"text": "fine"}\n{"txt": "typo"}\n')
    with pytest.raises(DataError, match=r"rows.jsonl line 2 has no string 'text' field"):
        recover(make_model(), tokenizer, None, kd_config(text=str(bad)), progress=False, teacher=make_model())
    with pytest.raises(DataError, match="not both"):
        recover(make_model(), tokenizer, records(), kd_config(text=str(bad)), progress=False, teacher=make_model())
    with pytest.raises(DataError, match="no training data"):
        recover(make_model(), tokenizer, None, kd_config(), progress=False, teacher=make_model())
    with pytest.raises(ConfigError, match="data-free mode"):
        recover(make_model(), tokenizer, None, kd_config(objective="sft", synthetic=4), progress=False)


def test_teacher_written_text_is_cached_and_reused(tokenizer, tmp_path, monkeypatch):
    from rora.recovery import synthetic
    from rora.sources import text

    monkeypatch.setenv("RORA_CACHE_DIR", str(tmp_path / "cache"))
    teacher = make_model(seed=4)
    cfg = kd_config(synthetic=12, synthetic_tokens=24, cutoff_len=64, val_set_size=2, max_steps=3)
    first = recover(_pruned(teacher), tokenizer, records(20), cfg, tmp_path / "a", progress=False, teacher=teacher)
    cached = list((tmp_path / "cache" / "synthetic").glob("*.jsonl"))
    assert len(cached) == 1
    texts = [json.loads(line)["text"] for line in cached[0].read_text().splitlines()]
    prompts = synthetic.synthetic_prompts(records(20), 12, cfg.seed)
    assert len(texts) == 12 and all(t.startswith(p.strip()[:40]) and len(t) > len(p.strip()) for t, p in zip(texts, prompts))
    settings = json.loads(cached[0].with_suffix(".json").read_text())
    assert settings["texts"] == 12 and settings["new_tokens"] == 24 and settings["teacher"]

    def no_sampling(*a, **k):
        raise AssertionError("the cached texts should have been reused")

    monkeypatch.setattr(text, "sample", no_sampling)
    second = recover(_pruned(teacher), tokenizer, records(20), cfg, tmp_path / "b", progress=False, teacher=teacher)
    fingerprint = [json.loads((tmp_path / d / "rora.json").read_text())["report"]["data_fingerprint"] for d in "ab"]
    assert fingerprint[0] == fingerprint[1] and first.best_val_loss == second.best_val_loss
    with pytest.raises(AssertionError, match="reused"):  # other generation settings: other texts
        recover(_pruned(teacher), tokenizer, records(20), kd_config(**{**cfg.to_dict(), "synthetic_temperature": 0.7}),
                progress=False, teacher=teacher)


def test_teacher_writes_from_seed_prompts_without_records(tokenizer, tmp_path, monkeypatch):
    from rora.sources.text import GENERAL_OPENINGS as SEED_PROMPTS

    monkeypatch.setenv("RORA_CACHE_DIR", str(tmp_path / "cache"))
    teacher = make_model(seed=4)
    cfg = kd_config(synthetic=8, synthetic_tokens=16, cutoff_len=32, val_set_size=2, max_steps=2)
    result = recover(_pruned(teacher), tokenizer, None, cfg, progress=False, teacher=teacher)
    (cached,) = (tmp_path / "cache" / "synthetic").glob("*.jsonl")
    texts = [json.loads(line)["text"] for line in cached.read_text().splitlines()]
    assert all(any(t.startswith(p) for p in SEED_PROMPTS) for t in texts) and result.steps == 2


# ---- SIGKILL + resume, 2-process data parallel, the CLI -----------------------------------------------------------
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("kd-worker")
    make_model(seed=0).save_pretrained(root / "student")
    make_tokenizer().save_pretrained(root / "student")
    make_model(seed=1).save_pretrained(root / "teacher")
    make_tokenizer().save_pretrained(root / "teacher")
    make_model(vocab=400).save_pretrained(root / "other-vocab")
    make_tokenizer(vocab_size=400).save_pretrained(root / "other-vocab")
    (root / "data.json").write_text(json.dumps(records(40)))
    return root


_env = subprocess_env


def _worker(root, out, cfg, **env):
    return recover_worker(root, root / "student", root / "teacher", out, cfg, **env)


def test_kd_sigkilled_run_resumes_bit_identically(saved, tmp_path):
    cfg = kd_config(max_steps=8).to_dict()
    full, resumed = assert_sigkill_resume_is_bit_identical(lambda out, **env: _worker(saved, out, cfg, **env),
                                                           tmp_path / "full", tmp_path / "killed", steps=8)
    assert resumed["val_metrics"] == full["val_metrics"] and "val_kl" in full["val_metrics"]


def test_kd_two_process_data_parallel_matches_one_process(saved, tmp_path):
    # No dropout: its masks are drawn per process, so only then must both runs compute the same steps.
    cfg = kd_config(max_steps=3, eval_steps=3, save_steps=2, dropout=0.0).to_dict()
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    cmd, env = _worker(saved, single, cfg)
    subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=120)
    cmd, env = _worker(saved, ddp, cfg)
    results = run_two_processes(cmd, env, tmp_path / "results", port=29541)
    assert len(results) == 2 and results[0] == results[1]
    manifest = json.loads((ddp / "rora.json").read_text())
    assert manifest["report"]["num_processes"] == 2 and manifest["config"]["objective"] == "kd"
    a, b = (load_file(d / "adapter" / "adapter_model.safetensors") for d in (single, ddp))
    assert any(torch.count_nonzero(v) for k, v in b.items() if "lora_B" in k)
    for k in a:  # each process ran its own teacher on its share; the mean gradient is the single process's
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)
    one = json.loads((single / "rora.json").read_text())
    assert manifest["report"]["best_val_loss"] == pytest.approx(one["report"]["best_val_loss"], rel=1e-5)


def test_cli_recover_kd_and_its_errors(saved, tmp_path):
    from click.testing import CliRunner

    from rora.cli import main

    out = tmp_path / "cli"
    base = ["recover", str(saved / "student"), "--data", str(saved / "data.json"), "--out", str(out), "--rank", "4",
            "--max-steps", "2", "--batch-size", "4", "--micro-batch-size", "2", "--val-set-size", "4",
            "--eval-steps", "1", "--save-steps", "1", "--objective", "kd"]
    done = CliRunner().invoke(main, base + ["--teacher", str(saved / "teacher"), "--kd-temperature", "2"])
    assert done.exit_code == 0, done.output
    assert "objective      kd (T=2)" in done.output and "best val KL" in done.output
    assert "KL to the teacher" in done.output
    again = CliRunner().invoke(main, base + ["--teacher", str(saved / "teacher"), "--objective", "kd+sft",
                                             "--unlikelihood", "0.5", "--out", str(tmp_path / "ul")])
    assert again.exit_code == 0, again.output
    assert "objective      kd+sft (T=1, kd weight 0.5, unlikelihood 0.5)" in again.output
    steps = [json.loads(line) for line in (tmp_path / "ul" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["unlikelihood"] > 0 for r in steps if "loss" in r)
    empty, latin1 = tmp_path / "empty.txt", tmp_path / "latin1.txt"
    empty.write_text("")
    latin1.write_bytes(b"caf\xe9")
    fresh = tmp_path / "fresh"
    text_args = [a if a != str(out) else str(fresh) for a in base if a not in ("--data", str(saved / "data.json"))]
    for args, message in [
        (base + ["--overwrite"], "objective 'kd' needs a teacher"),
        (base + ["--teacher", str(saved / "other-vocab"), "--overwrite"], "tokenizer differs from the student's: 400 tokens"),
        (base + ["--teacher", str(saved / "teacher"), "--kd-temperature", "0", "--overwrite"], "kd_temperature must be a finite"),
        (base + ["--teacher", str(saved / "teacher"), "--kd-temperature", "nan", "--overwrite"], "kd_temperature must be a finite"),
        (base + ["--teacher", str(saved / "teacher"), "--kd-temperature", "2", "--unlikelihood", "1", "--overwrite"],
         "recover.unlikelihood rides on the distillation loss"),
        (text_args + ["--teacher", str(saved / "teacher"), "--text", str(empty)], "holds no text"),
        (text_args + ["--teacher", str(saved / "teacher"), "--text", str(latin1)], "is not UTF-8 text"),
    ]:
        bad = CliRunner().invoke(main, args)
        # The last stderr line (in-process, transformers' weight-loading bars may precede it; the CLI hides them).
        last = bad.stderr.strip().splitlines()[-1]
        assert bad.exit_code == 2 and last.startswith("rora: error:") and message in last, (args, bad.output)
        assert "Traceback" not in bad.stderr
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and not fresh.exists()


def test_kd_non_finite_loss_stops_and_keeps_the_checkpoint(tokenizer, tmp_path, monkeypatch):
    from rora.errors import TrainingError

    calls = {"n": 0}
    real = DistillLoss.forward

    def poisoned(self, input_ids, labels, lengths, written=False):
        kd, sft, ul = real(self, input_ids, labels, lengths, written)
        calls["n"] += 1
        return (kd * float("nan") if calls["n"] > 4 * 2 else kd), sft, ul  # 2 micro-batches per step

    monkeypatch.setattr(DistillLoss, "forward", poisoned)
    out = tmp_path / "run"
    with pytest.raises(TrainingError, match=r"loss became nan at step 5.*checkpoints/step-4"):
        recover(make_model(), tokenizer, records(), kd_config(val_set_size=0), out, progress=False,
                teacher=make_model(seed=1))
    assert all(torch.isfinite(t).all() for t in load_file(partial_dir(out) / "checkpoints" / "step-4" / "optimizer.safetensors").values())


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
def test_text_and_records_mix_at_the_token_ratio(tokenizer, tmp_path, ratio):
    from rora.recovery.data import mix, prepare, prepare_text

    path = tmp_path / "corpus.txt"
    path.write_text(TEXT * 20)
    cfg = kd_config(val_set_size=2)
    text, recs = prepare_text(path, tokenizer, cfg), prepare(records(40), tokenizer, cfg)
    mixed = mix(text, recs, ratio)
    from_text = sum(len(e) for e in mixed.train if e in text.train)
    total = sum(len(e) for e in mixed.train)
    assert from_text / total == pytest.approx(ratio, abs=0.08)
    assert all(e in text.train or e in recs.train for e in mixed.train)
    assert mixed.val == text.val + recs.val  # the best checkpoint is chosen on both kinds of held-out text
    assert mixed.fingerprint != mix(text, recs, 0.9).fingerprint


def test_recover_on_teacher_written_general_text_mixed_with_records(tokenizer, tmp_path, monkeypatch):
    from rora.sources.text import GENERAL_OPENINGS

    monkeypatch.setenv("RORA_CACHE_DIR", str(tmp_path / "cache"))
    teacher = make_model(seed=4)
    cfg = kd_config(synthetic=40, synthetic_tokens=24, synthetic_prompts="general", text_ratio=0.5, val_set_size=2,
                    max_steps=2)
    result = recover(_pruned(teacher), tokenizer, records(20), cfg, tmp_path / "run", progress=False, teacher=teacher)
    (cached,) = (tmp_path / "cache" / "synthetic").glob("*.jsonl")
    texts = [json.loads(line)["text"] for line in cached.read_text().splitlines()]
    assert all(any(t.startswith(p) for p in GENERAL_OPENINGS) for t in texts)  # general text, not the records' prompts
    assert result.steps == 2 and result.val_metrics["val_kl"] > 0


def test_bfloat16_training_precision_changes_the_numbers_slightly_and_keeps_the_adapter_float32(tokenizer, tmp_path):
    """recover.precision bfloat16 runs student and teacher under bfloat16 autocast, on a CPU too: the losses move
    by bfloat16's rounding, not more, and the trained adapter stays float32; auto on a CPU is float32 exactly. One
    process runs all three (accelerate would refuse to change its mixed precision)."""
    teacher = make_model(seed=4)
    runs = {}
    for precision in ("float32", "bfloat16", "auto"):
        cfg = kd_config(max_steps=3, lr=1e-2, precision=precision)
        result = recover(_pruned(teacher), tokenizer, records(30), cfg, tmp_path / precision, progress=False,
                         teacher=teacher)
        logged = [json.loads(line) for line in (tmp_path / precision / "metrics.jsonl").read_text().splitlines()]
        weights = load_file(tmp_path / precision / "adapter" / "adapter_model.safetensors")
        assert {w.dtype for w in weights.values()} == {torch.float32}
        runs[precision] = ([r["loss"] for r in logged if "loss" in r], result.best_val_loss)
    assert runs["auto"] == runs["bfloat16" if torch.cuda.is_available() else "float32"]
    (fp32, val32), (bf16, val16) = runs["float32"], runs["bfloat16"]
    assert len(fp32) == len(bf16) == 3 and fp32 != bf16
    assert bf16 == pytest.approx(fp32, rel=0.05) and val16 == pytest.approx(val32, rel=0.05)
