"""`rora prune`: the happy path, and every bad input as one line, exit code 2, nothing written."""
import json

import pytest
import torch
from click.testing import CliRunner
from conftest import make_model

from rora.artifacts import save_model_dir
from rora.cli import main
from rora.models import load_model
from rora.architecture import LayerShape, layer_shapes


@pytest.fixture
def model_dir(tmp_path, tokenizer):
    save_model_dir(make_model("llama", heads=4, kv_heads=2), tokenizer, tmp_path / "model")
    return tmp_path / "model"


def run(*args):
    return CliRunner().invoke(main, ["prune", *map(str, args)])


def test_prune_cli_writes_a_loadable_model(model_dir, tmp_path):
    out = tmp_path / "pruned"
    result = run(model_dir, "--ratio", 0.5, "--out", out, "--importance", "taylor", "--num-samples", 3, "--seed", 7)
    assert result.exit_code == 0, result.output
    assert "parameters" in result.stdout and "held-out loss" in result.stdout and "50.0% query heads" in result.stdout
    model, _ = load_model(out)
    assert layer_shapes(model) == [LayerShape(2, 2, 48)] * 2
    manifest = json.loads((out / "rora.json").read_text())
    assert manifest["stage"] == "prune"
    assert manifest["report"]["seed"] == 7 and manifest["report"]["importance"] == "taylor/vectorwise"
    assert manifest["report"]["calibration"]["num_samples"] == 3 and manifest["source"]["model"] == str(model_dir)


def test_prune_cli_reads_yaml_and_flags_win(model_dir, tmp_path):
    (tmp_path / "p.yaml").write_text("ratio: 0.25\nimportance: l1\nlayers: '0:1'\nholdout_samples: 2\n")
    out = tmp_path / "pruned"
    result = run(model_dir, "--config", tmp_path / "p.yaml", "--importance", "l2", "--out", out)
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "rora.json").read_text())
    report = manifest["report"]
    assert report["importance"] == "l2" and report["pruned_layers"] == [0] and manifest["config"]["ratio"] == 0.25
    assert report["calibration"]["holdout_samples"] == 2


@pytest.mark.parametrize(
    "args,match",
    [
        (["--ratio", "1.0"], "prune.ratio must be in [0, 1)"),
        (["--ratio", "-0.1"], "prune.ratio must be in [0, 1)"),
        (["--ratio", "0.9"], "would remove all 2 query heads"),
        (["--ratio", "0.2", "--mlp-ratio", "1.2"], "prune.mlp_ratio must be in [0, 1)"),
        (["--ratio", "0.2", "--mlp-ratio", "0.999"], "would remove all"),
        (["--ratio", "0.5", "--layers", "1:9"], "outside the model's 2 layers"),
        (["--ratio", "0.5", "--layers", "2:1"], "START < END"),
        (["--ratio", "0.5", "--importance", "magnitude"], "prune.importance must be one of"),
        (["--ratio", "0.5", "--taylor", "hessian"], "prune.taylor must be one of"),
        (["--ratio", "0.5", "--calibration", "EMPTY"], "holds no text"),
        (["--ratio", "0.5", "--calibration", "MISSING"], "calibration data not found"),
    ],
)
def test_bad_input_is_one_line_exit_2_nothing_written(model_dir, tmp_path, args, match):
    (tmp_path / "empty.json").write_text("[]")
    args = [a.replace("EMPTY", str(tmp_path / "empty.json")).replace("MISSING", str(tmp_path / "no.json")) for a in args]
    before = sorted(p.name for p in tmp_path.iterdir())
    result = run(model_dir, "--out", tmp_path / "pruned", *args)
    assert result.exit_code == 2
    # One error line, last, no traceback (transformers' weight-loading progress bar may come before it).
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("rora: error: ") and match in lines[-1]
    assert sum("rora: error" in line for line in lines) == 1 and "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no output, no temporary directory left


def test_existing_out_needs_overwrite(model_dir, tmp_path):
    out = tmp_path / "pruned"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = run(model_dir, "--ratio", "0.5", "--out", out, "--importance", "l2")
    assert result.exit_code == 2 and "--overwrite" in result.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    result = run(model_dir, "--ratio", "0.5", "--out", out, "--importance", "l2", "--overwrite")
    assert result.exit_code == 0 and not (out / "keep.txt").exists() and (out / "rora.json").is_file()


def test_unsupported_architecture_exit_2(tmp_path, tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=384)).save_pretrained(tmp_path / "g")
    tokenizer.save_pretrained(tmp_path / "g")
    result = run(tmp_path / "g", "--ratio", "0.2", "--out", tmp_path / "pruned")
    assert result.exit_code == 2 and "supported: llama, mistral, qwen2" in result.stderr
    assert not (tmp_path / "pruned").exists()


def test_prune_cli_converts_llm_pruner_checkpoint(tmp_path, tokenizer):
    model = make_model("llama", heads=4, kv_heads=2)
    torch.save({"model": model, "tokenizer": tokenizer}, tmp_path / "ckpt.bin")
    result = run(tmp_path / "ckpt.bin", "--ratio", "0.5", "--out", tmp_path / "p", "--importance", "l2")
    assert result.exit_code == 2 and "--allow-pickle" in result.stderr and not (tmp_path / "p").exists()
    result = run(tmp_path / "ckpt.bin", "--ratio", "0.5", "--out", tmp_path / "p", "--importance", "l2", "--allow-pickle")
    assert result.exit_code == 0, result.output
    assert layer_shapes(load_model(tmp_path / "p")[0]) == [LayerShape(2, 2, 48)] * 2
