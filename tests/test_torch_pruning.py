"""Torch-Pruning hands a model to rora: the README's "Use rora after your pruner" example runs as written on a tiny
grouped-query Llama (6 query heads over 2 KV heads), Torch-Pruning prunes what rora's own surgery would, and the
merged model's exports compute what the merged model computes."""
import copy
import re

import pytest
import torch

from conftest import REPO, make_model, make_tokenizer

tp = pytest.importorskip("torch_pruning", reason="Torch-Pruning is not installed: pip install 'rora[torch-pruning]'")

HEAD_DIM = 8


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tp") / "base"
    make_model("llama", layers=2, hidden=48, heads=6, kv_heads=2, intermediate=96).save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


def _run_readme(base_dir, upto: str | None = None) -> dict:
    """The README's Torch-Pruning block on the tiny model (its spec in place of smollm2-135m), up to the first
    line starting with `upto` (included); returns its namespace."""
    (block,) = [b for b in re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
                if "torch_pruning" in b]
    block = block.replace('"smollm2-135m"', repr(str(base_dir)))
    if upto is not None:
        lines = block.splitlines()
        block = "\n".join(lines[: next(i for i, line in enumerate(lines) if line.startswith(upto)) + 1])
    namespace = {}
    exec(compile(block, "README.md", "exec"), namespace)
    return namespace


def _kept(before: torch.Tensor, after: torch.Tensor) -> list[int]:
    """Which rows of `before` the pruned `after` kept, in order."""
    return [int((before == row).all(1).nonzero()[0]) for row in after]


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_torch_pruning_prunes_whole_heads_per_kv_group_as_rora_surgery_would(base_dir, one_thread):
    from rora.architecture import LayerShape, config_layer_shapes, keep_units, layer_shapes, sync_config

    ns = _run_readme(base_dir, upto="rora.adopt(")
    teacher, model = ns["teacher"], ns["model"]
    reference = copy.deepcopy(teacher)
    for before, after, ref in zip(teacher.model.layers, model.model.layers, reference.model.layers):
        heads = sorted({r // HEAD_DIM for r in _kept(before.self_attn.q_proj.weight, after.self_attn.q_proj.weight)})
        kv = sorted({r // HEAD_DIM for r in _kept(before.self_attn.k_proj.weight, after.self_attn.k_proj.weight)})
        channels = _kept(before.mlp.up_proj.weight, after.mlp.up_proj.weight)
        assert kv == [0, 1] and [sum(h // 3 == g for h in heads) for g in kv] == [2, 2]  # one head off each group
        keep_units(ref, reference.config, heads, kv, channels)
    sync_config(reference.config, layer_shapes(reference))
    assert layer_shapes(model) == config_layer_shapes(model.config) == [LayerShape(4, 2, 72)] * 2
    ids = torch.randint(0, 384, (2, 11))
    torch.testing.assert_close(_logits(model, ids), _logits(reference, ids), rtol=0, atol=0)
    assert model.config._attn_implementation == "sdpa"  # traceable() put back what it changed


def test_readme_torch_pruning_example_runs_and_its_exports_compute_the_merged_model(base_dir, data_dir, tmp_path,
                                                                                   monkeypatch, one_thread):
    from transformers import AutoModelForCausalLM

    import rora

    monkeypatch.setenv("RORA_DATA_DIR", str(data_dir))
    monkeypatch.chdir(tmp_path)
    ns = _run_readme(base_dir)
    refit, result, merged = ns["refit"], ns["result"], ns["merged"]
    assert refit.heldout_after["kl"] < refit.heldout_before["kl"]
    assert result.objective == "kd" and result.steps == 4 and "val_kl" in result.val_metrics
    assert ns["merge_report"].max_abs_diff <= 1e-4
    ids = torch.randint(3, 384, (2, 13))
    expected = _logits(merged, ids)
    hf = tmp_path / "runs" / "tp" / "hf"
    plain = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    loaded = [plain, rora.load_model(hf)[0], rora.load_model(tmp_path / "runs" / "tp" / "model.gguf")[0]]
    for model in loaded:  # fp32 exports: the stage itself verifies 1e-4, the same bound here
        torch.testing.assert_close(_logits(model, ids), expected, rtol=0, atol=1e-4)
    assert plain.config.num_attention_heads == 4 and plain.config.attention_bias  # the refit's output biases
