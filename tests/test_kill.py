"""SIGKILL during prune, recover, merge, export, and at several points of `rora run`: the kill leaves no output that
looks complete, and a rerun of the same command completes with results equal to an uninterrupted run and removes
the killed run's temporaries. (test_recovery_trainer.py kills the API's recover too, and data parallel.)"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from conftest import make_model, subprocess_env
from safetensors.torch import load_file

from rora.artifacts import save_model_dir

pytestmark = pytest.mark.usefixtures("one_thread")

# Runs the CLI with a pause after one chosen write, so the test can SIGKILL inside it: after the weights of a
# stage's temporary directory are written (prune, merge, export) or after a recovery checkpoint.
PAUSER = textwrap.dedent('''
    import os, pathlib, sys, time
    import rora.artifacts as A, rora.deployment.gguf as G, rora.deployment.hf as E
    from rora.recovery import trainer as T
    where, flag = os.environ.get("PAUSE_AT", ""), os.environ.get("PAUSE_FLAG", "")
    def pausing(real, name):
        def wrapped(*args, **kwargs):
            result = real(*args, **kwargs)
            if where == name:
                pathlib.Path(flag).write_text("paused")
                time.sleep(300)
            return result
        return wrapped
    def stage_pausing(real):  # every model stage writes its manifest last, inside its unfinished output
        def wrapped(output, stage, *args, **kwargs):
            return pausing(real, stage)(output, stage, *args, **kwargs)
        return wrapped
    A.write_stage_manifest = stage_pausing(A.write_stage_manifest)
    E.save_model_dir = pausing(E.save_model_dir, "export")
    G.write_gguf = pausing(G.write_gguf, "gguf")
    T._Run.save_checkpoint = pausing(T._Run.save_checkpoint, "checkpoint")
    from rora.cli import main
    main(sys.argv[1:], prog_name="rora")
''')


_env = subprocess_env


def killed_at(root, where, *argv, sig=signal.SIGKILL):
    """Start `rora ARGV` pausing at `where`, send it `sig` there (SIGKILL); returns the process once it ended."""
    flag = root / f"paused-{where}"
    flag.unlink(missing_ok=True)
    proc = subprocess.Popen([sys.executable, str(root / "pauser.py"), *map(str, argv)],
                            env=_env(PAUSE_AT=where, PAUSE_FLAG=str(flag)), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    while not flag.exists():
        if proc.poll() is not None:
            raise AssertionError(f"rora {' '.join(map(str, argv))} ended before the kill: {proc.stderr.read()[-2000:]}")
        assert time.time() < deadline, "never reached the kill point"
        time.sleep(0.05)
    os.kill(proc.pid, sig)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL or sig != signal.SIGKILL
    return proc


def completes(root, *argv):
    """The rerun, in this process (a live pid other than the killed one's; no second interpreter start-up)."""
    from click.testing import CliRunner

    from rora.cli import main

    done = CliRunner().invoke(main, [str(a) for a in argv])
    assert done.exit_code == 0, (done.output[-3000:], done.exception)
    return done


def hidden(directory):
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(".") and (".tmp-" in p.name or ".old-" in p.name))


def marked_by(directory, pid):
    """The hidden leftovers in `directory` whose ownership marker names the process `pid`."""
    from rora.artifacts import read_marker

    return [n for n in hidden(directory) if (read_marker(directory / n) or {}).get("pid") == pid]


def same_tensors(a, b):
    a, b = load_file(a), load_file(b)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def root(tmp_path, tokenizer):
    save_model_dir(make_model(heads=4, kv_heads=2), tokenizer, tmp_path / "base")
    (tmp_path / "pauser.py").write_text(PAUSER)
    return tmp_path


def test_sigkill_during_prune_then_rerun(root):
    from rora.config import PruneConfig
    from rora.models import load_model
    from rora.pruning.prune import prune, save_pruned

    cfg = PruneConfig(ratio=0.5, importance="l2", num_samples=2, seq_len=16, holdout_samples=2)
    cfg.to_yaml(root / "prune.yaml")
    PRUNE = ["--config", root / "prune.yaml"]
    pid = killed_at(root, "prune", "prune", root / "base", "--out", root / "pruned", *PRUNE).pid
    assert not (root / "pruned").exists()
    assert marked_by(root, pid)  # the killed run's half-written directory, marked as its own
    completes(root, "prune", root / "base", "--out", root / "pruned", *PRUNE)
    assert hidden(root) == []  # removed by the rerun: its process is gone

    model, tok = load_model(root / "base")
    save_pruned(model, tok, prune(model, tok, cfg), root / "reference")
    same_tensors(root / "pruned" / "model.safetensors", root / "reference" / "model.safetensors")


def test_sigkill_during_recover_then_resume(root):
    (root / "data.json").write_text(json.dumps(_records(24)))
    args = ["recover", root / "base", "--data", root / "data.json", "--rank", "4", "--max-steps", "4", "--batch-size", "4",
            "--micro-batch-size", "2", "--val-set-size", "4", "--eval-steps", "2", "--save-steps", "2", "--warmup-steps", "1"]
    killed_at(root, "checkpoint", *args, "--out", root / "rec")
    assert not (root / "rec").exists() and (root / ".rec.partial" / "checkpoints" / "step-2").is_dir()
    completes(root, *args, "--out", root / "rec", "--resume")
    completes(root, *args, "--out", root / "reference")
    assert sorted(p.name for p in root.iterdir() if p.name.startswith(".")) == []
    same_tensors(root / "rec" / "adapter" / "adapter_model.safetensors",
                 root / "reference" / "adapter" / "adapter_model.safetensors")


