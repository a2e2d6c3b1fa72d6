"""FSDP through accelerate, on 2 CPU processes (gloo): `accelerate launch --config_file rora/accelerate/fsdp.yaml
-m rora recover ... --objective kd` shards the student, trains the adapter a single process trains, writes what a
single process writes, and resumes a killed run under the same config bit-identically."""
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import (REPO, assert_sigkill_resume_is_bit_identical, even_odd_records, recover_worker,
                      save_student_and_teacher, subprocess_env, tiny_recover_config)

CONFIG = REPO / "rora" / "accelerate" / "fsdp.yaml"
# Each process computes its share of a step's micro-batches; their gradients are summed by a reduce-scatter
# instead of accumulated in one process, so a few ulps may differ (measured: 0 on this CPU).
RTOL, ATOL = 1e-4, 1e-6


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = save_student_and_teacher(tmp_path_factory.mktemp("fsdp"), even_odd_records(40))
    (root / "prose.txt").write_text("The capital of France is Paris.\n\nA cat sat on the mat. The answer is true.\n\n"
                                    "Please answer the following question with true or false.\n")
    (root / "no-dropout.yaml").write_text("dropout: 0.0\n")  # masks are drawn per process: off, to compare
    return root


def _launch(args: list[str], port: int) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--config_file", str(CONFIG),
            "--num_processes", "2", "--main_process_port", str(port), *args]


def _files(directory):
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.name != "rora.json")


def test_fsdp_kd_recovery_on_two_processes_trains_the_single_process_adapter(saved, tmp_path):
    single, sharded = tmp_path / "single", tmp_path / "fsdp"
    args = ["-m", "rora", "recover", str(saved / "student"), "--teacher", str(saved / "teacher"), "--data",
            str(saved / "data.json"), "--objective", "kd", "--config", str(saved / "no-dropout.yaml"),
            "--prose", str(saved / "prose.txt"), "--rank", "4", "--max-steps", "4", "--batch-size", "4",
            "--micro-batch-size", "2", "--val-set-size", "6", "--eval-steps", "2", "--save-steps", "2",
            "--warmup-steps", "0", "--lr", "5e-3", "--seed", "7"]
    for cmd, out in (([sys.executable, *args], single), (_launch(args, 29651), sharded)):
        done = subprocess.run(cmd + ["--out", str(out)], env=subprocess_env(), capture_output=True, text=True,
                              timeout=240)
        assert done.returncode == 0, done.stderr[-3000:]
    one, two = (json.loads((d / "rora.json").read_text())["report"] for d in (single, sharded))
    assert (two["distributed"], two["num_processes"], one["num_processes"]) == ("FSDP", 2, 1)
    assert _files(sharded) == _files(single)  # the main process alone wrote, the same files
    for name in ("adapter", "checkpoints/best/adapter", "checkpoints/step-2/adapter"):
        a, b = (load_file(d / name / "adapter_model.safetensors") for d in (single, sharded))
        assert a.keys() == b.keys() and any(torch.count_nonzero(v) for k, v in b.items() if "lora_B" in k)
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=RTOL, atol=ATOL)
    a, b = (load_file(d / "checkpoints/step-2/optimizer.safetensors") for d in (single, sharded))
    assert a.keys() == b.keys() and all(b[k].shape == a[k].shape for k in a)  # whole moments, not one shard
    assert two["best_step"] == one["best_step"] == 4
    for figures in ("val_metrics", "prose"):
        for key, value in one[figures].items():
            if isinstance(value, float):
                assert two[figures][key] == pytest.approx(value, rel=RTOL), (figures, key)


def test_fsdp_killed_run_resumes_bit_identically_under_the_same_config(saved, tmp_path):
    cfg = tiny_recover_config(objective="kd", max_steps=6, dropout=0.05).to_dict()

    def worker(out, **env):
        cmd, environment = recover_worker(saved, saved / "student", saved / "teacher", out, cfg, **env)
        return _launch(cmd[1:], 29652), environment

    full, resumed = assert_sigkill_resume_is_bit_identical(worker, tmp_path / "full", tmp_path / "killed", steps=6)
    assert resumed["distributed"] == "FSDP" and resumed["val_metrics"] == full["val_metrics"]
