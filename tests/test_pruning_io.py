"""Calibration sources and loading LLM-Pruner checkpoints."""
import copy
import json

import pytest
import torch
from conftest import make_model

from rora.artifacts import save_model_dir
from rora.errors import DataError, ModelLoadError
from rora.models import load_model
from rora.pruning.calibration import BUILTIN, encode, load_calibration, split_pool
from rora.architecture import LAYER_SHAPES_KEY, LayerShape, keep_units, layer_shapes


def _records(n, tag):
    return [{"instruction": f"{tag} question {i}?", "input": "", "output": f"the correct answer is {tag}{i}"} for i in range(n)]


def test_builtin_pool_is_seeded_and_split_disjoint():
    a, b, c = load_calibration("builtin", 1), load_calibration("builtin", 1), load_calibration("builtin", 2)
    assert a == b and a != c and sorted(a) == sorted(BUILTIN)
    calib, held = split_pool(a, 10, 8)
    assert len(calib) == 10 and len(held) == 8 and not set(calib) & set(held)


def test_training_file_and_task_dir(tmp_path):
    (tmp_path / "one.json").write_text(json.dumps(_records(3, "x")))
    assert sorted(load_calibration(str(tmp_path / "one.json"))) == sorted(
        f"x question {i}?\nthe correct answer is x{i}" for i in range(3)
    )
    for task in ("boolq", "piqa"):
        (tmp_path / "d" / task).mkdir(parents=True)
        (tmp_path / "d" / task / "train.json").write_text(json.dumps(_records(2, task)))
    texts = load_calibration(str(tmp_path / "d"))
    assert len(texts) == 4 and {t.split()[0] for t in texts} == {"boolq", "piqa"}


@pytest.mark.parametrize(
    "content,match",
    [("[]", "holds no text"), ('{"a": 1}', "JSON list"), ("not json", "not valid JSON"), (None, "not found")],
)
def test_bad_calibration_sources(tmp_path, content, match):
    path = tmp_path / "c.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataError, match=match):
        load_calibration(str(path))


def test_split_needs_enough_texts_and_encode_truncates(tokenizer):
    with pytest.raises(DataError, match="3 texts"):
        split_pool(["a", "b", "c"], 2, 2)
    ids = encode(tokenizer, [BUILTIN[0]], seq_len=16)
    assert ids[0].shape == (1, 16)


def _llm_pruner_checkpoint(path, tokenizer):
    """What LLM-Pruner saves: torch.save of the pruned module, its config still claiming the original shapes."""
    model = make_model("llama", layers=3, heads=4, kv_heads=2)
    keep_units(model.model.layers[1], model.config, keep_q=[0, 3], keep_kv=[0, 1], keep_channels=list(range(0, 96, 3)))
    keep_units(model.model.layers[2], model.config, keep_q=[2, 3], keep_kv=[1], keep_channels=list(range(50)))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())  # fp16-exact weights, so the fp32 reference below matches the fp16 file
    reference = copy.deepcopy(model)
    torch.save({"model": model.half(), "tokenizer": tokenizer}, path)  # LLM-Pruner saves fp16
    return reference


def test_llm_pruner_checkpoint_converts_and_round_trips(tmp_path, tokenizer):
    original = _llm_pruner_checkpoint(tmp_path / "pytorch_model.bin", tokenizer)
    assert original.config.num_attention_heads == 4 and not hasattr(original.config, LAYER_SHAPES_KEY)  # stale
    model, tok = load_model(tmp_path / "pytorch_model.bin", allow_pickle=True)
    expect = [LayerShape(4, 2, 96), LayerShape(2, 2, 32), LayerShape(2, 1, 50)]
    assert layer_shapes(model) == expect and next(model.parameters()).dtype == torch.float32
    assert [tuple(s.values()) for s in getattr(model.config, LAYER_SHAPES_KEY)] == [(4, 2, 96), (2, 2, 32), (2, 1, 50)]
    ids = torch.randint(3, 384, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, original(ids).logits, rtol=1e-5, atol=1e-5)
    save_model_dir(model, tok, tmp_path / "converted")
    again, _ = load_model(tmp_path / "converted")
    assert layer_shapes(again) == expect
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_llm_pruner_checkpoint_of_wrong_content(tmp_path):
    torch.save({"weights": torch.zeros(2)}, tmp_path / "x.pt")
    with pytest.raises(ModelLoadError, match="not an LLM-Pruner checkpoint"):
        load_model(tmp_path / "x.pt", allow_pickle=True)
