"""The GPU path (issue 22): every stage of `rora run` on cuda computes what it computes on the CPU, and the commands
put their models on the GPU by themselves. Skipped without a GPU (CI has none); the device runs it
(tools/device_carry.py's plan). On CPU, test_models and test_bad_input check the device setting itself."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from rora.cli import main
from rora.config import PipelineConfig
from rora.numerics import logits_on
from test_pipeline import tiny_setup as world  # noqa: F401 - the fixture: a tiny model and boolq records

GPU = "cuda"
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


def _run(root, device: str, name: str, precision: str = "float32"):
    """The whole pipeline on `device`; in float32 (no autocast, an fp32 teacher) the GPU must match the CPU, with
    precision auto it runs as a user's run does (bf16 autocast and a bf16 teacher on a GPU)."""
    from rora.pipelines.run import run_pipeline

    teacher = "float32" if precision == "float32" else "auto"
    cfg = PipelineConfig.from_dict({
        "model": str(root / "base"), "out": str(root / name), "data": str(root / "data"),
        "data_dir": str(root / "data"), "device": device, "skip": [],
        "prune": {"ratio": 0.5, "importance": "taylor", "num_samples": 2, "seq_len": 16, "holdout_samples": 2},
        "reconstruct": {"num_samples": 8, "holdout_samples": 4, "seq_len": 32, "precision": precision},
        "recover": {"rank": 4, "max_steps": 3, "batch_size": 4, "micro_batch_size": 2, "val_set_size": 4,
                    "warmup_steps": 1, "eval_steps": 2, "save_steps": 2, "lr": 2e-4, "precision": precision,
                    "teacher_dtype": teacher, "dropout": 0.0},
        "eval": {"tasks": ["boolq"], "precision": precision, "generation": False},
    })
    return run_pipeline(cfg, progress=False)


def test_pipeline_on_the_gpu_computes_what_it_computes_on_the_cpu(world):
    gpu, cpu = _run(world, GPU, "on-gpu"), _run(world, "cpu", "on-cpu")
    assert next(gpu.model.parameters()).device.type == GPU
    assert next(cpu.model.parameters()).device.type == "cpu"
    for stage in ("pruned", "reconstructed", "merged"):  # the same architecture: the same heads and channels kept
        a, b = (json.loads((world / d / stage / "config.json").read_text()) for d in ("on-gpu", "on-cpu"))
        assert a == b, stage
    ids = torch.randint(0, gpu.model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    got, want = logits_on(gpu.model, ids), logits_on(cpu.model, ids)
    assert (got - want).abs().max() <= 1e-3 * want.abs().max(), (got - want).abs().max()
    for label in ("base", "pruned", "reconstructed", "recovered"):
        assert gpu.heldout[label]["tokens"] == cpu.heldout[label]["tokens"]
        assert gpu.heldout[label]["loss"] == pytest.approx(cpu.heldout[label]["loss"], rel=1e-3, abs=1e-4)
        agree = sum(a == b for a, b in zip(gpu.outcomes[label]["boolq"], cpu.outcomes[label]["boolq"]))
        assert agree >= len(cpu.outcomes[label]["boolq"]) - 1, label  # a near-tie may flip, no more


def test_pipeline_at_its_default_precision_on_the_gpu_stays_near_float32(world):
    fast, exact = _run(world, GPU, "auto-gpu", precision="auto"), _run(world, "cpu", "fp32-cpu")
    assert next(fast.model.parameters()).dtype == torch.float32  # autocast: the weights stay fp32
    for label in ("base", "pruned", "reconstructed", "recovered"):
        assert fast.heldout[label]["loss"] == pytest.approx(exact.heldout[label]["loss"], rel=0.05), label
    assert fast.heldout["recovered"]["kl"] == pytest.approx(exact.heldout["recovered"]["kl"], rel=0.2, abs=0.02)


def test_commands_put_their_models_on_the_gpu_by_themselves(world, monkeypatch):
    import rora.models

    placed = []
    real = rora.models.load_model

    def spy(*args, **kwargs):
        model, tok = real(*args, **kwargs)
        placed.append(next(model.parameters()).device.type)
        return model, tok

    monkeypatch.setattr(rora.models, "load_model", spy)
    runner = CliRunner()
    done = runner.invoke(main, ["eval", str(world / "base"), "--tasks", "boolq", "--data-dir", str(world / "data"),
                                "--no-generation", "--prose", "none", "--out", str(world / "e.json")])
    assert done.exit_code == 0, done.output
    done = runner.invoke(main, ["prune", str(world / "base"), "--ratio", "0.5", "--num-samples", "2", "--prose",
                                "none", "--out", str(world / "p")])
    assert done.exit_code == 0, done.output
    assert placed == [GPU, GPU]
