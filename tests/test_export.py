"""Export: uniform hf reloads in plain transformers, padded == compact, GGUF round trips, bad input writes nothing."""
import json

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import make_model
from rora.artifacts import read_json, save_model_dir
from rora.cli import main
from rora.config import ExportConfig
from rora.errors import ConfigError, ExportError
from rora.models import load_model
from rora.pipelines.export import export, export_model, pad_model
from rora.pruning.structure import is_uniform, keep_units, layer_shapes, sync_config
from rora.recovery.merge import logits_on, probe_inputs

IDS = probe_inputs(384)


def diff(a, b) -> float:
    return float((logits_on(a, IDS) - logits_on(b, IDS)).abs().max())


def test_uniform_hf_loads_in_plain_transformers(tmp_path, tiny_gqa, tokenizer):
    card = {"base_model": "tiny/base", "evaluation": {"base": {"boolq": 0.61, "average": 0.61}}}
    path = export(tiny_gqa, tokenizer, ExportConfig(format="hf"), tmp_path / "hf", card=card)
    loaded = AutoModelForCausalLM.from_pretrained(path)
    assert "rora_layer_shapes" not in json.loads((path / "config.json").read_text())
    assert diff(loaded, tiny_gqa) <= 1e-5
    readme = (path / "README.md").read_text()
    assert "base_model: tiny/base" in readme and "| boolq | 61.0 |" in readme
    assert read_json(path / "rora_export.json")["export"]["layout"] == "uniform"


@pytest.mark.parametrize("arch", ["nonuniform", "qwen2"])
def test_padded_equals_compact(request, tmp_path, tokenizer, arch):
    if arch == "nonuniform":
        model = request.getfixturevalue("tiny_nonuniform")
    else:  # GQA with q/k/v biases (Qwen2): the padded rows' biases must be zero too
        model = make_model(arch, heads=4, kv_heads=2)
        keep_units(model.model.layers[0], model.config, keep_q=[1], keep_kv=[0], keep_channels=list(range(40)))
        sync_config(model.config, layer_shapes(model))
    padded = pad_model(model)
    assert is_uniform(layer_shapes(padded)) and not is_uniform(layer_shapes(model))
    assert diff(padded, model) <= 1e-5

    compact = export_model(model, tokenizer, ExportConfig(format="hf", layout="compact"), tmp_path / "compact")
    report = export_model(model, tokenizer, ExportConfig(format="hf", layout="padded"), tmp_path / "padded")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "padded")  # plain transformers, no rora
    rebuilt, _ = load_model(tmp_path / "compact")
    assert diff(plain, rebuilt) <= 1e-5 and diff(plain, model) <= 1e-5
    assert report.overhead == pytest.approx(report.parameters / compact.parameters - 1) and report.overhead > 0
    assert report.size_bytes > compact.size_bytes
    assert "Plain transformers cannot load" in (tmp_path / "compact" / "README.md").read_text()


def test_padding_a_whole_kv_group(tmp_path, tiny_nonuniform):
    # layer 2 keeps 2 query heads over 1 KV head: the padded KV group must contribute exactly nothing
    padded = pad_model(tiny_nonuniform)
    attn = padded.model.layers[2].self_attn
    hd = 16
    assert attn.k_proj.weight[hd:].abs().sum() == 0 and attn.v_proj.weight[hd:].abs().sum() == 0
    assert attn.q_proj.weight[2 * hd:].abs().sum() == 0 and attn.o_proj.weight[:, 2 * hd:].abs().sum() == 0
    # layer 0 keeps 1 query head per group: group 1's head moves to slot 2, slots 1 and 3 are zero with zero o_proj
    attn0 = padded.model.layers[0].self_attn
    assert attn0.q_proj.weight[hd:2 * hd].abs().sum() == 0 and attn0.o_proj.weight[:, 3 * hd:].abs().sum() == 0
    assert diff(padded, tiny_nonuniform) <= 1e-5


def test_gguf_f32_round_trip(tmp_path, tokenizer):
    model = make_model("llama", heads=4, kv_heads=2, tie=True)
    report = export_model(model, tokenizer, ExportConfig(format="gguf", dtype="f32"), tmp_path / "tiny.gguf")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf", dtype=torch.float32)
    assert diff(loaded, model) <= 1e-5 and report.max_abs_diff <= 1e-5
    assert (tmp_path / "tiny.md").is_file()
    reread = AutoTokenizer.from_pretrained(tmp_path, gguf_file="tiny.gguf")
    text = "The capital of France is Paris. answer1 true 2024</s>"
    assert reread(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert reread.eos_token == "</s>"


@pytest.mark.parametrize("dtype,tolerance", [("f16", 0.02), ("q8_0", 0.3)])
def test_gguf_f16_q8_0_within_looser_tolerance(tmp_path, tiny_gqa, tokenizer, dtype, tolerance):
    report = export_model(tiny_gqa, tokenizer, ExportConfig(format="gguf", dtype=dtype), tmp_path / "m.gguf")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32)
    assert 0 < diff(loaded, tiny_gqa) <= tolerance and report.max_abs_diff == pytest.approx(diff(loaded, tiny_gqa), rel=1e-3)


