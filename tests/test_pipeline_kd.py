"""`rora run` with a distillation objective: the teacher is the unpruned base model, kept untouched through pruning."""
import json

import pytest

from rora.artifacts import save_model_dir
from rora.config import PipelineConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def _records(n):
    return [{"instruction": f"Is {i} even? Answer true or false.", "input": "",
             "output": f"the correct answer is {'true' if i % 2 == 0 else 'false'}", "answer": "true"} for i in range(n)]


def test_kd_recovery_distils_the_unpruned_base(tmp_path, tiny_gqa, tokenizer):
    from rora.models import load_model
    from rora.pipelines.run import run_pipeline
    from rora.numerics import model_signature

    save_model_dir(tiny_gqa, tokenizer, tmp_path / "base")
    (tmp_path / "data" / "boolq").mkdir(parents=True)
    (tmp_path / "data" / "boolq" / "train.json").write_text(json.dumps(_records(24)))
    cfg = PipelineConfig.from_dict({
        "model": str(tmp_path / "base"), "out": str(tmp_path / "run"), "data": str(tmp_path / "data"),
        "skip": ["eval_base", "eval_pruned", "eval_reconstructed", "eval_recovered", "export"],
        "prune": {"ratio": 0.5, "importance": "l2", "num_samples": 2, "seq_len": 16, "holdout_samples": 2},
        "reconstruct": {"num_samples": 8, "holdout_samples": 4, "seq_len": 32},
        "recover": {"objective": "kd", "rank": 4, "max_steps": 3, "batch_size": 4, "micro_batch_size": 2,
                    "val_set_size": 4, "warmup_steps": 1, "eval_steps": 3, "save_steps": 2},
    })
    base = model_signature(load_model(tmp_path / "base")[0])
    manifest = tmp_path / "run" / "recovery" / "rora.json"

    run_pipeline(cfg, progress=False)  # prunes (a copy of the base is kept first), then distils
    first = json.loads(manifest.read_text())
    assert first["config"]["objective"] == "kd" and first["report"]["teacher"] == base
    assert first["report"]["val_metrics"]["val_kl"] > 0

    cfg.recover.rank = 2  # the pruned model now comes from disk; the base as loaded is the teacher
    result = run_pipeline(cfg, progress=False)
    assert result.stages["prune"]["skipped"] is True and result.stages["recover"]["skipped"] is False
    assert json.loads(manifest.read_text())["report"]["teacher"] == base


def test_run_objective_flag_reaches_the_recover_config():
    import yaml
    from click.testing import CliRunner

    from rora.cli import main

    done = CliRunner().invoke(main, ["run", "--preset", "quickstart", "--objective", "kd", "--print-config"])
    assert done.exit_code == 0, done.output
    assert yaml.safe_load(done.output)["recover"]["objective"] == "kd"
    bad = CliRunner().invoke(main, ["run", "--preset", "quickstart", "--objective", "kl", "--print-config"])
    assert bad.exit_code == 2 and "recover.objective must be one of auto, sft, kd, kd+sft" in bad.output


def test_figures_after_a_bf16_teacher_recovery_measure_against_the_full_precision_base(tmp_path, tiny_gqa, tokenizer,
                                                                                      monkeypatch):
    """The trainer casts the teacher in place to teacher_dtype (bf16 on a GPU): the recovered model's KL figures
    must still be against the unpruned model as loaded, like the pruned model's were."""
    import torch

    import rora.evaluation.evaluate as evaluate_mod
    from rora.pipelines.run import run_pipeline

    save_model_dir(tiny_gqa, tokenizer, tmp_path / "base")
    (tmp_path / "data" / "boolq").mkdir(parents=True)
    (tmp_path / "data" / "boolq" / "train.json").write_text(json.dumps(_records(24)))
    (tmp_path / "data" / "boolq" / "test.json").write_text(json.dumps(_records(4)))
    references = []  # the reference model's dtypes at each evaluation: the pruned model's, then the recovered's
    evaluate = evaluate_mod.evaluate

    def spy(*args, reference=None, **kwargs):
        references.append({p.dtype for p in reference.parameters()})
        return evaluate(*args, reference=reference, **kwargs)

    monkeypatch.setattr(evaluate_mod, "evaluate", spy)
    cfg = PipelineConfig.from_dict({
        "model": str(tmp_path / "base"), "out": str(tmp_path / "run"), "data": str(tmp_path / "data"),
        "data_dir": str(tmp_path / "data"), "skip": ["eval_base", "eval_reconstructed", "reconstruct", "export"],
        "prune": {"ratio": 0.5, "importance": "l2", "num_samples": 2, "seq_len": 16, "holdout_samples": 2},
        "recover": {"objective": "kd", "rank": 4, "max_steps": 2, "batch_size": 4, "micro_batch_size": 2,
                    "val_set_size": 4, "warmup_steps": 1, "eval_steps": 2, "save_steps": 2, "lr": 2e-4,
                    "teacher_dtype": "bfloat16"},
        "eval": {"tasks": ["boolq"], "generation": False},
    })
    result = run_pipeline(cfg, progress=False)
    assert references == [{torch.float32}, {torch.float32}]
    assert result.heldout["recovered"]["kl"] > 0
