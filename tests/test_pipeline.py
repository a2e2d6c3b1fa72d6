import json

import pytest
import torch
from click.testing import CliRunner

from rora.artifacts import save_model_dir
from rora.cli import main
from rora.config import PipelineConfig, load_preset, preset_names
from rora.pipelines.summary import repetition_warning as result_warning

QUESTIONS = ["is the sky blue", "is fire cold", "do cats bark", "is water wet", "can fish swim", "is ice hot"]


def _records(n):
    out = []
    for i in range(n):
        answer = "true" if i % 2 == 0 else "false"
        out.append({
            "instruction": f"Please answer the following question with true or false, question: {QUESTIONS[i % 6]}?"
                           "\n\nAnswer format: true/false",
            "input": "",
            "output": f"the correct answer is {answer}",
            "answer": answer,
        })
    return out


@pytest.fixture
def tiny_setup(tmp_path, tiny_gqa, tokenizer):
    save_model_dir(tiny_gqa, tokenizer, tmp_path / "base")
    data = tmp_path / "data" / "boolq"
    data.mkdir(parents=True)
    (data / "train.json").write_text(json.dumps(_records(24)))
    (data / "test.json").write_text(json.dumps(_records(6)))
    return tmp_path


def _config(root, **changes):
    return PipelineConfig.from_dict({
        "model": str(root / "base"),
        "out": str(root / "run"),
        "data": str(root / "data"),
        "data_dir": str(root / "data"),
        "prune": {"ratio": 0.5, "importance": "l2", "num_samples": 2, "seq_len": 16, "holdout_samples": 2},
        "reconstruct": {"num_samples": 8, "holdout_samples": 4, "seq_len": 32},
        "recover": {"rank": 4, "max_steps": 3, "batch_size": 4, "micro_batch_size": 2, "val_set_size": 4,
                    "cutoff_len": 256, "warmup_steps": 1, "eval_steps": 2, "save_steps": 2},
        "eval": {"tasks": ["boolq"], "limit": 6, "batch_size": 3},
        **changes,
    })


