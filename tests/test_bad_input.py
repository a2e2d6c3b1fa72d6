"""Bad input across the commands and the Python API: exit code 2, exactly one line on stderr (no traceback, no
library report or progress bar before it), and nothing written, overwritten or deleted (the file tree under the
test's root, with sizes, modes and modification times, is the same before and after).

The cases are grouped by the class of defect they guard (issue 19): outputs that would overwrite an input,
manifests as untrusted input, resource bombs refused before allocation, inputs that once escaped as tracebacks,
values and messages. Bombs also run as real processes under a memory limit (test_bombs_are_refused_...)."""
from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from conftest import REPO, make_model

from rora.artifacts import save_model_dir
from rora.cli import main
from rora.config import EvalConfig, ExportConfig, MergeConfig, PipelineConfig, PruneConfig, RecoverConfig
from rora.errors import ConfigError, DataError, MergeError, ModelLoadError, TrainingError

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
    def crash(self, *args):
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
    _hostile_inputs(root, tokenizer)
    return root


def _recovery(root, name, base, manifest=None):
    """A recovery directory (the world's adapter) whose manifest names `base`, or holds `manifest` (text)."""
    from rora.artifacts import MANIFEST, write_stage_manifest

    shutil.copytree(root / "adapter", root / name / "adapter")
    if manifest is None:
        write_stage_manifest(root / name, "recover", {"model": str(base)}, {}, {})
    else:
        (root / name / MANIFEST).write_text(manifest)
    return root / name


