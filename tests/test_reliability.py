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
    from rora.pipelines.run import run_pipeline

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


# ---- issue 19: data loss at the edges, the manifest chain, one adapter loader, storage errors, modes, leftovers ---

RECOVER_ARGS = ["--rank", "4", "--max-steps", "4", "--batch-size", "4", "--micro-batch-size", "2", "--val-set-size",
                "4", "--eval-steps", "2", "--save-steps", "2", "--warmup-steps", "0"]  # a checkpoint at step 2


def _cli(*argv):
    return CliRunner().invoke(main, [str(a) for a in argv])


def _one_line_error(result, fragment):
    lines = result.stderr.splitlines()
    assert result.exit_code == 2 and lines[-1].startswith("rora: error: ") and fragment in lines[-1], result.output
    assert result.stderr.count("rora: error:") == 1 and "Traceback" not in result.output


@pytest.fixture
def saved(tokenizer, tmp_path):
    save_model_dir(make_model(), tokenizer, tmp_path / "model")
    (tmp_path / "data.json").write_text(json.dumps(records()))
    return tmp_path


def test_a_reused_pid_in_a_partial_run_does_not_block_resume_but_a_live_owner_does(saved, monkeypatch):
    def crash(self, source):
        raise RuntimeError("simulated crash")

    with monkeypatch.context() as m:
        m.setattr(trainer_mod._Run, "finish", crash)
        result = _cli("recover", saved / "model", "--data", saved / "data.json", "--out", saved / "rec", *RECOVER_ARGS)
    assert result.exit_code == 1 and (saved / ".rec.partial" / "checkpoints" / "step-2").is_dir()
    marker = saved / ".rec.partial" / MARKER
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        time.sleep(0.2)
        marker.write_text(json.dumps({**process_identity(live.pid), "token": "t"}))  # another process trains
        _one_line_error(_cli("recover", saved / "model", "--data", saved / "data.json", "--out", saved / "rec",
                             "--resume", *RECOVER_ARGS), f"another rora process (pid {live.pid})")
        # the same pid, but another process's start time: the pid was reused after the owner died
        marker.write_text(json.dumps({**process_identity(live.pid), "start": 1, "token": "t"}))
        resumed = _cli("recover", saved / "model", "--data", saved / "data.json", "--out", saved / "rec", "--resume",
                       *RECOVER_ARGS)
    finally:
        live.kill()
    assert resumed.exit_code == 0, resumed.output
    assert sorted(p.name for p in saved.iterdir()) == ["data.json", "model", "rec"]
    assert not (saved / "rec" / MARKER).exists()


def test_merge_refuses_a_recovery_whose_base_was_repruned_in_place(saved):
    prune = ["prune", saved / "model", "--out", saved / "pruned", "--importance", "l2", "--num-samples", "2"]
    assert _cli(*prune, "--ratio", "0.25").exit_code == 0
    trained = _cli("recover", saved / "pruned", "--data", saved / "data.json", "--out", saved / "rec", *RECOVER_ARGS)
    assert trained.exit_code == 0, trained.output
    assert _cli("merge", saved / "rec", "--out", saved / "merged").exit_code == 0  # the base it was trained on
    assert _cli(*prune, "--ratio", "0.5", "--overwrite").exit_code == 0  # re-pruned in place, same path
    _one_line_error(_cli("merge", saved / "rec", "--out", saved / "merged2"), "has changed since")
    assert not (saved / "merged2").exists()


def _tiny_run(root, out, **changes):
    from rora.config import PipelineConfig

    (root / "evaldata" / "boolq").mkdir(parents=True, exist_ok=True)
    (root / "evaldata" / "boolq" / "test.json").write_text(json.dumps(
        [{**r, "answer": "true" if i % 2 == 0 else "false"} for i, r in enumerate(records(4))]))
    return PipelineConfig.from_dict({
        "model": str(root / "model"), "out": str(out), "data": str(root / "data.json"),
        "data_dir": str(root / "evaldata"), "skip": ["eval_base", "eval_pruned", "eval_reconstructed"],
        "prune": {"ratio": 0.25, "importance": "l2", "num_samples": 2, "seq_len": 16, "holdout_samples": 2},
        "reconstruct": {"num_samples": 8, "holdout_samples": 4, "seq_len": 32},
        "recover": {"rank": 4, "max_steps": 2, "batch_size": 4, "micro_batch_size": 2, "val_set_size": 4,
                    "warmup_steps": 0, "eval_steps": 2, "save_steps": 2},
        "eval": {"tasks": ["boolq"], "limit": 2, "batch_size": 2}, **changes})


def test_run_says_when_obs_importance_read_too_little_text(saved):
    """The prune stage passes the report's calibration warning on (2 x 16 tokens against down_proj's 96 inputs)."""
    from rora.pipelines.run import run_pipeline

    said = []
    only_prune = ["eval_base", "eval_pruned", "reconstruct", "eval_reconstructed", "recover", "merge", "eval_recovered",
                  "export"]
    cfg = _tiny_run(saved, saved / "obs-run", skip=only_prune)
    cfg = cfg.replace(prune=cfg.prune.replace(importance="obs"))
    run_pipeline(cfg, say=said.append, progress=False)
    assert [m for m in said if "warning" in m] == [
        "[prune] warning: obs importance read 32 calibration tokens, fewer than down_proj's 96 inputs, so its order is "
        "little better than Taylor's; give it thousands of tokens of a corpus (--calibration corpus.parquet "
        "--num-samples 64)"]