def test_pipeline_end_to_end_and_skip_after_crash(tiny_setup, monkeypatch):
    import rora.pipelines.run as run_mod

    cfg = _config(tiny_setup)
    import rora.deployment as export_mod

    calls = []
    real_export = export_mod.export

    def crash(*args, **kwargs):
        calls.append("export")
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(export_mod, "export", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_mod.run_pipeline(cfg, progress=False)
    assert calls == ["export"]
    assert not (tiny_setup / "run" / "export").exists()
    monkeypatch.setattr(export_mod, "export", real_export)

    result = run_mod.run_pipeline(cfg, progress=False)
    skipped = {s for s, t in result.stages.items() if t["skipped"]}
    assert skipped == {"eval_base", "prune", "eval_pruned", "reconstruct", "eval_reconstructed", "recover", "merge",
                       "eval_recovered"}
    assert result.stages["export"]["skipped"] is False
    assert set(result.evals) == {"base", "pruned", "reconstructed", "recovered"}
    assert 0.0 <= result.evals["recovered"]["average"] <= 1.0
    assert result.parameters["pruned"] < result.parameters["base"]
    summary = json.loads((tiny_setup / "run" / "summary.json").read_text())
    assert summary["evals"] == result.evals
    # Per-example outcomes are kept, and every figure of the summary is recomputable from them.
    from rora.evaluation.stats import mean_se

    for label, per_task in summary["outcomes"].items():
        for task, outcomes in per_task.items():
            assert summary["evals"][label][task] == pytest.approx(sum(outcomes) / len(outcomes))
            assert summary["accuracy"][label][task]["se"] == pytest.approx(mean_se(outcomes)[1], nan_ok=True)
    paired = summary["comparisons"]["recovered - pruned"]["average"]
    assert paired["difference"] == pytest.approx(result.evals["recovered"]["average"] - result.evals["pruned"]["average"])
    assert "±" in (tiny_setup / "run" / "summary.md").read_text()
    # Held-out whole-text loss and KL to the base model, on the recovery's validation records.
    held = summary["heldout"]
    assert held["base"]["kl"] == 0.0 and held["pruned"]["kl"] > 0 and held["recovered"]["tokens"] > 0
    assert set(held) == {"base", "pruned", "reconstructed", "recovered"}
    from rora.evaluation.stats import gap_closed

    for label in ("reconstructed", "recovered"):
        assert summary["heldout_gap_closed"][label] == pytest.approx(
            gap_closed(*(held[k]["loss"] for k in ("base", "pruned", label))))
    # Reconstruction refits the pruned model against the base model, and the adapter trains on its output.
    reconstructed = json.loads((tiny_setup / "run" / "reconstructed" / "rora.json").read_text())
    assert reconstructed["stage"] == "reconstruct" and reconstructed["source"]["model"].endswith("pruned")
    assert reconstructed["report"]["heldout_after"]["kl"] < reconstructed["report"]["heldout_before"]["kl"]
    assert held["reconstructed"]["kl"] < held["pruned"]["kl"]
    recovery = json.loads((tiny_setup / "run" / "recovery" / "rora.json").read_text())
    assert recovery["source"]["model"].endswith("reconstructed")
    assert (tiny_setup / "run" / "summary.png").stat().st_size > 1000
    # The models' own writing, on the same held-out prompts (text openings and the validation records' prompts),
    # scored by the base model.
    gen = summary["generation"]
    assert set(gen) == {"base", "pruned", "reconstructed", "recovered"}
    assert summary["generation_warning"] == result_warning(gen)
    assert {g["by_set"]["task"]["prompts"] for g in gen.values()} == {4}  # val_set_size records
    assert len({tuple(e["prompt"] for e in g["examples"]) for g in gen.values()}) == 1
    recorded = json.loads((tiny_setup / "run" / "eval_pruned" / "results.json").read_text())
    assert recorded["generation"] == gen["pruned"] and recorded["reference"] == str(tiny_setup / "base")
    md = (tiny_setup / "run" / "summary.md").read_text()
    assert "| model | repetition (% of 4-grams) | text openings / task prompts | distinct-2 | reference perplexity | " \
           "tokens written |" in md
    assert "Example continuations:" in md and "| prompt | base | pruned | reconstructed | recovered |" in md

    # rora run has the unpruned model, so the default objective (auto) distils it; and it chooses the learning rate
    # (--lr auto): the probe's grid, figures and choice are in the summary (read back from the finished stage).
    recovery = json.loads((tiny_setup / "run" / "recovery" / "rora.json").read_text())
    assert recovery["config"]["objective"] == "kd" and recovery["config"]["lr"] == "auto"
    auto = summary["recovery"]["lr_auto"]
    assert auto == recovery["report"]["lr_auto"] and len(auto["probes"]) >= 3
    assert auto["lr"] == min((p for p in auto["probes"] if p["val_loss"] is not None), key=lambda p: p["val_loss"])["lr"]
    assert summary["recovery"]["lr"] == auto["lr"] == recovery["report"]["lr"]
    assert f"- learning rate: lr auto chose {auto['lr']:g}" in md
    assert summary["recovery"]["objective"] == "kd (T=1)" and "- recovery objective: kd (T=1)" in md
    card = (tiny_setup / "run" / "export" / "README.md").read_text()
    assert "effective_scale" in card and "recovered" in card and "Pruning" in card

    # The exported model computes what the in-memory final model computes.
    from rora.models import load_model

    exported, _ = load_model(tiny_setup / "run" / "export")
    ids = torch.randint(3, 384, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, result.model(ids).logits, rtol=0, atol=1e-5)


def test_changed_rank_reruns_recovery_but_keeps_pruning(tiny_setup):
    from rora.pipelines.run import run_pipeline

    run_pipeline(_config(tiny_setup, skip=["eval_base", "eval_pruned", "eval_reconstructed", "eval_recovered", "export"]), progress=False)
    cfg = _config(tiny_setup, skip=["eval_base", "eval_pruned", "eval_reconstructed", "eval_recovered", "export"])
    cfg.recover.rank = 2
    result = run_pipeline(cfg, progress=False)
    assert result.stages["prune"]["skipped"] is True
    assert result.stages["recover"]["skipped"] is False


def test_reconstruction_shows_its_share_when_its_evaluation_is_skipped(tiny_setup):
    """With eval_reconstructed skipped (the demo), the reconstruct stage measures the held-out prose and records
    itself, so the summary still shows what reconstruction alone bought; read back on a rerun, the same figures."""
    from rora.pipelines.run import run_pipeline

    prose = tiny_setup / "prose.txt"
    prose.write_text("\n\n".join(f"The river {w} past the mill, and the town grew along its banks for years."
                                   for w in ("ran", "flowed", "bent", "rose", "fell", "wound")))
    cfg = _config(tiny_setup, skip=["eval_reconstructed", "export"])
    cfg.eval.prose, cfg.eval.generation = str(prose), False
    first = run_pipeline(cfg, progress=False)
    assert set(first.evals) == {"base", "pruned", "recovered"}
    assert list(first.prose) == list(first.heldout) == ["base", "pruned", "reconstructed", "recovered"]
    for figures in (first.prose, first.heldout):
        assert 0 < figures["reconstructed"]["kl"] < figures["pruned"]["kl"]
    assert first.prose["reconstructed"]["tokens"] == first.prose["pruned"]["tokens"]
    md = (tiny_setup / "run" / "summary.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| reconstructed | - | - | "))
    assert row.count("%") == 2  # prose and records shares, no accuracy
    again = run_pipeline(cfg, progress=False)
    assert again.stages["reconstruct"]["skipped"] and again.prose == first.prose and again.heldout == first.heldout


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_loads(name):
    cfg = load_preset(name)
    assert cfg.recover.method == "rora"
    assert cfg.out.startswith("runs/")


