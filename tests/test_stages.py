"""One manifest for every stage output, and every command taking the previous stage's directory:
prune -> recover -> merge RUN/recovery -> export RUN/merged (whose card carries the pruning and recovery records)."""
import json

import pytest
from click.testing import CliRunner

from conftest import make_model, make_tokenizer
from rora.artifacts import (MANIFEST, lineage, read_manifest, resolve_input, save_model_dir, write_json,
                            write_stage_manifest)
from rora.cli import main
from rora.errors import ConfigError, ManifestError
from rora.deployment.card import render_card

QUESTION = "Please answer the following question with true or false, question: is {} even?\n\nAnswer format: true/false"


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def ok(*args):
    result = run(*args)
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    """base -> pruned -> recovery, made with the CLI once for the module; and a one-task evaluation set."""
    root = tmp_path_factory.mktemp("stages")
    save_model_dir(make_model("llama", heads=4, kv_heads=2), make_tokenizer(), root / "base")
    records = [{"instruction": QUESTION.format(i), "input": "", "output": f"the correct answer is {'true' if i % 2 == 0 else 'false'}",
                "answer": "true" if i % 2 == 0 else "false"} for i in range(16)]
    (root / "train.json").write_text(json.dumps(records))
    (root / "data" / "boolq").mkdir(parents=True)
    (root / "data" / "boolq" / "test.json").write_text(json.dumps(records[:4]))
    ok("prune", root / "base", "--ratio", 0.5, "--importance", "l2", "--num-samples", 2, "--out", root / "pruned")
    ok("recover", root / "pruned", "--data", root / "train.json", "--out", root / "recovery", "--rank", 4,
       "--max-steps", 2, "--batch-size", 4, "--micro-batch-size", 2, "--val-set-size", 4, "--eval-steps", 2,
       "--save-steps", 2, "--warmup-steps", 0)
    return root


def test_every_stage_writes_one_manifest_shape(stages):
    prune, recover = read_manifest(stages / "pruned"), read_manifest(stages / "recovery")
    assert (prune.stage, recover.stage) == ("prune", "recover") and prune.schema == recover.schema == 1
    assert prune.source == {"model": str(stages / "base")} and prune.config["ratio"] == 0.5
    assert prune.report["params_after"] < prune.report["params_before"]
    assert recover.source == {"model": str(stages / "pruned"), "data": str(stages / "train.json")}
    assert recover.config["rank"] == 4 and recover.config["objective"] == "sft" and recover.report["steps"] == 2
    assert "provenance" in json.loads((stages / "recovery" / MANIFEST).read_text())


def test_merge_a_recovery_dir_and_export_carries_the_records(stages, tmp_path):
    ok("merge", stages / "recovery", "--out", tmp_path / "merged")  # base and adapter from the recovery's manifest
    merged = read_manifest(tmp_path / "merged")
    assert merged.source == {"model": str(stages / "pruned"), "adapter": str(stages / "recovery" / "adapter")}
    assert merged.config["tolerance"] == 1e-4 and merged.report["rank"] == 4
    assert [m.stage for m in lineage(tmp_path / "merged")] == ["merge", "prune", "recover"]

    ok("merge", stages / "pruned", "--adapter", stages / "recovery", "--out", tmp_path / "merged2")  # adapter dir inside
    assert read_manifest(tmp_path / "merged2").source == merged.source

    ok("export", tmp_path / "merged", "--format", "hf", "--out", tmp_path / "export")
    exported = read_manifest(tmp_path / "export")
    assert exported.stage == "export" and exported.source == {"model": str(tmp_path / "merged")}
    assert exported.config["format"] == "hf" and exported.report["size_bytes"] > 0
    card = (tmp_path / "export" / "README.md").read_text()
    pruning, recovery = card.split("## Pruning")[1], card.split("## Recovery")[1]
    assert f"base_model: {stages / 'base'}" in card
    for key in ("requested_ratio | 0.5", "importance | l2", "params_before", "params_after", "loss_before", "loss_after"):
        assert key in pruning, key
    for key in ("method | rora", "rank | 4", "alpha | 8", "effective_scale | 4", "objective | sft"):
        assert key in recovery, key


def test_gguf_export_has_its_manifest_beside_it(stages, tmp_path):
    ok("export", stages / "pruned", "--format", "gguf", "--dtype", "f32", "--out", tmp_path / "m.gguf")
    assert read_manifest(tmp_path / "m.gguf").report["format"] == "gguf" and (tmp_path / "m.rora.json").is_file()
    assert "## Pruning" in (tmp_path / "m.md").read_text()


def test_eval_a_recovery_dir_loads_base_plus_adapter(stages, tmp_path):
    ok("eval", stages / "recovery", "--tasks", "boolq", "--data-dir", stages / "data", "--out", tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text())["adapter"] == str(stages / "recovery" / "adapter")
    ok("eval", stages / "pruned", "--tasks", "boolq", "--data-dir", stages / "data", "--out", tmp_path / "p.json")
    assert json.loads((tmp_path / "p.json").read_text())["adapter"] is None


def test_recovery_dir_inputs_that_cannot_work_exit_2(stages, tmp_path):
    cases = [
        (["merge", stages / "recovery", "--adapter", stages / "recovery"], "brings its own adapter"),
        (["merge", stages / "pruned"], "no adapter"),
        (["export", stages / "recovery", "--format", "hf"], "is a recovery run (an adapter, not a model)"),
    ]
    for args, message in cases:
        result = run(*args, "--out", tmp_path / "out")
        assert result.exit_code == 2 and message in result.output, result.output
        assert not (tmp_path / "out").exists()


def test_resolve_input(stages):
    assert resolve_input(stages / "recovery").model == str(stages / "pruned")
    assert resolve_input(stages / "recovery").adapter == stages / "recovery" / "adapter"
    assert resolve_input("org/name", stages / "recovery").adapter == stages / "recovery" / "adapter"
    assert resolve_input(stages / "pruned").adapter is None
    with pytest.raises(ConfigError, match="no adapter"):
        resolve_input(stages / "pruned", need_adapter=True)


def test_read_manifest_refuses_what_is_not_a_stage_output(tmp_path):
    with pytest.raises(ManifestError, match="not a rora stage output: it has no rora.json"):
        read_manifest(tmp_path)
    (tmp_path / MANIFEST).write_text("{not json")
    with pytest.raises(ManifestError, match="is corrupt"):
        read_manifest(tmp_path)
    write_json(tmp_path / MANIFEST, {"stage": "prune"})
    with pytest.raises(ManifestError, match="not a rora manifest: no source, config, report, provenance"):
        read_manifest(tmp_path)
    write_stage_manifest(tmp_path, "prune", {"model": "x"}, {}, {})
    data = json.loads((tmp_path / MANIFEST).read_text())
    write_json(tmp_path / MANIFEST, {**data, "schema": 99})
    with pytest.raises(ManifestError, match="schema 99"):
        read_manifest(tmp_path)
    write_json(tmp_path / MANIFEST, {**data, "stage": "bake"})
    with pytest.raises(ManifestError, match="stage 'bake'"):
        read_manifest(tmp_path)
    assert lineage(tmp_path / "elsewhere") == []  # a model that is no stage output has no records


def test_card_evaluation_shows_standard_errors():
    card = render_card({"evaluation": {"base": {"boolq": {"accuracy": 0.61, "se": 0.02}, "piqa": 0.5},
                                       "pruned": {"boolq": {"accuracy": 0.5, "se": float("nan")}}}})
    assert "| boolq | 61.0 ± 2.0 | 50.0 |" in card and "| piqa | 50.0 |  |" in card
