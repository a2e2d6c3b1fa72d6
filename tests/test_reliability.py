"""Reliability promises that are not bad input: permissions, stale temporaries, a replaced recovery run kept
until its successor is complete, write-time OS errors, the error line after a progress bar, one pickle rule."""
from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
import sys
import time

import pytest
import torch
from click.testing import CliRunner
from conftest import make_model

from rora.artifacts import MARKER, atomic_dir, process_identity, remove_stale_temporaries, save_model_dir, write_json
from rora.cli import main
from rora.config import RecoverConfig
from rora.registry import TASKS as TASK_NAMES
from rora.recovery import trainer as trainer_mod
from rora.recovery.trainer import LabelledTokenLoss, recover

pytestmark = pytest.mark.usefixtures("one_thread")


def records(n=24):
    return [{"instruction": f"Is {i} even? Answer true or false.", "input": "",
             "output": f"the correct answer is {'true' if i % 2 == 0 else 'false'}"} for i in range(n)]


def tiny(**kw):
    return RecoverConfig(**{**dict(rank=4, max_steps=4, batch_size=4, micro_batch_size=2, val_set_size=4, eval_steps=2,
                                   save_steps=2, warmup_steps=0, lr=5e-3, seed=7), **kw})


def test_outputs_honour_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "out") as tmp:
            write_json(tmp / "a.json", {"x": 1})
        write_json(tmp_path / "b.json", {})
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert (mode(tmp_path / "out"), mode(tmp_path / "out" / "a.json"), mode(tmp_path / "b.json")) == (0o755, 0o644, 0o644)


def _marked(directory, **identity):
    """A directory holding rora's ownership marker for `identity` (pid, start, boot)."""
    directory.mkdir()
    (directory / MARKER).write_text(json.dumps({**process_identity(), **identity, "token": "t"}))
    (directory / "weights").write_bytes(b"x" * 100)
    return directory


def test_only_marked_leftovers_of_gone_processes_are_removed(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    me = process_identity()
    leftovers = {
        _marked(tmp_path / ".out.tmp-a1", pid=dead.pid): True,  # its process is gone
        _marked(tmp_path / ".out.tmp-a2", start=me["start"] - 1): True,  # this pid, but reused: another process's
        _marked(tmp_path / ".out.tmp-a3", boot="another-boot"): True,  # written before a reboot
        _marked(tmp_path / ".out.tmp-a4"): False,  # a run still going (this one)
        _marked(tmp_path / ".other.tmp-a5", pid=dead.pid): False,  # another output's
    }
    for name in (f".out.tmp-{dead.pid}-abc", f".out.old-{dead.pid}"):  # rora's old names, but no marker: the user's
        (tmp_path / name).mkdir()
        (tmp_path / name / "precious").write_text("keep")
        leftovers[tmp_path / name] = False
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "f").write_text("new")
    assert {p: not p.exists() for p in leftovers} == leftovers
    assert remove_stale_temporaries(tmp_path / "out") == []
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["f"]  # the marker is not published