def _gguf(path, **keys):
    """A GGUF file declaring `keys` (block_count, ...) with one token_embd tensor."""
    import numpy as np
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), "llama")
    for key, value in keys.items():
        getattr(writer, f"add_{key}")(value)
    writer.add_tensor("token_embd.weight", np.zeros((384, 64), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _hostile_inputs(root, tokenizer):
    """Inputs of issue 19's classes: recoveries with changed or hostile manifests, config and GGUF bombs, data that
    is no UTF-8, a short-context teacher, a directory in the place of a partial run, a link loop."""
    def config(d, **changes):
        cfg = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({**cfg, **changes}))

    _copy_model(root, "layers_bomb", lambda d: config(d, num_hidden_layers=10**7))
    _copy_model(root, "heads_zero", lambda d: config(d, num_attention_heads=0))
    _copy_model(root, "config_list", lambda d: (d / "config.json").write_text("[]"))
    _copy_model(root, "config_deep", lambda d: (d / "config.json").write_text("[" * 100_000 + "]" * 100_000))
    _copy_model(root, "config_huge", lambda d: os.truncate(d / "config.json", 65 * 2**20))  # sparse: no disk used
    _gguf(root / "arch_only.gguf")
    _gguf(root / "layers_bomb.gguf", block_count=10**7, embedding_length=64, head_count=4, feed_forward_length=96)
    (root / "counts_bomb.gguf").write_bytes(b"GGUF" + (3).to_bytes(4, "little") + (2**40).to_bytes(8, "little")
                                            + (1).to_bytes(8, "little"))
    short = make_model(heads=4, kv_heads=2)
    short.config.max_position_embeddings = 8
    save_model_dir(short, tokenizer, root / "short_teacher")

    # recoveries: one whose base was replaced since, one naming a pickle, and manifests that are no manifests
    _copy_model(root, "base_changed", lambda d: None)
    _recovery(root, "rec_stale", root / "base_changed")
    save_model_dir(make_model(heads=4, kv_heads=2, seed=5), tokenizer, root / "base_changed")
    _recovery(root, "rec_pickle", root / "pickle_only")
    _recovery(root, "rec_done", root / "model")
    manifest = json.loads((root / "rec_done" / "rora.json").read_text())
    for name, text in {"rec_list": "[]", "rec_deep": "[" * 100_000 + "]" * 100_000,
                       "rec_no_source": json.dumps({"stage": "recover"}),
                       "rec_source_text": json.dumps({**manifest, "source": "model"}),
                       "rec_pointer_number": json.dumps({**manifest, "source": {"model": 5}}),
                       "rec_pointer_nul": json.dumps({**manifest, "source": {"model": "/x\u0000y"}}),
                       "rec_schema_99": json.dumps({**manifest, "schema": 99}),
                       "rec_huge": ""}.items():
        _recovery(root, name, None, text)
    os.truncate(root / "rec_huge" / "rora.json", 17 * 2**20)

    (root / "lmeval_bad" / "boolq").mkdir(parents=True)
    (root / "lmeval_bad" / "boolq" / "lmeval_validation.jsonl").write_bytes(b'{"question": "caf\xe9"}\n')
    (root / "latin1_data" / "boolq").mkdir(parents=True)
    (root / "latin1_data" / "boolq" / "test.json").write_bytes('[{"instruction": "caf\xe9"}]'.encode("latin-1"))
    shutil.copytree(root / "model", root / ".mdl.partial")  # a model where a run into mdl would train
    (root / ".foreign.partial").mkdir()
    (root / ".foreign.partial" / "notes.txt").write_text("mine")
    os.symlink("loop", root / "loop")
    # a billion laughs in a known key: nine levels of nine aliases, 9**9 strings once anything (the repr in a type
    # error's message) walks them
    levels = ["&a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    levels += [f"&a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    (root / "laughs.yaml").write_text(f"ratio: [{', '.join(levels)}]\n")
    _recovery(root, "rec_bomb", None, "")
    os.truncate(root / "rec_bomb" / "rora.json", 8 * 2**30)  # sparse: no disk used, 8 GiB to read
    (root / "big.yaml").write_text("ratio: 0.3\n")
    os.truncate(root / "big.yaml", 2 * 2**20)
    (root / "beams_bomb.yaml").write_text("num_beams: 100000\n")
    (root / "evil.yaml").write_text("out: /somewhere/else\n")  # a valid pipeline config that is no preset


def snapshot(root):
    """Every entry under `root` (links as links: a link loop is an entry too) with its kind, mode, size, mtime."""
    found = {}
    for p in root.rglob("*"):
        s = p.lstat()
        found[str(p.relative_to(root))] = (stat.S_IFMT(s.st_mode), s.st_mode, s.st_size, s.st_mtime_ns)
    return found


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
    ("info-config-not-json", "info {w}/cfg_not_json", "config.json is corrupt (not valid JSON"),
    ("info-config-empty", "info {w}/cfg_empty", "model_type"),
    ("info-safetensors-0-bytes", "info {w}/st_empty", "header too small"),
    ("info-safetensors-truncated", "info {w}/st_truncated", "model.safetensors is corrupt"),
    ("info-wrong-shape", "info {w}/st_wrong_shape", "up_proj.weight is [50, 64] in the weights but [96, 64]"),
    ("info-pickle-only-dir", "info {w}/pickle_only", "--allow-pickle"),
    ("prune-ratio-range", "prune {w}/model --ratio 1.5 --out {w}/p", "prune.ratio must be in [0, 1)"),
    ("prune-ratio-nan", "prune {w}/model --ratio nan --out {w}/p", "finite"),
    ("prune-num-samples", "prune {w}/model --num-samples -1 --out {w}/p", "num_samples must be > 0"),
    ("prune-out-exists", "prune {w}/model --out {w}/existing", "already exists"),
    ("prune-out-parent-is-file", "prune {w}/model --out {w}/a_file/p", "is not a directory"),
    ("prune-out-is-input", "prune {w}/model --out {w}/model --overwrite", "would replace the input"),
    ("prune-yaml-not-utf8", "prune {w}/model --out {w}/p --config {w}/latin1.yaml", "latin1.yaml is not UTF-8 text"),
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


EVAL = "--tasks boolq --data-dir {w}/evaldata"
RECOVER_DATA = "--data {w}/data.json"
CLI_CASES += [
    # 1. every input is protected from every output, --overwrite or not; rora deletes only what it marked
    ("eval-out-inside-model", "eval {w}/model " + EVAL + " --out {w}/model/config.json --overwrite", "write inside the input"),
    ("eval-out-inside-data-dir", "eval {w}/model " + EVAL + " --out {w}/evaldata/boolq/test.json --overwrite",
     "write inside the input"),
    ("eval-out-inside-env-data-dir", "eval {w}/model --tasks boolq --out {w}/evaldata/boolq/r.json --overwrite",
     "write inside the input"),  # the data directory from RORA_DATA_DIR (set by the test) counts too
    ("eval-out-inside-recovery-base", "eval {w}/rec_done " + EVAL + " --out {w}/model/e.json", "write inside the input"),
    ("prune-out-is-calibration", "prune {w}/model --calibration {w}/data.json --out {w}/data.json --overwrite",
     "replace the input"),
    ("prune-out-inside-model", "prune {w}/model --out {w}/model/sub --overwrite", "write inside the input"),
    ("prune-out-is-working-dir", "prune {w}/model --out . --overwrite", "working directory"),
    ("recover-out-is-data", "recover {w}/model " + RECOVER_DATA + " --out {w}/data.json --overwrite", "replace the input"),
    ("recover-out-holds-data", "recover {w}/model --data {w}/evaldata/boolq/test.json --out {w}/evaldata --overwrite",
     "holds the input"),
    ("recover-out-is-teacher", "recover {w}/model " + RECOVER_DATA + " --teacher {w}/other_model --out {w}/other_model "
     "--overwrite", "replace the input"),
    ("recover-partial-is-the-model", "recover {w}/.mdl.partial " + RECOVER_DATA + " --out {w}/mdl --overwrite",
     "replace the input"),
    ("recover-partial-not-rora-s", "recover {w}/model " + RECOVER_DATA + " --out {w}/foreign --overwrite", "not rora's"),
    ("merge-out-is-recovery-base", "merge {w}/rec_done --out {w}/model --overwrite", "replace the input"),
    ("export-out-inside-model", "export {w}/model --format hf --out {w}/model/exported --overwrite",
     "write inside the input"),
    ("run-out-holds-model", "run --model {w}/model --out {w} --overwrite " + RECOVER_DATA + " --data-dir {w}/evaldata "
     "--tasks boolq", "holds the input"),
    # 2. a manifest is untrusted input: schema, size, pointers, fingerprints, no opt-in extended to what it names
    ("merge-recovery-base-changed", "merge {w}/rec_stale --out {w}/m", "has changed since"),
    ("eval-recovery-base-changed", "eval {w}/rec_stale " + EVAL + " --out {w}/e.json", "has changed since"),
    ("eval-manifest-names-a-pickle", "eval {w}/rec_pickle --allow-pickle " + EVAL + " --out {w}/e.json",
     "name it yourself"),
    ("merge-manifest-not-an-object", "merge {w}/rec_list --out {w}/m", "not a rora manifest: a JSON list"),
    ("merge-manifest-nested-deeply", "merge {w}/rec_deep --out {w}/m", "nested too deeply"),
    ("merge-manifest-missing-keys", "merge {w}/rec_no_source --out {w}/m", "no source, config"),
    ("merge-manifest-source-wrong-type", "merge {w}/rec_source_text --out {w}/m", "source is not an object"),
    ("merge-manifest-pointer-number", "merge {w}/rec_pointer_number --out {w}/m", "is not a path"),
    ("merge-manifest-pointer-nul", "merge {w}/rec_pointer_nul --out {w}/m", "is not a path"),
    ("merge-manifest-schema-newer", "merge {w}/rec_schema_99 --out {w}/m", "upgrade rora"),
    ("merge-manifest-too-large", "merge {w}/rec_huge --out {w}/m", "larger than 16 MiB"),
    ("export-card-of-corrupt-manifest", "export {w}/rec_list --format hf --out {w}/x", "not a rora manifest"),
    # 4. sizes and counts are checked before anything is allocated (see also the memory-limited processes below)
    ("info-config-layers-bomb", "info {w}/layers_bomb", "num_hidden_layers is 10000000 but the weights hold 2"),
    ("info-config-heads-zero", "info {w}/heads_zero", "num_attention_heads must be a positive integer, got 0"),
    ("info-config-not-an-object", "info {w}/config_list", "not a JSON object"),
    ("info-config-nested-deeply", "info {w}/config_deep", "nested too deeply"),
    ("info-config-huge", "info {w}/config_huge", "larger than 64 MiB"),
    ("info-gguf-layers-bomb", "info {w}/layers_bomb.gguf", "num_hidden_layers is 10000000"),
    ("info-gguf-header-counts", "info {w}/counts_bomb.gguf", "more than its 24 bytes can hold"),
    ("recover-synthetic-bomb", "recover {w}/model --teacher {w}/model --synthetic 1000000000000 --out {w}/r",
     "recover.synthetic must be <="),
    ("recover-epochs-bomb", "recover {w}/model " + RECOVER_DATA + " --epochs 1e12 --val-set-size 4 --out {w}/r", "optimizer steps, more than"),
    ("recover-max-steps-bomb", "recover {w}/model " + RECOVER_DATA + " --max-steps 100000000000 --out {w}/r",
     "recover.max_steps must be <="),
    ("recover-rank-bomb", "recover {w}/model " + RECOVER_DATA + " --rank 60000 --out {w}/r", "smaller side"),
    ("eval-num-beams-bomb", "eval {w}/model --config {w}/beams_bomb.yaml " + EVAL + " --out {w}/e.json",
     "eval.num_beams must be <= 64"),
    ("prune-yaml-alias-bomb", "prune {w}/model --config {w}/laughs.yaml --out {w}/p", "aliases"),
    ("prune-yaml-huge", "prune {w}/model --config {w}/big.yaml --out {w}/p", "larger than 1 MiB"),
    # 8. what escaped as a traceback
    ("info-gguf-only-architecture", "info {w}/arch_only.gguf", "lacks the GGUF keys llama.block_count"),
    ("eval-lmeval-file-not-utf8", "eval {w}/model --tasks boolq --protocol lm-eval --data-dir {w}/lmeval_bad --out {w}/e.json",
     "lmeval_validation.jsonl is not UTF-8 text (invalid byte 0xe9"),
    ("eval-test-file-not-utf8", "eval {w}/model --tasks boolq --data-dir {w}/latin1_data --out {w}/e.json",
     "test.json is not UTF-8 text"),
    ("recover-teacher-short-context", "recover {w}/model " + RECOVER_DATA + " --teacher {w}/short_teacher --out {w}/r",
     "the teacher handles 8 positions"),
    ("prune-out-link-loop", "prune {w}/model --out {w}/loop --overwrite", "symbolic link loop"),
    ("prune-out-link-loop-exists", "prune {w}/model --out {w}/loop", "already exists"),
    ("prune-out-with-newline", "prune {w}/model --out {w}/a_file/x\ny", "a_file/x\\ny"),
    # 10. values and messages
    ("eval-tasks-empty", "eval {w}/model --tasks  --data-dir {w}/evaldata --out {w}/e.json", "no task given"),
    ("eval-tasks-twice", "eval {w}/model --tasks boolq,boolq --data-dir {w}/evaldata --out {w}/e.json",
     "eval.tasks names boolq more than once"),
    ("run-tasks-empty", "run --preset quickstart --tasks  --print-config", "no task given"),
    ("run-preset-is-a-path", "run --preset {p}/evil --print-config", "unknown preset"),  # {p}: the world from presets/
    ("recover-kd-temperature-huge", "recover {w}/model " + RECOVER_DATA + " --teacher {w}/model --kd-temperature 1e30 "
     "--out {w}/r", "recover.kd_temperature must be <= 100"),
    ("prune-device-unknown", "prune {w}/model --device tpu --out {w}/p",
     "must be auto, cpu, cuda, cuda:N or mps, got 'tpu'"),
    ("run-device-unknown", "run --preset quickstart --device gpu0 --print-config",
     "device must be auto, cpu, cuda, cuda:N or mps"),
    *([("eval-device-cuda-without-one", "eval {w}/model " + EVAL + " --device cuda --out {w}/e.json",
        "device 'cuda' is not available on this machine"),
       ("run-device-cuda-without-one", "run --model {w}/model --out {w}/r --device cuda " + RECOVER_DATA +
        " --data-dir {w}/evaldata --tasks boolq", "device 'cuda' is not available on this machine")]
      if not torch.cuda.is_available() else []),
    ("usage-missing-option", "prune {w}/model", "Missing option '--out'"),
    ("usage-unknown-option", "prune {w}/model --out {w}/p --bogus", "No such option '--bogus'"),
]


@pytest.mark.parametrize("argv,fragment", [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_cli_bad_input_is_one_line_and_touches_nothing(world, argv, fragment, monkeypatch):
    from rora.config import PRESETS_DIR

    monkeypatch.setenv("RORA_DATA_DIR", str(world / "evaldata"))
    argv = argv.format(w=world, p=os.path.relpath(world, PRESETS_DIR))
    line = fails_cleanly(world, *argv.split(" "))  # not on newlines: a path may hold one
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


_rora = __import__("rora")
API_CASES += [  # 9. wrong argument types are typed errors, never AttributeError, TypeError or AssertionError
    ("prune-none-model", lambda m, tok, w: _rora.prune(None, tok, PruneConfig()), ConfigError, "must be a loaded model"),
    ("prune-path-as-model", lambda m, tok, w: _rora.prune(str(w / "model"), tok, PruneConfig()), ConfigError,
     "is a path or spec"),
    ("prune-path-as-tokenizer", lambda m, tok, w: _rora.prune(m, str(w / "model"), PruneConfig()), ConfigError,
     "tokenizer must be"),
    ("recover-number-as-data", lambda m, tok, w: _rora.recover(m, tok, 5, RecoverConfig(**RECOVER_CFG)), DataError,
     "got int"),
    ("recover-path-as-teacher", lambda m, tok, w: _rora.recover(m, tok, _records(24), RecoverConfig(**RECOVER_CFG),
                                                                teacher=str(w / "model")), ConfigError, "teacher is a path"),
    ("evaluate-path-as-model", lambda m, tok, w: _rora.evaluate(w / "model", tok), ConfigError, "is a path or spec"),
    ("merge-number-as-adapter", lambda m, tok, w: _rora.merge(m, 3), MergeError, "directory's path, got int"),
    ("merge-none-model", lambda m, tok, w: _rora.merge(None, w / "adapter"), ConfigError, "must be a loaded model"),
    ("export-none-model", lambda m, tok, w: _rora.export(None, tok, ExportConfig(), w / "x"), ConfigError,
     "must be a loaded model"),
    ("describe-path", lambda m, tok, w: _rora.describe(str(w / "model")), ConfigError, "is a path or spec"),
    ("load-none-spec", lambda m, tok, w: _rora.load_model(None), ConfigError, "got NoneType"),
    ("load-unknown-device", lambda m, tok, w: _rora.load_model(w / "model", device="gpu"), ConfigError,
     "unknown device 'gpu'"),
    ("load-cuda-without-cuda", lambda m, tok, w: _rora.load_model(w / "model", device="cuda")
     if not torch.cuda.is_available() else pytest.skip("CUDA is available here"), ModelLoadError, "not available"),
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
    with pytest.raises(ConfigError, match="recover.lr must be a number > 0 or 'auto', got 'fast'"):
        RecoverConfig.from_dict({"lr": "fast"})
    assert PipelineConfig.from_dict({"recover": {"lr": "3e-4"}}).recover.lr == 3e-4
    assert isinstance(EvalConfig.coerce({"limit": 2}), EvalConfig) and MergeConfig.coerce(None) == MergeConfig()
    assert PruneConfig.coerce(PruneConfig(ratio=0.1)).ratio == 0.1


# Real processes: what reaches the terminal, including library loggers that hold their own handle on stderr; and
# resource bombs, each under a memory limit well below what it would allocate, refused in seconds.
MEMORY_LIMIT = 6 * 2**30  # address space: torch and a tiny model need ~2.5 GiB of it; every bomb here far more
PROCESS_CASES = [  # transformers' multi-line load report and loading bar went to the terminal here
    ("info-wrong-shape", "info {w}/st_wrong_shape", "up_proj.weight is [50, 64] in the weights but [96, 64]"),
    ("bomb-config-layers", "info {w}/layers_bomb", "num_hidden_layers is 10000000"),
    ("bomb-gguf-layers", "info {w}/layers_bomb.gguf", "num_hidden_layers is 10000000"),
    ("bomb-manifest-8gib", "merge {w}/rec_bomb --out {w}/m", "larger than 16 MiB"),
    ("bomb-synthetic", "recover {w}/model --teacher {w}/model --synthetic 1000000000000 --out {w}/r", "recover.synthetic"),
    ("bomb-epochs", "recover {w}/model --data {w}/data.json --val-set-size 4 --epochs 1e12 --out {w}/r", "optimizer steps"),
    ("bomb-yaml-aliases", "prune {w}/model --config {w}/laughs.yaml --out {w}/p", "aliases"),
]


def _limit_memory():
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


@pytest.mark.parametrize("argv,fragment", [c[1:] for c in PROCESS_CASES], ids=[c[0] for c in PROCESS_CASES])
def test_process_stderr_is_exactly_the_error_line_and_bombs_are_refused_under_a_memory_limit(world, argv, fragment):
    before = snapshot(world)
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "rora", *argv.format(w=world).split(" ")], env=env, capture_output=True,
                          text=True, timeout=90, preexec_fn=_limit_memory)
    assert done.returncode == 2 and done.stdout == "", done.stderr[-2000:]
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("rora: error: ") and fragment in done.stderr, done.stderr
    assert snapshot(world) == before
