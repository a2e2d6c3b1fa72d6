import pickle

import pytest
import torch

from rora.artifacts import save_model_dir
from rora.errors import ModelLoadError, UnsupportedModelError
from rora.models import describe, load_model
from rora.architecture import is_uniform, layer_shapes


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_hf_dir_round_trip_equal_logits(tmp_path, tiny_gqa, tokenizer):
    save_model_dir(tiny_gqa, tokenizer, tmp_path / "m")
    model, tok = load_model(tmp_path / "m")
    ids = torch.randint(0, 384, (2, 9))
    torch.testing.assert_close(_logits(model, ids), _logits(tiny_gqa, ids), rtol=0, atol=0)
    assert tok.pad_token is not None


def test_nonuniform_round_trip_exact(tmp_path, tiny_nonuniform, tokenizer):
    save_model_dir(tiny_nonuniform, tokenizer, tmp_path / "m")
    model, _ = load_model(tmp_path / "m")
    assert layer_shapes(model) == layer_shapes(tiny_nonuniform)
    assert not is_uniform(layer_shapes(model))
    ids = torch.randint(0, 384, (2, 7))
    torch.testing.assert_close(_logits(model, ids), _logits(tiny_nonuniform, ids), rtol=0, atol=0)


def test_nonuniform_generates_with_kv_cache(tiny_nonuniform):
    ids = torch.randint(3, 384, (1, 5))
    out = tiny_nonuniform.generate(ids, max_new_tokens=6, do_sample=False, use_cache=True)
    no_cache = tiny_nonuniform.generate(ids, max_new_tokens=6, do_sample=False, use_cache=False)
    assert out.shape == (1, 11)
    assert torch.equal(out, no_cache)


def test_describe_reports_per_layer_shapes(tiny_nonuniform, tokenizer):
    info = describe(tiny_nonuniform, tokenizer)
    assert info["layers"] == 3 and not info["uniform"]
    assert info["per_layer"][0] == {"q_heads": 2, "kv_heads": 2, "intermediate": 48}
    assert info["per_layer"][1] == {"q_heads": 4, "kv_heads": 2, "intermediate": 96}
    assert info["per_layer"][2] == {"q_heads": 2, "kv_heads": 1, "intermediate": 80}
    assert info["parameters"] == sum(p.numel() for p in tiny_nonuniform.parameters())


def test_pickle_refused_without_opt_in(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    path.write_bytes(pickle.dumps({"model": None}))
    with pytest.raises(ModelLoadError, match="--allow-pickle"):
        load_model(path)


@pytest.mark.parametrize("spec", ["no/such-model-here", "./missing-dir", "missing.gguf", "not a spec"])
def test_unknown_specs_raise_model_load_error(spec, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError):
        load_model(spec)


def test_unsupported_architecture_is_named(tmp_path, tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=384)).save_pretrained(tmp_path / "g")
    tokenizer.save_pretrained(tmp_path / "g")
    model, _ = load_model(tmp_path / "g")
    with pytest.raises(UnsupportedModelError, match="llama, mistral, qwen2"):
        describe(model)


def test_smollm2_alias_knows_paris(smollm2):
    model, tok = smollm2
    info = describe(model, tok)
    assert (info["layers"], info["num_attention_heads"], info["num_key_value_heads"]) == (30, 9, 3)
    assert info["intermediate_size"] == 1536
    assert abs(info["parameters"] - 134.5e6) < 0.1e6
    ids = tok("The capital of France is", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1]:])


def test_gguf_of_unsupported_architecture_is_refused(tmp_path):
    import numpy as np
    from gguf import GGUFWriter

    path = tmp_path / "gpt2.gguf"
    writer = GGUFWriter(str(path), "gpt2")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UnsupportedModelError, match="GGUF architecture 'gpt2' is not supported"):
        load_model(path)


def test_garbage_gguf_is_a_clear_error(tmp_path):
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(ModelLoadError, match="not a readable GGUF file"):
        load_model(tmp_path / "bad.gguf")


# ---- rora.adopt: a model pruned in memory by another tool ------------------------------------------------------
def _hand_pruned(model, layer: int, keep_q: list[int], keep_kv: list[int], channels: int):
    """Slice one layer's projections with plain torch, as a pruner outside rora would: the config and the
    attention module's num_key_value_groups keep their old values."""
    hd = model.config.head_dim
    rows = lambda heads: torch.cat([torch.arange(h * hd, (h + 1) * hd) for h in heads])  # noqa: E731
    attn, mlp = model.model.layers[layer].self_attn, model.model.layers[layer].mlp
    with torch.no_grad():
        for linear, index, dim in ((attn.q_proj, rows(keep_q), 0), (attn.k_proj, rows(keep_kv), 0),
                                   (attn.v_proj, rows(keep_kv), 0), (attn.o_proj, rows(keep_q), 1),
                                   (mlp.gate_proj, torch.arange(channels), 0), (mlp.up_proj, torch.arange(channels), 0),
                                   (mlp.down_proj, torch.arange(channels), 1)):
            linear.weight = torch.nn.Parameter(linear.weight.index_select(dim, index))
    return model