def test_quickstart_preset_is_the_documented_demo():
    cfg = load_preset("quickstart")
    assert cfg.model == "smollm2-135m" and cfg.eval.protocol == "lm-eval" and cfg.eval.sample >= 100
    # 100 per task in the time of 50: bfloat16 scoring (the preset says what it changed)
    assert cfg.eval.precision == "bfloat16" and cfg.eval.engine == "rora"
    # and trains in bfloat16: 1.5x faster on this CPU, the same validation figures (the preset says so)
    assert cfg.recover.precision == "bfloat16"
    # general text for the prune's scores, the closed-form refit and half the distillation: the Wikipedia corpus
    # `make prose` writes (three shards of it: no stage fits on paragraphs another stage already read)
    shards = (cfg.prune.calibration, cfg.reconstruct.calibration, cfg.recover.text)
    assert cfg.runs("reconstruct") and all(s.startswith("runs/prose/train-") for s in shards) and len(set(shards)) == 3
    assert 0 < cfg.recover.text_ratio < 1 and cfg.recover.max_train_examples  # the task records are the other part
    # the unpruned model is the teacher, and the answers' cross-entropy teaches the model to end them (the preset
    # says why)
    assert cfg.recover.objective == "kd+sft" and 0 < cfg.recover.kd_weight < 1
    # the first and last three layers kept whole, the rest pruned harder: ~29% of the decoder either way (the preset
    # says why)
    assert cfg.prune.layers == "3:27" and 0 < cfg.prune.ratio < 0.5
    # MLP channels only, by what the reconstruction can make up for; SmolLM2's heads all kept (the preset says why)
    assert cfg.prune.importance == "obs" and not cfg.prune.attention and cfg.prune.mlp and cfg.prune.num_samples == 64


def test_run_cli_rejects_unknown_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("recover:\n  rnak: 8\n")
    result = CliRunner().invoke(main, ["run", str(bad)])
    assert result.exit_code == 2
    assert "unknown key recover.rnak (did you mean 'rank'?)" in result.output
    assert not (tmp_path / "runs").exists()


def test_run_cli_flags_override_preset():
    result = CliRunner().invoke(main, ["run", "--preset", "quickstart", "--rank", "8", "--tasks", "boolq,piqa", "--print-config"])
    assert result.exit_code == 0, result.output
    import yaml

    cfg = PipelineConfig.from_dict(yaml.safe_load(result.output))
    assert cfg.recover.rank == 8 and cfg.recover.resolved_alpha == 16 and cfg.eval.tasks == ["boolq", "piqa"]


def test_the_summary_headline_names_the_examples_and_a_non_default_precision():
    from rora.config import EvalConfig
    from rora.pipelines.run import describe_evaluation

    assert describe_evaluation(EvalConfig(protocol="lm-eval", sample=100)) == \
        "lm-eval, a random 100 examples per task (seed 0)"
    assert describe_evaluation(EvalConfig(protocol="lm-eval", limit=5, precision="bfloat16")) == \
        "lm-eval, first 5 examples per task, bfloat16 scoring"
