"""Bad input across the commands and the Python API: exit code 2, exactly one line on stderr (no traceback, no
library report or progress bar before it), and nothing written, overwritten or deleted (the file tree under the
test's root, with sizes, modes and modification times, is the same before and after)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from conftest import REPO, make_model

from rora.artifacts import save_model_dir
from rora.cli import main
from rora.config import EvalConfig, MergeConfig, PipelineConfig, PruneConfig, RecoverConfig
from rora.errors import ConfigError, ModelLoadError, TrainingError

pytestmark = pytest.mark.usefixtures("one_thread")

RECOVER = ["--rank", "4", "--max-steps", "4", "--batch-size", "4", "--micro-batch-size", "2", "--val-set-size", "4",
           "--eval-steps", "2", "--save-steps", "2", "--warmup-steps", "0", "--seed", "7"]
RECOVER_CFG = dict(rank=4, max_steps=4, batch_size=4, micro_batch_size=2, val_set_size=4, eval_steps=2, save_steps=2,
                   warmup_steps=0, seed=7)


def _records(n):
    return [{"instruction": f"Is {i} even? Answer true or false.", "input": "",
             "output": f"the correct answer is {'true' if i % 2 == 0 else 'false'}", "answer": "true" if i % 2 == 0 else "false"}
            for i in range(n)]


def _copy_model(world, name, mutate):
    d = world / name
    shutil.copytree(world / "model", d)
    mutate(d)
    return d


@pytest.fixture(scope="module")
def world(tmp_path_factory, tokenizer):
    """A tiny saved model, data, an adapter, corrupt variants of each, and an interrupted recovery run."""
    from peft import get_peft_model
    from safetensors.torch import load_file, save_file

    from rora.recovery import trainer as trainer_mod
    from rora.recovery.methods import peft_config

    root = tmp_path_factory.mktemp("bad")
    save_model_dir(make_model(heads=4, kv_heads=2), tokenizer, root / "model")
    save_model_dir(make_model(heads=4, kv_heads=2, seed=1), tokenizer, root / "other_model")
    (root / "data.json").write_text(json.dumps(_records(24)))
    (root / "evaldata" / "boolq").mkdir(parents=True)
    (root / "evaldata" / "boolq" / "test.json").write_text(json.dumps(_records(4)))
    (root / "a_file").write_text("not a directory")
    (root / "blank.txt").write_text("\n  \n")
    (root / "existing").mkdir()
    (root / "existing" / "precious.txt").write_text("keep me")

    _copy_model(root, "cfg_not_json", lambda d: (d / "config.json").write_text("{not json"))
    _copy_model(root, "cfg_empty", lambda d: (d / "config.json").write_text("{}"))
    _copy_model(root, "st_empty", lambda d: (d / "model.safetensors").write_bytes(b""))
    _copy_model(root, "st_truncated", lambda d: (d / "model.safetensors").write_bytes(
        (d / "model.safetensors").read_bytes()[:4000]))

    def wrong_shape(d):
        weights = load_file(d / "model.safetensors")
        weights["model.layers.0.mlp.up_proj.weight"] = torch.zeros(50, 64)
        save_file(weights, d / "model.safetensors", metadata={"format": "pt"})

    _copy_model(root, "st_wrong_shape", wrong_shape)

    def pickled(d):
        torch.save(load_file(d / "model.safetensors"), d / "pytorch_model.bin")
        (d / "model.safetensors").unlink()

    _copy_model(root, "pickle_only", pickled)

    model = make_model(heads=4, kv_heads=2)
    get_peft_model(model, peft_config(RecoverConfig(rank=4), model)).save_pretrained(root / "adapter")
    shutil.copytree(root / "adapter", root / "adapter_bin")
    torch.save(load_file(root / "adapter_bin" / "adapter_model.safetensors"), root / "adapter_bin" / "adapter_model.bin")
    (root / "adapter_bin" / "adapter_model.safetensors").unlink()
    shutil.copytree(root / "adapter", root / "adapter_bad_cfg")
    (root / "adapter_bad_cfg" / "adapter_config.json").write_text("{oops")
    wide = make_model(heads=4, kv_heads=2, intermediate=128)
    get_peft_model(wide, peft_config(RecoverConfig(rank=4), wide)).save_pretrained(root / "adapter_other_shape")

    (root / "bad.jsonl").write_text(json.dumps(_records(1)[0]) + "\n{broken\n")
    (root / "latin1.yaml").write_bytes("ratio: 0.5 # caf\xe9\n".encode("latin-1"))
    for name, text in {"dropout.yaml": "dropout: 1.5\n", "decay.yaml": "weight_decay: -1\n",
                       "beams.yaml": "num_beams: 0\n", "tokens.yaml": "max_new_tokens: 0\n",
                       "mtol.yaml": "tolerance: -1\n", "mtol_nan.yaml": "tolerance: .nan\n",
                       "etol.yaml": "tolerance: .inf\n", "unknown.yaml": "rnak: 4\n"}.items():
        (root / name).write_text(text)

    # An interrupted recovery (a checkpoint at step 2, then a crash), and a copy with a corrupt trainer state.
    def crash(self, source):
        raise RuntimeError("simulated crash")

    real_finish = trainer_mod._Run.finish
    trainer_mod._Run.finish = crash
    try:
        from rora.models import load_model

        m, tok = load_model(root / "model")
        with pytest.raises(RuntimeError):
            trainer_mod.recover(m, tok, str(root / "data.json"), RecoverConfig(**RECOVER_CFG), root / "rec", progress=False)
    finally:
        trainer_mod._Run.finish = real_finish
    shutil.copytree(root / ".rec.partial", root / ".rec_corrupt.partial")
    state = root / ".rec_corrupt.partial" / "checkpoints" / "step-2" / "trainer_state.json"
    state.write_text(state.read_text()[:40])
    return root


def snapshot(root):
    return {str(p.relative_to(root)): (p.is_dir(), p.stat().st_mode, None if p.is_dir() else p.stat().st_size,
                                       p.stat().st_mtime_ns) for p in root.rglob("*")}


def fails_cleanly(root, *args):
    """Run the CLI in-process; assert exit 2, one stderr line, no traceback, nothing changed; return the line."""
    before = snapshot(root)
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("rora: error: "), result.stderr
    assert "Traceback" not in result.output
    assert snapshot(root) == before
    return lines[0]


# (case id, argv with {w} for the world root, a fragment the error line must contain)
CLI_CASES = [
    ("info-missing", "info {w}/nope", "unknown model"),
    ("info-no-config", "info {w}/evaldata", "no config.json"),
    ("info-config-not-json", "info {w}/cfg_not_json", "not a valid JSON"),
    ("info-config-empty", "info {w}/cfg_empty", "model_type"),
    ("info-safetensors-0-bytes", "info {w}/st_empty", "header too small"),
    ("info-safetensors-truncated", "info {w}/st_truncated", "cannot load"),
    ("info-wrong-shape", "info {w}/st_wrong_shape", "does not match config.json"),
    ("info-pickle-only-dir", "info {w}/pickle_only", "--allow-pickle"),
    ("prune-ratio-range", "prune {w}/model --ratio 1.5 --out {w}/p", "prune.ratio must be in [0, 1)"),
    ("prune-ratio-nan", "prune {w}/model --ratio nan --out {w}/p", "finite"),
    ("prune-num-samples", "prune {w}/model --num-samples -1 --out {w}/p", "num_samples must be > 0"),
    ("prune-out-exists", "prune {w}/model --out {w}/existing", "already exists"),
    ("prune-out-parent-is-file", "prune {w}/model --out {w}/a_file/p", "is not a directory"),
    ("prune-out-is-input", "prune {w}/model --out {w}/model --overwrite", "would replace the input"),
    ("prune-yaml-not-utf8", "prune {w}/model --out {w}/p --config {w}/latin1.yaml", "not a UTF-8"),
    ("prune-yaml-unknown-key", "prune {w}/model --out {w}/p --config {w}/unknown.yaml", "unknown key"),
    ("prune-pickle-dir", "prune {w}/pickle_only --out {w}/p", "--allow-pickle"),
    ("recover-resume-foreign-dir", "recover {w}/model --data {w}/data.json --out {w}/existing --resume",
     "nothing to resume"),
    ("recover-resume-into-model", "recover {w}/model --data {w}/data.json --out {w}/model --resume",
     "would replace the input"),
    ("recover-out-exists", "recover {w}/model --data {w}/data.json --out {w}/existing", "already exists"),
    ("recover-interrupted-needs-flag", "recover {w}/model --data {w}/data.json --out {w}/rec", "--resume"),
    ("recover-resume-other-model", "recover {w}/other_model --data {w}/data.json --out {w}/rec --resume " + " ".join(RECOVER),
     "the base model differs"),
    ("recover-corrupt-trainer-state", "recover {w}/model --data {w}/data.json --out {w}/rec_corrupt --resume " + " ".join(RECOVER),
     "corrupt"),
    ("recover-epochs-inf", "recover {w}/model --data {w}/data.json --out {w}/r --epochs inf", "finite"),
    ("recover-lr-nan", "recover {w}/model --data {w}/data.json --out {w}/r --lr nan", "recover.lr must be a finite"),
    ("recover-alpha-nan", "recover {w}/model --data {w}/data.json --out {w}/r --alpha nan", "recover.alpha"),
    ("recover-val-set-negative", "recover {w}/model --data {w}/data.json --out {w}/r --val-set-size -1", "val_set_size"),
    ("recover-max-train-zero", "recover {w}/model --data {w}/data.json --out {w}/r --max-train-examples 0",
     "max_train_examples"),
    ("recover-dropout-range", "recover {w}/model --data {w}/data.json --out {w}/r --config {w}/dropout.yaml", "dropout"),
    ("recover-weight-decay", "recover {w}/model --data {w}/data.json --out {w}/r --config {w}/decay.yaml",
     "weight_decay"),
    ("recover-data-missing", "recover {w}/model --data {w}/nope.json --out {w}/r", "not found"),
    ("recover-jsonl-line-2", "recover {w}/model --data {w}/bad.jsonl --out {w}/r", "line 2"),
    ("recover-out-parent-is-file", "recover {w}/model --data {w}/data.json --out {w}/a_file/r", "is not a directory"),
    ("eval-out-md", "eval {w}/model --tasks boolq --data-dir {w}/evaldata --out {w}/r.md", "Markdown"),
    ("eval-adapter-pickle", "eval {w}/model --adapter {w}/adapter_bin --tasks boolq --data-dir {w}/evaldata --out {w}/e.json",
     "--allow-pickle"),
    ("eval-adapter-corrupt-config", "eval {w}/model --adapter {w}/adapter_bad_cfg --tasks boolq --data-dir {w}/evaldata "
     "--out {w}/e.json", "adapter"),
    ("eval-limit-zero", "eval {w}/model --limit 0 --data-dir {w}/evaldata --out {w}/e.json", "limit"),
    ("eval-num-beams", "eval {w}/model --config {w}/beams.yaml --data-dir {w}/evaldata --out {w}/e.json", "num_beams"),
    ("eval-max-new-tokens", "eval {w}/model --config {w}/tokens.yaml --data-dir {w}/evaldata --out {w}/e.json",
     "max_new_tokens"),
    ("eval-unknown-task", "eval {w}/model --tasks boolk --data-dir {w}/evaldata --out {w}/e.json", "did you mean"),
    ("eval-data-dir-missing", "eval {w}/model --tasks boolq --data-dir {w}/nodata --out {w}/e.json", "does not exist"),
    ("merge-adapter-pickle", "merge {w}/model --adapter {w}/adapter_bin --out {w}/m", "--allow-pickle"),
    ("merge-adapter-corrupt-config", "merge {w}/model --adapter {w}/adapter_bad_cfg --out {w}/m", "corrupt"),
    ("merge-adapter-other-shape", "merge {w}/model --adapter {w}/adapter_other_shape --out {w}/m", "does not fit"),
    ("merge-out-is-adapter", "merge {w}/model --adapter {w}/adapter --out {w}/adapter --overwrite", "would replace the input"),
    ("export-pickle-dir", "export {w}/pickle_only --format hf --out {w}/x", "--allow-pickle"),
    ("merge-tolerance-negative", "merge {w}/model --adapter {w}/adapter --out {w}/m --config {w}/mtol.yaml", "tolerance"),
    ("merge-tolerance-nan", "merge {w}/model --adapter {w}/adapter --out {w}/m --config {w}/mtol_nan.yaml", "finite"),
    ("export-gguf-suffix", "export {w}/model --format gguf --out {w}/x.bin", ".gguf"),
    ("export-tolerance-inf", "export {w}/model --format hf --out {w}/x --config {w}/etol.yaml", "finite"),
    ("export-format", "export {w}/model --format onnx --out {w}/x", "export.format"),
    ("export-out-parent-is-file", "export {w}/model --format hf --out {w}/a_file/x", "is not a directory"),
    ("run-out-not-a-run", "run --model {w}/model --out {w}/existing --data {w}/data.json --data-dir {w}/evaldata "
     "--tasks boolq", "not a rora run"),
    ("run-out-is-file", "run --model {w}/model --out {w}/a_file --data {w}/data.json --data-dir {w}/evaldata", "is a file"),
    ("run-data-missing", "run --model {w}/model --out {w}/run --data {w}/nope.json --data-dir {w}/evaldata --tasks boolq",
     "not found"),
    ("run-eval-data-missing", "run --model {w}/model --out {w}/run --data {w}/data.json --data-dir {w}/nodata "
     "--tasks boolq", "does not exist"),
    ("run-eval-task-file-missing", "run --model {w}/model --out {w}/run --data {w}/data.json --data-dir {w}/evaldata "
     "--tasks piqa --protocol score", "piqa"),
    ("run-bad-model", "run --model {w}/cfg_empty --out {w}/run --data {w}/data.json --data-dir {w}/evaldata "
     "--tasks boolq", "cannot load"),
    ("run-ratio-nan", "run --model {w}/model --out {w}/run --ratio nan", "finite"),
    ("eval-generation-tokens", "eval {w}/model --generation-tokens 0 --data-dir {w}/evaldata --out {w}/e.json",
     "generation_tokens must be > 0"),
    ("eval-reference-missing", "eval {w}/model --reference {w}/nope --tasks boolq --data-dir {w}/evaldata "
     "--out {w}/e.json", "unknown model"),
    ("generate-no-prompt", "generate {w}/model", "no prompt"),
    ("generate-prompts-file-missing", "generate {w}/model --prompts-file {w}/nope.txt", "prompts file not found"),
    ("generate-prompts-file-blank", "generate {w}/model --prompts-file {w}/blank.txt", "holds no prompts"),
    ("generate-prompts-jsonl-field", "generate {w}/model --prompts-file {w}/bad.jsonl", "line 1 has no string"),
    ("generate-temperature-negative", "generate {w}/model --prompt hi --temperature -1", "temperature must be >= 0"),
    ("generate-temperature-nan", "generate {w}/model --prompt hi --temperature nan", "finite"),
    ("generate-top-p", "generate {w}/model --prompt hi --top-p 1.5", "top_p must be in (0, 1]"),
    ("generate-max-new-tokens", "generate {w}/model --prompt hi --max-new-tokens 0", "max_new_tokens must be > 0"),
    ("generate-not-a-model", "generate {w}/a_file --prompt hi", "is not a model"),
    ("generate-unknown-model", "generate {w}/nope --prompt hi", "unknown model"),
    ("generate-no-chat-template", "generate {w}/model --prompt hi --chat", "no chat template"),
    ("generate-adapter-pickle", "generate {w}/model --adapter {w}/adapter_bin --prompt hi", "--allow-pickle"),
    ("generate-adapter-other-shape", "generate {w}/model --adapter {w}/adapter_other_shape --prompt hi", "does not fit"),
]


@pytest.mark.parametrize("argv,fragment", [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_cli_bad_input_is_one_line_and_touches_nothing(world, argv, fragment):
    line = fails_cleanly(world, *argv.format(w=world).split())
    assert fragment in line, line


@pytest.mark.parametrize("prompts", [[""], ["a", "   "]])
def test_cli_generate_empty_prompt_is_one_line(world, prompts):
    argv = [x for p in prompts for x in ("--prompt", p)]
    line = fails_cleanly(world, "generate", world / "model", *argv)
    assert f"prompt {len(prompts)} is empty" in line, line


API_CASES = [
    ("prune-dict-config", lambda m, tok, w: __import__("rora").prune(m, tok, {"ratio": 2.0}), ConfigError, "ratio"),
    ("prune-wrong-config-type", lambda m, tok, w: __import__("rora").prune(m, tok, "0.3"), ConfigError, "PruneConfig"),
    ("recover-dict-config", lambda m, tok, w: __import__("rora").recover(m, tok, _records(24), {"rank": -1}, w / "r"),
     ConfigError, "rank"),
    ("evaluate-dict-config", lambda m, tok, w: __import__("rora").evaluate(m, tok, {"num_beams": 0}), ConfigError,
     "num_beams"),
    ("merge-dict-config", lambda m, tok, w: __import__("rora").merge(m, w / "adapter", {"tolerance": -1.0}), ConfigError,
     "tolerance"),
    ("export-dict-config", lambda m, tok, w: __import__("rora").export(m, tok, {"format": "onnx"}, w / "x"), ConfigError,
     "export.format"),
    ("run-dict-config", lambda m, tok, w: __import__("rora").run_pipeline({"out": str(w / "existing"), "model": str(w / "model")}),
     ConfigError, "not a rora run"),
    ("load-pickle-dir", lambda m, tok, w: __import__("rora").load_model(w / "pickle_only"), ModelLoadError, "allow_pickle"),
    ("resume-other-model", lambda m, tok, w: __import__("rora").recover(
        make_model(heads=4, kv_heads=2, seed=3), tok, str(w / "data.json"), RecoverConfig(**RECOVER_CFG), w / "rec",
        resume=True), TrainingError, "base model differs"),
]


@pytest.mark.parametrize("call,error,fragment", [c[1:] for c in API_CASES], ids=[c[0] for c in API_CASES])
def test_api_bad_input_raises_typed_error_and_touches_nothing(world, tokenizer, call, error, fragment):
    from rora.errors import OutputExistsError

    model = make_model(heads=4, kv_heads=2)
    before = snapshot(world)
    expected = (error, OutputExistsError) if fragment == "not a rora run" else error
    with pytest.raises(expected, match=fragment.replace(".", r"\.")):
        call(model, tokenizer, world)
    assert snapshot(world) == before


def test_numeric_strings_are_numbers_in_yaml(tmp_path):
    """YAML 1.1 reads `lr: 2e-4` as a string; the README writes it that way."""
    (tmp_path / "c.yaml").write_text("lr: 2e-4\nalpha: 1e1\n")
    cfg = RecoverConfig.from_yaml(tmp_path / "c.yaml")
    assert cfg.lr == 2e-4 and cfg.alpha == 10.0
    with pytest.raises(ConfigError, match="recover.lr: expected float, got 'fast'"):
        RecoverConfig.from_dict({"lr": "fast"})
    assert PipelineConfig.from_dict({"recover": {"lr": "3e-4"}}).recover.lr == 3e-4
    assert isinstance(EvalConfig.coerce({"limit": 2}), EvalConfig) and MergeConfig.coerce(None) == MergeConfig()
    assert PruneConfig.coerce(PruneConfig(ratio=0.1)).ratio == 0.1


# Real processes: what reaches the terminal, including library loggers that hold their own handle on stderr.
PROCESS_CASES = [  # transformers' multi-line load report and loading bar went to the terminal here
    ("info-wrong-shape", "info {w}/st_wrong_shape", "does not match config.json"),
]


@pytest.mark.parametrize("argv,fragment", [c[1:] for c in PROCESS_CASES], ids=[c[0] for c in PROCESS_CASES])
def test_process_stderr_is_exactly_the_error_line(world, argv, fragment):
    before = snapshot(world)
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "rora", *argv.format(w=world).split()], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("rora: error: ") and fragment in done.stderr, done.stderr
    assert snapshot(world) == before
