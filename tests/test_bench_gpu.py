"""benchmarks/bench_gpu.py at its tiny size on CPU, end to end, with the packages a GPU machine lacks made
unimportable (datasets, gguf, lm_eval, matplotlib): every side and stage runs and reports sane figures."""
from __future__ import annotations

import json
import math
import subprocess
import sys

from conftest import REPO, subprocess_env

# Imported by Python at start-up (site) in every process of the run, the benchmark's children included.
BLOCK = "import sys\nfor name in ('datasets', 'gguf', 'lm_eval', 'matplotlib'):\n    sys.modules[name] = None\n"


def test_bench_gpu_tiny_runs_every_side_and_stage_without_the_missing_packages(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCK)
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_gpu.py"), "--tiny", "--out", str(out)],
                          env=subprocess_env(PYTHONPATH=f"{site}:{REPO}"), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads((out / "gpu.json").read_text())
    assert set(data["environment"]["versions"]) >= {"torch", "transformers", "peft", "accelerate"}
    assert data["matmul_peak_tflops"] > 0

    speed = data["speed"]
    sides = speed["sides"]
    assert list(sides) == ["rora-sft", "hf-trainer", "rora-kd", "naive-kd", "rora-sft-fp32"]
    assert "skipped" in sides["rora-sft-fp32"]  # an fp32 student differs from the others on GPU only
    for name in ("rora-sft", "hf-trainer", "rora-kd", "naive-kd"):
        side = sides[name]
        assert "error" not in side and "skipped" not in side, (name, side)
        assert side["tokens_per_second"] > 0 and side["peak_gib"] > 0 and side["steps"] == 4, (name, side)
        assert math.isfinite(side["heldout_loss"]) and 0 < side["mfu"] and 0 < side["mfu_measured_peak"]
        if name.endswith("kd"):
            assert math.isfinite(side["heldout_kl"]) and side["heldout_kl"] >= 0
            assert side["flops_per_token"] > sides["rora-sft"]["flops_per_token"]  # the teacher's forward
    assert [g["met"] is not None for g in speed["goals"]] == [True] * 5

    stages = data["7b"]["stages"]
    assert list(stages) == ["build", "prune", "reconstruct", "kd", "kd-checkpointing", "kd-fp32-student", "merge",
                            "loglik"]
    for name, stage in stages.items():
        assert "error" not in stage and "skipped" not in stage, (name, stage)
        assert stage["seconds"] >= 0 and stage["peak_gib"] > 0, (name, stage)
    assert stages["prune"]["params_after"] < stages["prune"]["params_before"] == stages["build"]["parameters"]
    kd = [stages[k] for k in ("kd", "kd-checkpointing", "kd-fp32-student")]
    assert [k["gradient_checkpointing"] for k in kd] == [False, True, False]
    assert all(k["tokens_per_second"] > 0 and k["student_dtype"] == "float32" for k in kd)  # CPU: fp32 throughout
    assert stages["merge"]["max_abs_diff"] <= stages["merge"]["tolerance"]
    assert stages["loglik"]["model"] == "merged" and stages["loglik"]["all_finite"]
    assert stages["loglik"]["examples_per_second"] > 0
    assert set(data["7b"]["stages_over_card"]) == {"40 GB", "80 GB"}

    table = (out / "gpu.md").read_text()
    assert "| rora-kd |" in table and "| kd-checkpointing |" in table and "goal >= 1.5" in table