def test_adopt_syncs_a_model_pruned_elsewhere_and_it_computes_what_rora_surgery_computes(tiny_gqa, tokenizer):
    import copy

    import rora
    from rora.architecture import LayerShape, config_layer_shapes, keep_units

    reference = copy.deepcopy(tiny_gqa)
    model = _hand_pruned(_hand_pruned(tiny_gqa, 0, [0, 2], [0, 1], 64), 1, [2, 3], [1], 80)
    assert model.config.num_attention_heads == 4 and model.model.layers[0].self_attn.num_key_value_groups == 2
    assert rora.adopt(model, tokenizer) is model
    want = [LayerShape(2, 2, 64), LayerShape(2, 1, 80)]
    assert layer_shapes(model) == config_layer_shapes(model.config) == want
    assert [layer.self_attn.num_key_value_groups for layer in model.model.layers] == [1, 2]
    keep_units(reference.model.layers[0], reference.config, [0, 2], [0, 1], list(range(64)))
    keep_units(reference.model.layers[1], reference.config, [2, 3], [1], list(range(80)))
    for impl in ("eager", "sdpa"):
        model.config._attn_implementation = reference.config._attn_implementation = impl
        ids = torch.randint(0, 384, (2, 9))
        torch.testing.assert_close(_logits(model, ids), _logits(reference, ids), rtol=0, atol=0)
    rora.adopt(model, tokenizer)  # idempotent
    assert config_layer_shapes(model.config) == want


def test_recover_adopts_what_it_is_given(tiny_gqa, tokenizer):
    from conftest import even_odd_records, tiny_recover_config

    import rora
    from rora.architecture import config_layer_shapes

    model = _hand_pruned(tiny_gqa, 0, [1, 3], [0, 1], 48)
    result = rora.recover(model, tokenizer, even_odd_records(24), tiny_recover_config(max_steps=1, val_set_size=4),
                          progress=False)
    assert config_layer_shapes(result.model.get_base_model().config) == layer_shapes(result.model)


def test_adopt_refuses_modules_that_contradict_each_other(tiny_gqa, tokenizer):
    import rora
    from rora.errors import ConfigError, ModelShapeError

    layers = tiny_gqa.model.layers
    with torch.no_grad():
        layers[0].self_attn.v_proj.weight = torch.nn.Parameter(layers[0].self_attn.v_proj.weight[:16])
        layers[1].self_attn.o_proj.weight = torch.nn.Parameter(layers[1].self_attn.o_proj.weight[:, :48])
        layers[1].mlp.down_proj.weight = torch.nn.Parameter(layers[1].mlp.down_proj.weight[:, :90])
    with pytest.raises(ModelShapeError) as raised:
        rora.adopt(tiny_gqa, tokenizer)
    message = str(raised.value)
    assert "layer 0: v_proj has 16 rows but k_proj 32" in message
    assert "layer 1: o_proj reads 48 features but q_proj writes 64" in message and "gate/up/down widths 96/96/90" in message
    assert isinstance(raised.value, UnsupportedModelError)
    with pytest.raises(ConfigError, match="not a loaded model"):
        rora.adopt("runs/pruned")


def test_adopt_refuses_pruned_head_dimensions(tiny_gqa):
    import rora
    from rora.errors import ModelShapeError

    for layer in tiny_gqa.model.layers:  # every head 16 -> 12 wide: whole heads of 16 no longer
        attn = layer.self_attn
        keep = torch.cat([torch.arange(h * 16, h * 16 + 12) for h in range(attn.q_proj.weight.shape[0] // 16)])
        attn.head_dim = 12
        attn.q_proj.weight = torch.nn.Parameter(attn.q_proj.weight[keep])
    with pytest.raises(ModelShapeError, match="RoPE rotates 16 dimensions per head but the heads are 12 wide"):
        rora.adopt(tiny_gqa)


def test_embedded_model_in_bf16_keeps_rope_in_fp32(tmp_path, monkeypatch):
    """load_model("smollm2-135m", dtype=bf16) casts the weights only, on the first load (the GGUF converted) and
    from the cache alike: RoPE's inv_freq stays the fp32 values a model read from disk has."""
    monkeypatch.setenv("RORA_CACHE_DIR", str(tmp_path / "cache"))
    first, _ = load_model("smollm2-135m", dtype=torch.bfloat16)  # converts the GGUF into the empty cache
    cached, _ = load_model("smollm2-135m", dtype=torch.bfloat16)
    reference = load_model("smollm2-135m")[0].model.rotary_emb.inv_freq
    for model in (first, cached):
        assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
        inv_freq = model.model.rotary_emb.inv_freq
        assert inv_freq.dtype == torch.float32 and torch.equal(inv_freq, reference)


def test_device_auto_is_the_gpu_when_there_is_one_and_the_run_config_checks_its_spelling(tmp_path, tiny_gqa,
                                                                                           tokenizer):
    from rora.config import PipelineConfig
    from rora.errors import ConfigError
    from rora.models import resolve_device

    here = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto") == here and resolve_device("cpu") == "cpu" and resolve_device(None) is None
    save_model_dir(tiny_gqa, tokenizer, tmp_path / "m")
    model, _ = load_model(tmp_path / "m", device="auto")
    assert {p.device.type for p in model.parameters()} == {here}
    assert PipelineConfig().device == "auto" and PipelineConfig(device="cuda:1").device == "cuda:1"
    for bad in ("gpu", "cuda:", "CPU", "cuda:0 "):
        with pytest.raises(ConfigError, match="device must be auto, cpu, cuda, cuda:N or mps"):
            PipelineConfig(device=bad)