def test_an_older_output_a_kill_left_in_its_holder_is_put_back(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    holder = _marked(tmp_path / ".out.old-x1", pid=dead.pid)
    (holder / "out").mkdir()
    (holder / "out" / "model.safetensors").write_text("the older output")
    assert remove_stale_temporaries(tmp_path / "out") == [holder]
    assert (tmp_path / "out" / "model.safetensors").read_text() == "the older output" and not holder.exists()


def test_recover_overwrite_keeps_the_old_run_until_the_new_one_is_complete(tokenizer, tmp_path, monkeypatch):
    out = tmp_path / "run"
    recover(make_model(), tokenizer, records(), tiny(), out, progress=False)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def crash(self):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(trainer_mod._Run, "train", crash)
        with pytest.raises(KeyboardInterrupt):
            recover(make_model(), tokenizer, records(), tiny(rank=2), out, overwrite=True, progress=False)
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # the failed run without a checkpoint left nothing

    result = recover(make_model(), tokenizer, records(), tiny(rank=2), out, overwrite=True, progress=False)
    assert json.loads((out / "rora.json").read_text())["config"]["rank"] == 2
    assert result.adapter_dir == out / "adapter" and sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_write_error_is_one_line_naming_the_path_and_leaves_nothing(tokenizer, tmp_path, monkeypatch):
    save_model_dir(make_model(), tokenizer, tmp_path / "model")
    (tmp_path / "data.json").write_text(json.dumps(records()))

    def full_disk(self, record):
        raise OSError(errno.ENOSPC, "No space left on device", str(self.out / "metrics.jsonl"))

    monkeypatch.setattr(trainer_mod._Run, "log", full_disk)
    result = CliRunner().invoke(main, ["recover", str(tmp_path / "model"), "--data", str(tmp_path / "data.json"),
                                       "--out", str(tmp_path / "rec"), "--rank", "4", "--max-steps", "2",
                                       "--batch-size", "4", "--micro-batch-size", "2", "--val-set-size", "4"])
    last = result.stderr.splitlines()[-1]  # after the progress bar, which had started
    assert result.exit_code == 2 and result.stderr.count("rora: error:") == 1 and "Traceback" not in result.output
    assert last.startswith("rora: error: ") and "No space left on device" in last and "metrics.jsonl" in last
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.json", "model"]


def test_error_after_a_progress_bar_is_the_last_line_on_stderr(tokenizer, tmp_path, monkeypatch):
    save_model_dir(make_model(), tokenizer, tmp_path / "model")
    (tmp_path / "data.json").write_text(json.dumps(records()))
    calls = {"n": 0}
    real = LabelledTokenLoss.forward

    def poisoned(self, input_ids, labels):
        summed, count = real(self, input_ids, labels)
        calls["n"] += 1
        return (summed * float("nan") if calls["n"] > 2 * 2 else summed), count

    monkeypatch.setattr(LabelledTokenLoss, "forward", poisoned)
    result = CliRunner().invoke(main, ["recover", str(tmp_path / "model"), "--data", str(tmp_path / "data.json"),
                                       "--out", str(tmp_path / "rec"), "--rank", "4", "--max-steps", "4",
                                       "--batch-size", "4", "--micro-batch-size", "2", "--val-set-size", "0",
                                       "--save-steps", "2"])
    assert result.exit_code == 2
    assert "recover:" in result.stderr  # the bar was drawn
    assert result.stderr.endswith("\n") and result.stderr.splitlines()[-1].startswith("rora: error: loss became nan")
    assert "--warmup-steps" in result.stderr and "--warmup-steps" in CliRunner().invoke(main, ["recover", "--help"]).output


def test_run_accepts_tasks_all_like_eval():
    import yaml

    result = CliRunner().invoke(main, ["run", "--preset", "quickstart", "--tasks", "all", "--print-config"])
    assert result.exit_code == 0, result.output
    assert yaml.safe_load(result.output)["eval"]["tasks"] == list(TASK_NAMES.names())


def test_pickle_opt_in_is_one_rule_for_models_and_adapters(tokenizer, tmp_path):
    from peft import get_peft_model
    from safetensors.torch import load_file

    from rora.recovery.methods import peft_config

    save_model_dir(make_model(), tokenizer, tmp_path / "model")
    torch.save(load_file(tmp_path / "model" / "model.safetensors"), tmp_path / "model" / "pytorch_model.bin")
    (tmp_path / "model" / "model.safetensors").unlink()
    model = make_model()
    get_peft_model(model, peft_config(RecoverConfig(rank=4), model)).save_pretrained(tmp_path / "adapter")
    weights = tmp_path / "adapter" / "adapter_model.safetensors"
    torch.save(load_file(weights), tmp_path / "adapter" / "adapter_model.bin")
    weights.unlink()
    for argv in (["info", tmp_path / "model"], ["merge", tmp_path / "model", "--adapter", tmp_path / "adapter",
                                                  "--out", tmp_path / "merged"]):
        refused = CliRunner().invoke(main, [str(a) for a in argv])
        assert refused.exit_code == 2 and "--allow-pickle" in refused.stderr
        allowed = CliRunner().invoke(main, [str(a) for a in argv] + ["--allow-pickle"])
        assert allowed.exit_code == 0, allowed.output
    assert (tmp_path / "merged" / "model.safetensors").is_file()


def test_readme_reliability_promises_name_real_tests():
    import re

    from conftest import REPO

    text = (REPO / "README.md").read_text()
    section = text[text.index("## Reliability"):text.index("## Python API")]
    named = set(re.findall(r"`(test_\w+)`", section))
    defined = {m for f in (REPO / "tests").glob("test_*.py") for m in re.findall(r"^def (test_\w+)", f.read_text(), re.M)}
    assert len(named) >= 10 and named <= defined, named - defined


def test_run_into_a_foreign_dir_needs_overwrite_which_reruns_every_stage(tokenizer, tmp_path):
    from rora.config import PipelineConfig
    from rora.errors import OutputExistsError
    from rora.pipeline import run_pipeline

    save_model_dir(make_model(), tokenizer, tmp_path / "model")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    only_export = ["eval_base", "prune", "eval_pruned", "recover", "merge", "eval_recovered"]
    cfg = PipelineConfig(model=str(tmp_path / "model"), out=str(tmp_path / "out"), skip=only_export)
    with pytest.raises(OutputExistsError, match="not a rora run"):
        run_pipeline(cfg, progress=False)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["notes.txt"]
    assert run_pipeline(cfg, progress=False, overwrite=True).stages["export"]["skipped"] is False
    assert run_pipeline(cfg, progress=False).stages["export"]["skipped"] is True  # now a rora run: a rerun skips
    assert run_pipeline(cfg, progress=False, overwrite=True).stages["export"]["skipped"] is False
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"  # --overwrite replaces stage outputs, nothing else


def test_unwritable_out_is_refused_before_any_work(tmp_path, monkeypatch):
    """A read-only location (simulated: as root, permission bits do not stop a write) fails in the first second."""
    import rora.artifacts as artifacts

    monkeypatch.setattr(artifacts.os, "access", lambda path, mode: False)
    result = CliRunner().invoke(main, ["prune", str(tmp_path / "no-such-model"), "--out", str(tmp_path / "p")])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert "not writable" in result.stderr and str(tmp_path) in result.stderr  # before the model was even looked at