def test_sigkill_during_merge_and_export_then_rerun(root, tokenizer):
    from peft import get_peft_model

    from rora.config import RecoverConfig
    from rora.models import load_model
    from rora.recovery.merge import merge
    from rora.recovery.methods import peft_config

    model = make_model(heads=4, kv_heads=2)
    peft_model = get_peft_model(model, peft_config(RecoverConfig(rank=4), model))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    peft_model.save_pretrained(root / "adapter")

    killed_at(root, "merge", "merge", root / "base", "--adapter", root / "adapter", "--out", root / "merged")
    assert not (root / "merged").exists() and hidden(root)
    completes(root, "merge", root / "base", "--adapter", root / "adapter", "--out", root / "merged")
    assert hidden(root) == []
    reference, _ = merge(load_model(root / "base")[0], root / "adapter")
    merged = load_file(root / "merged" / "model.safetensors")
    assert all(torch.equal(merged[k], v) for k, v in reference.state_dict().items() if k in merged)

    (root / "deploy").mkdir()
    killed_at(root, "export", "export", root / "merged", "--format", "hf", "--out", root / "deploy" / "model")
    assert not (root / "deploy" / "model").exists() and hidden(root / "deploy")
    completes(root, "export", root / "merged", "--format", "hf", "--out", root / "deploy" / "model")
    assert hidden(root / "deploy") == []
    same_tensors(root / "deploy" / "model" / "model.safetensors", root / "merged" / "model.safetensors")


def _records(n):
    return [{"instruction": f"Is {i} even? Please answer the following question with true or false.", "input": "",
             "output": f"the correct answer is {'true' if i % 2 == 0 else 'false'}", "answer": "true" if i % 2 == 0 else "false"}
            for i in range(n)]


def test_sigkill_at_several_points_of_run_then_rerun_equals_uninterrupted(root):
    from rora.config import PipelineConfig
    from rora.pipelines.run import run_pipeline

    (root / "data" / "boolq").mkdir(parents=True)
    (root / "data" / "boolq" / "train.json").write_text(json.dumps(_records(24)))
    (root / "data" / "boolq" / "test.json").write_text(json.dumps(_records(6)))

    def config(out):
        return PipelineConfig.from_dict({
            "model": str(root / "base"), "out": str(root / out), "data": str(root / "data"), "data_dir": str(root / "data"),
            "skip": ["eval_base", "eval_pruned", "eval_reconstructed"],
            "prune": {"ratio": 0.5, "importance": "l2", "num_samples": 2, "seq_len": 16, "holdout_samples": 2},
            "reconstruct": {"num_samples": 8, "holdout_samples": 4, "seq_len": 32},
            "recover": {"rank": 4, "max_steps": 4, "batch_size": 4, "micro_batch_size": 2, "val_set_size": 4,
                        "warmup_steps": 1, "eval_steps": 2, "save_steps": 2},
            "eval": {"tasks": ["boolq"], "limit": 6, "batch_size": 3},
        })

    config("run").to_yaml(root / "run.yaml")
    for where in ("checkpoint", "merge"):  # mid-recovery (after a checkpoint), then while the merged model is written
        killed_at(root, where, "run", root / "run.yaml")
        assert not (root / "run" / "summary.json").exists()
    assert (root / "run" / "stages" / "prune.json").is_file() and not (root / "run" / "merged").exists()
    completes(root, "run", root / "run.yaml")
    assert hidden(root / "run") == []

    reference = run_pipeline(config("reference"), progress=False)
    summary = json.loads((root / "run" / "summary.json").read_text())
    assert summary["evals"] == reference.evals
    stages = {s for s, t in summary["stages"].items() if t["skipped"]}
    assert stages == {"prune", "reconstruct", "recover"}  # done before the kills; recovery resumed from its checkpoint
    for path in ("recovery/adapter/adapter_model.safetensors", "export/model.safetensors"):
        same_tensors(root / "run" / path, root / "reference" / path)


def test_sigterm_cleans_up_like_ctrl_c(root):
    proc = killed_at(root, "prune", "prune", root / "base", "--out", root / "pruned", "--importance", "l2",
                     "--num-samples", "2", sig=signal.SIGTERM)
    assert proc.returncode == 2 and proc.stderr.read().splitlines()[-1].startswith("rora: error: terminated")
    assert not (root / "pruned").exists() and hidden(root) == []  # its half-written directory went with it


def test_a_killed_gguf_export_leaves_a_marked_work_directory_that_the_next_export_removes(root):
    argv = ["export", root / "base", "--format", "gguf", "--out", root / "deploy" / "m.gguf"]
    (root / "deploy").mkdir()
    pid = killed_at(root, "gguf", *argv).pid
    left = marked_by(root / "deploy", pid)
    assert left and list((root / "deploy" / left[0]).glob("f32-m.gguf"))  # the f32 work file, inside the marked one
    assert sorted(p.name for p in (root / "deploy").iterdir()) == left
    completes(root, *argv)
    assert hidden(root / "deploy") == [] and (root / "deploy" / "m.gguf").is_file()
