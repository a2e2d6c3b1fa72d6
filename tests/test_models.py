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
