"""GGUF exports run in llama.cpp itself: compact non-uniform (deci) logits, tokenizer round trip, quantization report.

Needs llama-cpp-python (`make edge`, ~15 min build); skipped otherwise, so `make test` runs without it.
"""
import numpy as np
import pytest

pytest.importorskip("llama_cpp")

from conftest import make_model  # noqa: E402
from rora.config import ExportConfig  # noqa: E402
from rora.models import load_model  # noqa: E402
from rora.deployment import export_model  # noqa: E402
from rora.sources.gguf import gguf_metadata  # noqa: E402
from rora.deployment.llamacpp import Runner  # noqa: E402
from rora.numerics import logits_on, probe_inputs  # noqa: E402
from test_export import _six_of_eight  # noqa: E402

IDS = probe_inputs(384)


def llamacpp_diff(path, model) -> float:
    with Runner(path, n_ctx=IDS.shape[1]) as r:
        got = np.stack([r.logits(row.tolist()) for row in IDS])
    return float(np.abs(got - logits_on(model, IDS).numpy()).max())


def test_compact_nonuniform_gguf_equals_compact_hf_in_llamacpp(tmp_path, tiny_nonuniform, tokenizer):
    export_model(tiny_nonuniform, tokenizer, ExportConfig(format="hf"), tmp_path / "hf")
    compact, tok = load_model(tmp_path / "hf")  # the compact HF model, rebuilt by rora
    report = export_model(compact, tok, ExportConfig(format="gguf"), tmp_path / "m.gguf")
    assert report.architecture == "deci" and report.llamacpp["greedy_match"] == 16
    assert llamacpp_diff(tmp_path / "m.gguf", compact) <= 1e-4
    assert report.llamacpp["max_abs_diff"] <= 1e-4 and "llama.cpp" in report.verified_with
    padded = export_model(compact, tok, ExportConfig(format="gguf", layout="padded"), tmp_path / "p.gguf")
    assert padded.architecture == "llama" and llamacpp_diff(tmp_path / "p.gguf", compact) <= 1e-4


@pytest.mark.parametrize("arch", ["six_of_eight", "qwen2"])
def test_uniform_gguf_in_llamacpp(tmp_path, tokenizer, arch):
    model = _six_of_eight(tokenizer) if arch == "six_of_eight" else make_model("qwen2", heads=4, kv_heads=2)
    report = export_model(model, tokenizer, ExportConfig(format="gguf"), tmp_path / "m.gguf")
    assert llamacpp_diff(tmp_path / "m.gguf", model) <= 1e-4 and report.llamacpp["greedy_match"] == 16


def _with_biases(model):
    """`model` with a random bias on every projection, as reconstruction leaves o_proj and down_proj (issue #20)."""
    import torch

    from rora.architecture import add_output_biases, decoder_layers

    add_output_biases(model)
    gen = torch.Generator().manual_seed(1)
    for layer in decoder_layers(model):
        for owner in (layer.self_attn, layer.mlp):
            for linear in owner.children():
                if getattr(linear, "bias", None) is not None:
                    linear.bias.data = torch.randn(linear.bias.shape, generator=gen)
    return model


@pytest.mark.parametrize("shape", ["uniform", "compact", "padded"])
def test_output_biases_run_in_llamacpp(tmp_path, tokenizer, tiny_gqa, tiny_nonuniform, shape):
    """A reconstructed model's biases are written to the GGUF and read by llama.cpp: its logits equal rora's."""
    model = _with_biases(tiny_gqa if shape == "uniform" else tiny_nonuniform)
    layout = "padded" if shape == "padded" else "compact"
    report = export_model(model, tokenizer, ExportConfig(format="gguf", layout=layout), tmp_path / "m.gguf")
    names = gguf_metadata(tmp_path / "m.gguf")["tensor_types"]
    assert {"blk.0.attn_output.bias", "blk.0.ffn_down.bias", "blk.0.attn_q.bias"} <= set(names)
    assert llamacpp_diff(tmp_path / "m.gguf", model) <= 1e-4 and report.llamacpp["greedy_match"] == 16


def test_tokenizer_round_trip_through_llamacpp(tmp_path, tiny_gqa, tokenizer):
    from rora.sources.gguf import GGUF_TOKENIZER_KEY

    text = "Hello , world . The capital of France is Paris ; answer1 true ?"
    export_model(tiny_gqa, tokenizer, ExportConfig(format="gguf"), tmp_path / "derived.gguf")
    setattr(tiny_gqa.config, GGUF_TOKENIZER_KEY, {"tokenizer.ggml.pre": "smollm"})  # as load_gguf records it
    export_model(tiny_gqa, tokenizer, ExportConfig(format="gguf"), tmp_path / "source.gguf")
    with Runner(tmp_path / "source.gguf", n_ctx=64) as r:
        ids = r.tokenize(text)
        assert ids == tokenizer(text)["input_ids"] and r.detokenize(ids) == text
    # the tag is what decides: gpt-2's cleans up spaces before punctuation on detokenisation (issue #14)
    with Runner(tmp_path / "derived.gguf", n_ctx=64) as r:
        assert r.detokenize(ids) == "Hello, world. The capital of France is Paris ; answer1 true?"


def test_smollm2_tokenizer_metadata_in_llamacpp(tmp_path, smollm2):
    model, tok = smollm2
    export_model(model, tok, ExportConfig(format="gguf"), tmp_path / "smol.gguf")
    meta = gguf_metadata(tmp_path / "smol.gguf")
    assert meta["tokenizer.ggml.pre"] == "smollm" and meta["tokenizer.ggml.add_space_prefix"] is False
    text = "Hello , world . It costs 2024 dollars ; ok ?"
    with Runner(tmp_path / "smol.gguf", n_ctx=64) as r:
        ids = r.tokenize(text)
        # with gpt-2's tag llama.cpp cleans up spaces on detokenisation: "Hello, world." (issue #14)
        assert r.detokenize(ids) == text and r.detokenize(tok(text)["input_ids"]) == text


def test_q4_k_m_quantization_report(tmp_path, tiny_gqa, tokenizer):
    report = export_model(tiny_gqa, tokenizer, ExportConfig(format="gguf", dtype="q4_k_m"), tmp_path / "m.gguf")
    q = report.quality
    assert q["engine"] == "llama.cpp" and q["tokens"] > 100 and q["reference_ppl"] > 1
    assert q["increase"] == pytest.approx(q["ppl"] / q["reference_ppl"] - 1) and abs(q["increase"]) < 0.05
    types = set(gguf_metadata(tmp_path / "m.gguf")["tensor_types"].values())
    assert types - {"F32"} and not types <= {"F32", "F16"}  # llama.cpp quantized the matrices
    f32 = export_model(tiny_gqa, tokenizer, ExportConfig(format="gguf"), tmp_path / "f32.gguf")
    assert report.size_bytes < 0.5 * f32.size_bytes
    assert "Which file to deploy" in (tmp_path / "m.md").read_text()
