"""The trainer: the labelled-position loss equals the HF loss, loss decreases, outputs and manifest, bad input,
NaN handling, a SIGKILLed run resumed bit-identically, 2-process data parallel, and the CLI."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import (assert_sigkill_resume_is_bit_identical, even_odd_records, make_model, make_tokenizer,
                      recover_worker, run_two_processes, subprocess_env, tiny_recover_config)
from safetensors.torch import load_file

from rora.config import RecoverConfig
from rora.errors import ConfigError, DataError, OutputExistsError, TrainingError
from rora.recovery import trainer as trainer_mod
from rora.recovery.data import collate, tokenize_record
from rora.recovery.trainer import LabelledTokenLoss, recover


pytestmark = pytest.mark.usefixtures("one_thread")

PY = sys.executable


records, tiny_config = even_odd_records, tiny_recover_config


def test_labelled_position_loss_equals_hf_loss(tokenizer):
    from peft import get_peft_model

    from rora.recovery.methods import peft_config

    model = make_model()
    pm = get_peft_model(model, peft_config(RecoverConfig(rank=4, dropout=0.0), model)).eval()
    exs = [tokenize_record(r, tokenizer, 256, False) for r in records(3)]
    ids, labels = collate(exs, pad_id=tokenizer.pad_token_id)
    summed, count = LabelledTokenLoss(pm)(ids, labels)
    ref = pm(input_ids=ids, labels=labels).loss  # HF: full logits, mean over labelled positions
    assert int(count) == sum((labels[:, 1:] != -100).sum(1).tolist()) > 0
    torch.testing.assert_close(summed / count, ref, rtol=1e-5, atol=1e-6)


def test_loss_decreases_and_outputs_are_complete(tokenizer, tmp_path):
    from peft import PeftModel

    out = tmp_path / "run"
    result = recover(make_model(), tokenizer, records(), tiny_config(max_steps=12, lr=2e-2), out, progress=False, source="tiny")
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    val = [r["val_loss"] for r in evals if "val_loss" in r]
    train = [r["loss"] for r in evals if "loss" in r]
    assert len(val) == 6 and len(train) == 12
    assert min(val) < 0.7 * val[0] and result.best_val_loss == min(val)
    assert sum(train[-3:]) < 0.7 * sum(train[:3])
    assert result.steps == 12 and result.train_tokens > 0 and result.tokens_per_second > 0
    assert result.effective_scale == pytest.approx(8 / 4**0.5)
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "checkpoints", "loss.png", "metrics.jsonl", "rora.json"]
    assert (out / "adapter" / "adapter_config.json").is_file() and (out / "adapter" / "adapter_model.safetensors").is_file()
    assert [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step")] == ["step-10"]
    manifest = json.loads((out / "rora.json").read_text())
    report = manifest["report"]
    assert manifest["source"]["model"] == "tiny" and manifest["config"]["method"] == "rora" and report["scaling_exponent"] == 0.5
    assert report["best_step"] == result.best_step and report["peft"]["use_rslora"] is True
    assert set(report["module_scales"].values()) == {4.0} and len(report["module_scales"]) == 10
    # The saved adapter is the best one and reloads with plain PEFT to the returned model's logits.
    reloaded = PeftModel.from_pretrained(make_model(), out / "adapter").eval()
    ids = torch.tensor([tokenize_record(records(1)[0], tokenizer, 256, False).input_ids])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, result.model(ids).logits, rtol=0, atol=1e-6)


def test_in_memory_run_and_dropped_examples_are_reported(tokenizer):
    recs = records(30) + [{"instruction": "x " * 400, "input": "", "output": "y"}] * 3
    result = recover(make_model(), tokenizer, recs, tiny_config(max_steps=2, method="dora"), progress=False)
    assert result.adapter_dir is None and result.metrics_path is None
    assert result.dropped_too_long == 3 and result.best_step == 2


def test_eval_steps_zero_never_validates_and_keeps_the_split_held_out(tokenizer, tmp_path):
    """eval_steps 0 skips the validation passes (a demo's last one costs ~30 s): the same training, the final weights
    as the result, the validation records still kept out of training."""
    runs = {n: recover(make_model(), tokenizer, records(), tiny_config(max_steps=4, eval_steps=n), tmp_path / str(n),
                       progress=False) for n in (4, 0)}
    once, never = runs[4], runs[0]
    rows = [json.loads(line) for line in (tmp_path / "0" / "metrics.jsonl").read_text().splitlines()]
    assert not any("val_loss" in r for r in rows) and [r["step"] for r in rows] == [1, 2, 3, 4]
    assert never.best_step is None and never.best_val_loss is None and once.best_step == 4
    sizes = [{k: json.loads((tmp_path / str(n) / "rora.json").read_text())["report"][k]
              for k in ("train_examples", "val_examples")} for n in (4, 0)]
    assert sizes[0] == sizes[1] and sizes[1]["val_examples"] > 0
    ids = torch.tensor([tokenize_record(records(1)[0], tokenizer, 256, False).input_ids])
    with torch.no_grad():
        torch.testing.assert_close(never.model(ids).logits, once.model(ids).logits, rtol=0, atol=0)
    for bad, why in ((dict(eval_steps=-1), "eval_steps"), (dict(eval_steps=0, lr="auto"), "eval_steps > 0")):
        with pytest.raises(ConfigError, match=why):
            RecoverConfig(**bad)


def test_bad_input_writes_nothing_and_keeps_existing_output(tokenizer, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        recover(make_model(), tokenizer, records(), tiny_config(), out, progress=False)
    assert (out / "keep.txt").read_text() == "precious"
    fresh = tmp_path / "fresh"
    with pytest.raises(ConfigError, match="it has:"):
        recover(make_model(), tokenizer, records(), tiny_config(target_modules=["c_attn"]), fresh, progress=False)
    with pytest.raises(DataError, match="empty"):
        recover(make_model(), tokenizer, [], tiny_config(), fresh, progress=False)
    with pytest.raises(DataError, match="record 2 has no 'instruction'"):
        recover(make_model(), tokenizer, records(2) + [{"output": "x"}], tiny_config(), fresh, progress=False)
    assert not fresh.exists()


def test_resume_with_a_different_config_is_refused(tokenizer, tmp_path, monkeypatch):
    out = tmp_path / "run"

    def crash(self, *args):
        raise RuntimeError("simulated crash after the last checkpoint")

    with monkeypatch.context() as m:
        m.setattr(trainer_mod._Run, "finish", crash)
        with pytest.raises(RuntimeError, match="simulated crash"):
            recover(make_model(), tokenizer, records(), tiny_config(max_steps=4), out, progress=False)
    partial = trainer_mod.partial_dir(out)
    before = sorted(p.relative_to(partial) for p in partial.rglob("*"))
    assert not out.exists() and any(p.name == "step-2" for p in before)
    with pytest.raises(TrainingError, match=r"different config \(rank: 4 -> 8\)"):
        recover(make_model(), tokenizer, records(), tiny_config(max_steps=4, rank=8), out, resume=True, progress=False)
    with pytest.raises(TrainingError, match="the base model differs"):
        recover(make_model(seed=1), tokenizer, records(), tiny_config(max_steps=4), out, resume=True, progress=False)
    assert sorted(p.relative_to(partial) for p in partial.rglob("*")) == before


def test_non_finite_loss_stops_with_clear_message_and_keeps_checkpoint(tokenizer, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = LabelledTokenLoss.forward

    def poisoned(self, input_ids, labels):
        summed, count = real(self, input_ids, labels)
        calls["n"] += 1
        return (summed * float("nan") if calls["n"] > 4 * 2 else summed), count  # 2 micro-batches per step

    monkeypatch.setattr(LabelledTokenLoss, "forward", poisoned)
    out = tmp_path / "run"
    cfg = tiny_config(eval_steps=100, val_set_size=0)
    with pytest.raises(TrainingError, match=r"loss became nan at step 5.*checkpoints/step-4.*--warmup-steps"):
        recover(make_model(), tokenizer, records(), cfg, out, progress=False)
    ckpt = trainer_mod.partial_dir(out) / "checkpoints" / "step-4"  # the unfinished run stays beside `out`
    assert not out.exists()
    assert (ckpt / "adapter" / "adapter_model.safetensors").is_file()
    assert all(torch.isfinite(t).all() for t in load_file(ckpt / "optimizer.safetensors").values())


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("worker")
    make_model().save_pretrained(root / "model")
    make_tokenizer().save_pretrained(root / "model")
    (root / "data.json").write_text(json.dumps(records(40)))
    return root


_env = subprocess_env


def _worker(root, out, cfg, **env):
    return recover_worker(root, root / "model", None, out, cfg, **env)


def test_sigkilled_run_resumes_bit_identically(saved_model, tmp_path):
    cfg = tiny_config(max_steps=8).to_dict()
    assert_sigkill_resume_is_bit_identical(lambda out, **env: _worker(saved_model, out, cfg, **env),
                                           tmp_path / "full", tmp_path / "killed", steps=8)


def test_two_process_data_parallel_writes_one_adapter(saved_model, tmp_path):
    from peft import PeftModel

    out = tmp_path / "ddp"
    cmd, env = _worker(saved_model, out, tiny_config(max_steps=3, eval_steps=3, save_steps=2).to_dict())
    results = run_two_processes(cmd, env, tmp_path / "results", port=29533)
    assert len(results) == 2 and results[0] == results[1]  # both processes agree on loss, steps, tokens
    manifest = json.loads((out / "rora.json").read_text())
    assert manifest["report"]["num_processes"] == 2 and manifest["report"]["steps"] == 3
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "checkpoints", "loss.png", "metrics.jsonl", "rora.json"]
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".ddp")] == []  # no stray temp dirs
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len([line for line in lines if '"loss"' in line]) == 3  # written once, by the main process
    model = PeftModel.from_pretrained(make_model(), out / "adapter")
    assert any(torch.count_nonzero(p) for n, p in model.named_parameters() if "lora_B" in n)  # it trained


def test_cli_recover_summary_and_errors(saved_model, tmp_path):
    out = tmp_path / "cli"
    base = [str(Path(PY).parent / "rora"), "recover", str(saved_model / "model"), "--data", str(saved_model / "data.json"),
            "--out", str(out), "--rank", "4", "--max-steps", "2", "--batch-size", "4", "--micro-batch-size", "2",
            "--val-set-size", "4", "--eval-steps", "1", "--save-steps", "1"]
    done = subprocess.run(base + ["--method", "lora"], env=_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "method         lora rank 4 alpha 8 (scale 2)" in done.stdout and "best val loss" in done.stdout
    again = subprocess.run(base, env=_env(), capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and again.stderr.count("\n") == 1 and "already exists" in again.stderr
    bad = subprocess.run(base + ["--method", "lorra", "--overwrite"], env=_env(), capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "did you mean 'lora'" in bad.stderr
    assert (out / "adapter" / "adapter_model.safetensors").is_file()  # the failed runs lost nothing