def test_run_rebuilds_a_deleted_or_changed_stage_output_and_ignores_a_malformed_record(saved):
    import shutil

    from rora.pipelines.run import run_pipeline

    cfg = _tiny_run(saved, saved / "run", skip=["eval_base", "eval_pruned", "eval_reconstructed", "recover", "merge",
                                                         "eval_recovered"])
    assert run_pipeline(cfg, progress=False).stages["prune"]["skipped"] is False
    assert run_pipeline(cfg, progress=False).stages["prune"]["skipped"] is True
    shutil.rmtree(saved / "run" / "pruned")  # its done-record stays
    rerun = run_pipeline(cfg, progress=False)
    assert rerun.stages["prune"]["skipped"] is False and (saved / "run" / "pruned" / "model.safetensors").is_file()
    (saved / "run" / "pruned" / "config.json").write_text("{}")  # changed since it was written
    assert run_pipeline(cfg, progress=False).stages["prune"]["skipped"] is False
    for garbage in ("[" * 100_000, "[1, 2]", json.dumps({"fingerprint": ["x"]})):
        (saved / "run" / "stages" / "prune.json").write_text(garbage)
        assert run_pipeline(cfg, progress=False).stages["prune"]["skipped"] is False
    (saved / "run" / "stages" / "export.json").write_text(json.dumps({"fingerprint": 5}))
    assert run_pipeline(cfg, progress=False).stages["export"]["skipped"] is False


def test_run_restores_a_finished_recovery_only_through_the_one_adapter_loader(saved):
    from safetensors.torch import load_file

    from rora.errors import ModelLoadError
    from rora.pipelines.run import run_pipeline

    cfg = _tiny_run(saved, saved / "run", skip=["eval_base", "eval_pruned", "eval_reconstructed", "merge",
                                                         "eval_recovered", "export"])
    run_pipeline(cfg, progress=False)
    adapter = saved / "run" / "recovery" / "adapter"
    torch.save(load_file(adapter / "adapter_model.safetensors"), adapter / "adapter_model.bin")
    (adapter / "adapter_model.safetensors").unlink()
    assert run_pipeline(cfg, progress=False).stages["recover"]["skipped"] is False  # not what it wrote: retrained
    assert (adapter / "adapter_model.safetensors").is_file() and not (adapter / "adapter_model.bin").exists()
    # a record without the output's fingerprint (an older rora's) is restored, but never through a pickle
    torch.save(load_file(adapter / "adapter_model.safetensors"), adapter / "adapter_model.bin")
    (adapter / "adapter_model.safetensors").unlink()
    record = json.loads((saved / "run" / "stages" / "recover.json").read_text())
    del record["output_fingerprint"]
    (saved / "run" / "stages" / "recover.json").write_text(json.dumps(record))
    with pytest.raises(ModelLoadError, match="--allow-pickle"):
        run_pipeline(cfg, progress=False)


def _fill_disk(*args, **kwargs):
    from safetensors import SafetensorError

    raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


def test_a_full_disk_while_writing_safetensors_is_one_line_and_keeps_the_older_output(saved, monkeypatch):
    import transformers.modeling_utils

    prune = ["prune", saved / "model", "--out", saved / "pruned", "--importance", "l2", "--num-samples", "2"]
    assert _cli(*prune).exit_code == 0
    before = (saved / "pruned" / "model.safetensors").read_bytes()
    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", _fill_disk)  # safetensors' own error type
    _one_line_error(_cli(*prune, "--ratio", "0.5", "--overwrite"), f"cannot write {saved / 'pruned'}: No space left")
    assert (saved / "pruned" / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in saved.iterdir()) == ["data.json", "model", "pruned"]


def test_a_full_small_file_system_is_one_line_and_leaves_nothing(saved):
    small = saved / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(small)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (not root, or no CAP_SYS_ADMIN); the patched writer test covers it")
    try:
        _one_line_error(_cli("prune", saved / "model", "--out", small / "pruned", "--importance", "l2", "--num-samples",
                             "2"), "No space left on device")
        assert list(small.iterdir()) == []
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_every_file_a_run_writes_honours_the_umask_and_a_relative_gguf_export_works(saved, monkeypatch):
    from rora.pipelines.run import run_pipeline

    monkeypatch.chdir(saved)
    old = os.umask(0o022)
    try:
        cfg = _tiny_run(saved, "runs/relative", skip=["eval_base", "eval_pruned", "eval_reconstructed"],
                       export={"format": "gguf"})
        run_pipeline(cfg, progress=False)
        exported = _cli("export", saved / "model", "--format", "gguf", "--out", "m.gguf")
    finally:
        os.umask(old)
    assert exported.exit_code == 0, exported.output
    written = [p for p in (saved / "runs").rglob("*")] + [saved / n for n in ("m.gguf", "m.md", "m.rora.json")]
    assert {p.suffix for p in written} >= {".safetensors", ".gguf", ".json", ".jsonl", ".md", ".png"}
    modes = {str(p.relative_to(saved)): stat.S_IMODE(p.stat().st_mode) for p in written}
    assert modes == {name: 0o755 if (saved / name).is_dir() else 0o644 for name in modes}
    assert (saved / "runs" / "relative" / "model.gguf").is_file() and not list(saved.glob(".*"))


def test_a_flag_wins_over_a_preset_s_exclusive_setting():
    import yaml

    result = _cli("run", "--preset", "quickstart", "--limit", "2", "--print-config")
    assert result.exit_code == 0, result.output
    assert {k: yaml.safe_load(result.output)["eval"][k] for k in ("limit", "sample")} == {"limit": 2, "sample": None}
