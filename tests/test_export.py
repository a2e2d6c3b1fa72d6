"""Export: uniform hf reloads in plain transformers, padded == compact, GGUF round trips, bad input writes nothing."""
import copy
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
from rora.deployment import export, export_model, pad_model
from rora.architecture import is_uniform, keep_units, layer_shapes, sync_config
from rora.numerics import logits_on, probe_inputs

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
    assert read_json(path / "rora.json")["report"]["layout"] == "uniform"


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
    assert reread.eos_token == "</s>"  # transformers 5.17's reader says <s> (rora's loader corrects it: below)
    _, through_rora = load_model(tmp_path / "tiny.gguf")
    assert [through_rora.bos_token, through_rora.eos_token] == [tokenizer.bos_token, tokenizer.eos_token]


def test_a_gguf_files_own_special_tokens_win_over_what_transformers_built(tokenizer):
    from rora.models import file_special_tokens

    built = copy.deepcopy(tokenizer)
    built.eos_token = built.bos_token  # what transformers 5.17 builds from a gpt2-style file
    eos, unk = tokenizer.convert_tokens_to_ids(tokenizer.eos_token), tokenizer.convert_tokens_to_ids(tokenizer.unk_token)
    file_special_tokens(built, {"tokenizer.ggml.eos_token_id": eos, "tokenizer.ggml.padding_token_id": unk,
                                "tokenizer.ggml.bos_token_id": 10**9})  # an id outside the vocabulary is ignored
    assert (built.eos_token, built.pad_token, built.bos_token) == (tokenizer.eos_token, tokenizer.unk_token,
                                                                   tokenizer.bos_token)


@pytest.mark.parametrize("dtype,tolerance", [("f16", 0.02), ("q8_0", 0.3)])
def test_gguf_f16_q8_0_within_looser_tolerance(tmp_path, tiny_gqa, tokenizer, dtype, tolerance):
    report = export_model(tiny_gqa, tokenizer, ExportConfig(format="gguf", dtype=dtype), tmp_path / "m.gguf")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32)
    assert 0 < diff(loaded, tiny_gqa) <= tolerance and 0 < report.max_abs_diff <= tolerance
    if report.llamacpp is None:  # read back by transformers; with llama.cpp installed the figure is llama.cpp's
        assert report.max_abs_diff == pytest.approx(diff(loaded, tiny_gqa), rel=1e-3)


def _qwen2_nonuniform():
    model = make_model("qwen2", heads=4, kv_heads=2)
    keep_units(model.model.layers[0], model.config, keep_q=[1], keep_kv=[0], keep_channels=list(range(40)))
    sync_config(model.config, layer_shapes(model))
    return model


def test_nonuniform_gguf_compact_is_deci_padded_is_llama(tmp_path, tiny_nonuniform, tokenizer):
    from rora.sources.gguf import gguf_metadata, read_gguf_model, read_layer_shapes

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
    import rora.deployment as ex
    import rora.deployment.common as common

    real = ex.logits_on
    calls = []

    def off_by_one_on_reload(model, ids, dtype=None):  # the first call is the reference; later ones read it back
        calls.append(1)
        return real(model, ids, dtype) + (len(calls) > 1)

    monkeypatch.setattr(ex, "logits_on", off_by_one_on_reload)  # the reference
    monkeypatch.setattr(common, "logits_on", off_by_one_on_reload)  # the read-back check
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
    (tmp_path / "exists.gguf").write_bytes(b"keep")
    cases = [
        (["--format", "onnx", "--out", tmp_path / "o"], "export.format"),
        (["--format", "hf", "--layout", "sparse", "--out", tmp_path / "o"], "export.layout"),
        (["--format", "gguf", "--dtype", "q4_0", "--out", tmp_path / "o.gguf"], "export.dtype"),
        (["--format", "hf", "--out", tmp_path / "exists"], "--overwrite"),
        (["--format", "gguf", "--layout", "padded", "--out", tmp_path / "o.bin"], "must end in .gguf"),
        (["--format", "gguf", "--out", tmp_path / "o.gguf"], "--layout padded", "q"),
        (["--format", "gguf", "--out", tmp_path / "exists.gguf"], "--overwrite"),
    ]
    for args, message, *model in cases:
        before = sorted(p.name for p in tmp_path.iterdir())
        result = run("export", tmp_path / (model[0] if model else "m"), *args)
        assert result.exit_code == 2, result.output
        errors = [line for line in result.output.splitlines() if line.startswith("rora: error:")]
        assert len(errors) == 1 and message in errors[0] and "Traceback" not in result.output, result.output
        assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert not any((tmp_path / "exists").iterdir()) and (tmp_path / "exists.gguf").read_bytes() == b"keep"