def _qwen2_nonuniform():
    model = make_model("qwen2", heads=4, kv_heads=2)
    keep_units(model.model.layers[0], model.config, keep_q=[1], keep_kv=[0], keep_channels=list(range(40)))
    sync_config(model.config, layer_shapes(model))
    return model


def test_nonuniform_gguf_compact_is_deci_padded_is_llama(tmp_path, tiny_nonuniform, tokenizer):
    from rora.pipelines.gguf import gguf_metadata, read_gguf_model, read_layer_shapes

    report = export_model(tiny_nonuniform, tokenizer, ExportConfig(format="gguf"), tmp_path / "c.gguf")
    meta = gguf_metadata(tmp_path / "c.gguf")
    assert report.architecture == meta["general.architecture"] == "deci" and report.layout == "compact"
    assert read_layer_shapes(meta) == layer_shapes(tiny_nonuniform)  # per-layer arrays, from the weights
    assert [int(v) for v in meta["deci.attention.head_count"]] == [2, 4, 2]
    assert diff(read_gguf_model(tmp_path / "c.gguf", tiny_nonuniform), tiny_nonuniform) <= 1e-5
    padded = export_model(tiny_nonuniform, tokenizer, ExportConfig(format="gguf", layout="padded"), tmp_path / "p.gguf")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="p.gguf", dtype=torch.float32)
    assert padded.architecture == "llama" and diff(loaded, tiny_nonuniform) <= 1e-5
    assert padded.size_bytes > report.size_bytes


def test_nonuniform_qwen2_gguf_compact_refused(tmp_path, tokenizer):
    with pytest.raises(ExportError, match="--layout padded"):
        export(_qwen2_nonuniform(), tokenizer, ExportConfig(format="gguf"), tmp_path / "m.gguf")
    assert not any(tmp_path.iterdir())


def test_failed_verification_writes_nothing(tmp_path, tiny_gqa, tokenizer, monkeypatch):
    import rora.pipelines.export as ex

    real = ex.logits_on
    calls = []

    def off_by_one_on_reload(model, ids, dtype=None):  # the first call is the reference; later ones read it back
        calls.append(1)
        return real(model, ids, dtype) + (len(calls) > 1)

    monkeypatch.setattr(ex, "logits_on", off_by_one_on_reload)
    with pytest.raises(ExportError, match="nothing was written"):
        export(tiny_gqa, tokenizer, ExportConfig(format="hf"), tmp_path / "hf")
    assert not any(tmp_path.iterdir())


def test_smollm2_gguf_f32(tmp_path, smollm2):
    model, tok = smollm2  # the real model: 9 query heads over 3 KV heads, tied embeddings, 49k merges
    report = export_model(model, tok, ExportConfig(format="gguf", dtype="f32"), tmp_path / "smol.gguf")
    assert report.max_abs_diff <= 1e-4 and report.size_bytes == pytest.approx(4 * 134.5e6, rel=0.05)
    reread = AutoTokenizer.from_pretrained(tmp_path, gguf_file="smol.gguf")
    text = "<|im_start|>user\nWhat is 2024 + 1? Answer: true<|im_end|>"
    assert reread(text)["input_ids"] == tok(text)["input_ids"]


# --- CLI ---------------------------------------------------------------------------------------------------------

def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_cli_export_padded_reports_overhead(tmp_path, tiny_nonuniform, tokenizer):
    save_model_dir(tiny_nonuniform, tokenizer, tmp_path / "m")
    result = run("export", tmp_path / "m", "--format", "hf", "--layout", "padded", "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert "padding)" in result.output and "max logit diff" in result.output and "size on disk" in result.output
    assert is_uniform(layer_shapes(AutoModelForCausalLM.from_pretrained(tmp_path / "out")))


def test_cli_export_bad_inputs_exit_2_write_nothing(tmp_path, tiny_nonuniform, tokenizer):
    save_model_dir(tiny_nonuniform, tokenizer, tmp_path / "m")
    save_model_dir(_qwen2_nonuniform(), tokenizer, tmp_path / "q")
    (tmp_path / "exists").mkdir()
    cases = [
        (["--format", "onnx", "--out", tmp_path / "o"], "export.format"),
        (["--format", "hf", "--layout", "sparse", "--out", tmp_path / "o"], "export.layout"),
        (["--format", "gguf", "--dtype", "q4_0", "--out", tmp_path / "o.gguf"], "export.dtype"),
        (["--format", "hf", "--out", tmp_path / "exists"], "--overwrite"),
        (["--format", "gguf", "--layout", "padded", "--out", tmp_path / "o.bin"], "must end in .gguf"),
        (["--format", "gguf", "--out", tmp_path / "o.gguf"], "--layout padded", "q"),
    ]
    for args, message, *model in cases:
        before = sorted(p.name for p in tmp_path.iterdir())
        result = run("export", tmp_path / (model[0] if model else "m"), *args)
        assert result.exit_code == 2, result.output
        errors = [line for line in result.output.splitlines() if line.startswith("rora: error:")]
        assert len(errors) == 1 and message in errors[0] and "Traceback" not in result.output, result.output
        assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert not any((tmp_path / "exists").iterdir())


def test_export_config_rejects_wrong_dtype_for_format():
    with pytest.raises(ConfigError, match="export.dtype for hf"):
        ExportConfig(format="hf", dtype="q8_0")