def test_export_config_rejects_wrong_dtype_for_format():
    with pytest.raises(ConfigError, match="export.dtype for hf"):
        ExportConfig(format="hf", dtype="q8_0")


# --- #11 class 2: rora's own uniform prune whose head count does not divide hidden_size ----------------------------

def _six_of_eight(tokenizer):
    """A uniform 25% prune of 8 heads over hidden 64 (like LLaMA-7B's 32 -> 26): 6 heads, which LlamaConfig refuses."""
    from rora.config import PruneConfig
    from rora.pruning.prune import prune

    model = make_model("llama", heads=8, kv_heads=8, hidden=64)
    prune(model, tokenizer, PruneConfig(ratio=0.25, importance="l2", num_samples=2, holdout_samples=0, seq_len=16),
          ["The capital of France is Paris. A cat sat on the mat.", "the correct answer is true"])
    assert {(s.q_heads, s.kv_heads) for s in layer_shapes(model)} == {(6, 6)} and model.config.num_attention_heads == 8
    return model


@pytest.mark.parametrize("layout", ["compact", "padded"])
def test_six_of_eight_heads_hf_loads_in_plain_transformers(tmp_path, tokenizer, layout):
    model = _six_of_eight(tokenizer)
    report = export_model(model, tokenizer, ExportConfig(format="hf", layout=layout), tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert report.layout == "uniform" and config["num_attention_heads"] == 6 and config["head_dim"] == 8
    assert config["model_type"] == "mistral" and config["sliding_window"] is None and "rora_layer_shapes" not in config
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")  # plain transformers, no rora
    assert diff(plain, model) <= 1e-5 and report.max_abs_diff <= 1e-5
    assert diff(load_model(tmp_path / "hf")[0], model) <= 1e-5


def test_six_of_eight_heads_gguf_head_counts(tmp_path, tokenizer):
    from rora.sources.gguf import gguf_metadata, read_gguf_model

    model = _six_of_eight(tokenizer)
    report = export_model(model, tokenizer, ExportConfig(format="gguf"), tmp_path / "m.gguf")
    meta = gguf_metadata(tmp_path / "m.gguf")
    assert report.architecture == "llama" and meta["llama.attention.head_count"] == 6  # not the config's stand-in 8
    assert meta["llama.attention.head_count_kv"] == 6 and meta["llama.attention.key_length"] == 8
    assert meta["llama.feed_forward_length"] == layer_shapes(model)[0].intermediate
    assert report.verified_with.startswith("rora's GGUF reader")  # transformers' GGUF loader builds a LlamaConfig
    assert diff(read_gguf_model(tmp_path / "m.gguf", model), model) <= 1e-5


def test_cli_export_six_of_eight_heads(tmp_path, tokenizer):
    save_model_dir(_six_of_eight(tokenizer), tokenizer, tmp_path / "m")
    for args in (["--format", "hf", "--out", tmp_path / "hf"], ["--format", "hf", "--layout", "padded", "--out",
                 tmp_path / "padded"], ["--format", "gguf", "--out", tmp_path / "m.gguf"]):
        result = run("export", tmp_path / "m", *args)
        assert result.exit_code == 0 and "Traceback" not in result.output, result.output


# --- tokenizer metadata -------------------------------------------------------------------------------------------

def test_source_gguf_tokenizer_keys_survive_save_and_export(tmp_path, tiny_gqa, tokenizer):
    from rora.sources.gguf import GGUF_TOKENIZER_KEY, gguf_metadata

    # what load_gguf records for a model that came from a GGUF (SmolLM2's file says smollm; the rebuilt tokenizer
    # implies gpt-2)
    source = {"tokenizer.ggml.pre": "smollm", "tokenizer.ggml.add_space_prefix": False, "tokenizer.ggml.padding_token_id": 2}
    setattr(tiny_gqa.config, GGUF_TOKENIZER_KEY, source)
    save_model_dir(tiny_gqa, tokenizer, tmp_path / "m")
    reloaded, tok = load_model(tmp_path / "m")  # the key travels in config.json through every stage
    assert getattr(reloaded.config, GGUF_TOKENIZER_KEY) == source
    export(reloaded, tok, ExportConfig(format="gguf"), tmp_path / "m.gguf")
    meta = gguf_metadata(tmp_path / "m.gguf")
    assert {k: meta[k] for k in source} == source and meta["tokenizer.ggml.model"] == "gpt2"
    assert meta["tokenizer.ggml.eos_token_id"] == 2


def test_smollm2_records_its_gguf_tokenizer_keys(smollm2):
    from rora.sources.gguf import GGUF_TOKENIZER_KEY

    keys = getattr(smollm2[0].config, GGUF_TOKENIZER_KEY)
    assert keys["tokenizer.ggml.pre"] == "smollm" and keys["tokenizer.ggml.add_bos_token"] is False


# --- quantization -------------------------------------------------------------------------------------------------

def test_kquant_without_llamacpp_says_how_to_install(tmp_path, tiny_gqa, tokenizer, monkeypatch):
    import rora.deployment.llamacpp as lc

    monkeypatch.setattr(lc, "available", lambda: False)
    save_model_dir(tiny_gqa, tokenizer, tmp_path / "m")
    result = run("export", tmp_path / "m", "--format", "gguf", "--dtype", "q4_k_m", "--out", tmp_path / "o.gguf")
    assert result.exit_code == 2 and "rora[edge]" in result.output and "Traceback" not in result.output, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_q8_0_quality_report_without_llamacpp(tmp_path, tiny_gqa, tokenizer, monkeypatch):
    import rora.deployment.llamacpp as lc

    monkeypatch.setattr(lc, "available", lambda: False)
    report = export_model(tiny_gqa, tokenizer, ExportConfig(format="gguf", dtype="q8_0"), tmp_path / "m.gguf")
    q = report.quality
    assert q["engine"].startswith("torch") and q["tokens"] > 100 and q["reference_ppl"] > 1
    # a random tiny model's perplexity is near its vocabulary size, and int8 weights barely move it
    assert 0 < abs(q["increase"]) < 0.01 and q["warning"] is None and report.notes[0].startswith("llama.cpp check skipped")
    card = (tmp_path / "m.md").read_text()
    assert "heldout_ppl_change" in card and "deploy this file" in card
    # a threshold of 0 turns the same change into a warning and a recommendation against the file
    strict = export_model(tiny_gqa, tokenizer, ExportConfig(format="gguf", dtype="q8_0", max_ppl_increase=0.0),
                          tmp_path / "s.gguf")
    assert (strict.quality["warning"] is None) == (strict.quality["increase"] <= 0)


def test_q8_0_names_matrices_left_f16(tmp_path, tokenizer):
    # 30% of SmolLM2's 1536 channels leaves 1075: no whole 32-value blocks, so down_proj stays f16; say so
    model = make_model("llama", heads=4, kv_heads=2, intermediate=96)
    for layer in model.model.layers:
        keep_units(layer, model.config, keep_q=[0, 1, 2, 3], keep_kv=[0, 1], keep_channels=list(range(67)))
    sync_config(model.config, layer_shapes(model))
    report = export_model(model, tokenizer, ExportConfig(format="gguf", dtype="q8_0"), tmp_path / "m.gguf")
    assert any(n.startswith("2 matrices stay f16") and "of 67 values" in n for n in report.notes), report.notes
    clean = export_model(make_model("llama"), tokenizer, ExportConfig(format="gguf", dtype="q8_0"), tmp_path / "c.gguf")
    assert not any("stay f16" in n for n in clean.notes)
