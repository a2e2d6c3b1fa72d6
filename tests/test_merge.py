"""Merge: merged == adapter model for LoRA, RoRA, DoRA and a custom alpha; failures and misfits write nothing."""
import json
import math

import pytest
import torch
from click.testing import CliRunner
from peft import LoraConfig, LoraModel, PeftModel, get_peft_model

from conftest import make_model
from rora.artifacts import read_json, save_model_dir
from rora.cli import main
from rora.config import MergeConfig
from rora.errors import MergeError
from rora.models import load_model
from rora.numerics import logits_on, probe_inputs
from rora.recovery.merge import check_fit, merge, save_merged

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK = 4
# name -> (LoraConfig kwargs, expected method, expected PEFT scale)
METHODS = {
    "lora": (dict(lora_alpha=8), "lora", 8 / RANK),
    "rora": (dict(lora_alpha=8, use_rslora=True), "rora", 8 / math.sqrt(RANK)),
    "dora": (dict(lora_alpha=8, use_dora=True), "dora", 8 / RANK),
    "custom_alpha": (dict(lora_alpha=5, use_rslora=True), "rora", 5 / math.sqrt(RANK)),
}


def with_adapter(model, method="rora", seed=1):
    """`model` with a random adapter whose B != 0 (so it changes the outputs); DoRA magnitudes perturbed too."""
    kwargs, _, _ = METHODS[method]
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(r=RANK, target_modules=TARGETS, init_lora_weights=False, **kwargs))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_magnitude_vector" in name:  # at init DoRA equals LoRA; make the magnitude matter
                p.mul_(1 + 0.2 * torch.rand_like(p))
    return peft_model.eval()


@pytest.mark.parametrize("method", list(METHODS))
def test_merged_equals_adapter_model(method):
    base_logits = logits_on(make_model("llama", heads=4, kv_heads=2), probe_inputs(384))
    peft_model = with_adapter(make_model("llama", heads=4, kv_heads=2), method)
    adapter_logits = logits_on(peft_model, probe_inputs(384))
    assert (adapter_logits - base_logits).abs().max() > 1e-2  # the adapter really changes the model

    merged, report = merge(peft_model)

    assert not isinstance(merged, PeftModel) and not any("lora" in n for n, _ in merged.named_parameters())
    assert (logits_on(merged, probe_inputs(384)) - adapter_logits).abs().max() <= 1e-4
    assert report.max_abs_diff <= 1e-4 and report.tolerance == 1e-4
    assert report.compute_dtype == "float64" and report.max_abs_diff < 1e-9  # a right merge is exact in float64
    assert report.max_abs_diff_after_cast <= 1e-4  # the float32 result's own rounding, reported
    _, expected_method, expected_scale = METHODS[method]
    assert report.method == expected_method
    assert report.effective_scale == pytest.approx(expected_scale)
    assert report.rank == RANK and report.merged_modules == 2 * len(TARGETS)


def test_merge_from_adapter_dir_save_and_reload(tmp_path, tokenizer):
    peft_model = with_adapter(make_model("llama", heads=4, kv_heads=2), "rora")
    adapter_logits = logits_on(peft_model, probe_inputs(384))
    peft_model.save_pretrained(tmp_path / "adapter")

    merged, report = merge(make_model("llama", heads=4, kv_heads=2), tmp_path / "adapter", MergeConfig(dtype="bfloat16"))
    assert next(merged.parameters()).dtype == torch.bfloat16
    path = save_merged(merged, tokenizer, report, tmp_path / "merged", source="tiny")

    manifest = read_json(path / "rora.json")
    assert manifest["report"]["method"] == "rora" and manifest["report"]["max_abs_diff"] <= 1e-4
    assert manifest["source"]["adapter"] == str(tmp_path / "adapter") and manifest["source"]["model"] == "tiny"
    assert manifest["config"] == MergeConfig(dtype="bfloat16").to_dict()
    reloaded, _ = load_model(path, dtype="bfloat16")
    assert torch.equal(logits_on(reloaded, probe_inputs(384)), logits_on(merged, probe_inputs(384)))
    assert (logits_on(reloaded, probe_inputs(384)) - adapter_logits).abs().max() < 0.2  # bf16 rounding only


def test_merge_into_nonuniform_model(tiny_nonuniform, tmp_path, tokenizer):
    peft_model = with_adapter(tiny_nonuniform, "lora")
    adapter_logits = logits_on(peft_model, probe_inputs(384))
    merged, report = merge(peft_model)
    assert report.max_abs_diff <= 1e-4
    path = save_merged(merged, tokenizer, report, tmp_path / "merged")
    reloaded, _ = load_model(path)
    assert (logits_on(reloaded, probe_inputs(384)) - adapter_logits).abs().max() <= 1e-4


def test_failed_verification_raises(monkeypatch):
    original = LoraModel.merge_and_unload

    def corrupting(self, *args, **kwargs):
        model = original(self, *args, **kwargs)
        with torch.no_grad():
            model.model.layers[0].mlp.down_proj.weight.add_(0.01)
        return model

    monkeypatch.setattr(LoraModel, "merge_and_unload", corrupting)
    with pytest.raises(MergeError, match="above the tolerance"):
        merge(with_adapter(make_model("llama", heads=4, kv_heads=2)))


def test_adapter_that_does_not_fit_names_the_module(tmp_path, tiny_nonuniform):
    with_adapter(make_model("llama", heads=4, kv_heads=2)).save_pretrained(tmp_path / "gqa")
    with pytest.raises(MergeError, match=r"fit the model: model\.layers\.0\.\S+ is \d+x\d+ but the adapter's lora_\w+ has shape"):
        check_fit(tiny_nonuniform, tmp_path / "gqa")
    with_adapter(make_model("llama", layers=3, heads=4, kv_heads=2)).save_pretrained(tmp_path / "deep")
    with pytest.raises(MergeError, match=r"adapts model\.layers\.2\..*which the model lacks"):
        merge(make_model("llama", heads=4, kv_heads=2), tmp_path / "deep")


# --- CLI ---------------------------------------------------------------------------------------------------------

def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture
def model_and_adapter(tmp_path, tokenizer):
    save_model_dir(make_model("llama", heads=4, kv_heads=2), tokenizer, tmp_path / "base")
    with_adapter(make_model("llama", heads=4, kv_heads=2), "dora").save_pretrained(tmp_path / "adapter")
    return tmp_path / "base", tmp_path / "adapter"


def test_cli_merge(tmp_path, model_and_adapter):
    base, adapter = model_and_adapter
    result = run("merge", base, "--adapter", adapter, "--out", tmp_path / "merged", "--dtype", "float16")
    assert result.exit_code == 0, result.output
    assert "dora rank 4 alpha 8 (scale 2)" in result.output and "max logit diff" in result.output
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["dtype"] == "float16"


def test_cli_merge_bad_inputs_exit_2_write_nothing(tmp_path, model_and_adapter, monkeypatch):
    base, adapter = model_and_adapter
    with_adapter(make_model("llama", layers=3, heads=4, kv_heads=2)).save_pretrained(tmp_path / "deep")
    (tmp_path / "exists").mkdir()
    cases = [
        (["--adapter", tmp_path / "deep", "--out", tmp_path / "o1"], "which the model lacks"),
        (["--adapter", tmp_path / "base", "--out", tmp_path / "o2"], "not a PEFT adapter"),
        (["--adapter", adapter, "--out", tmp_path / "exists"], "--overwrite"),
        (["--adapter", adapter, "--out", tmp_path / "o3", "--dtype", "int8"], "merge.dtype"),
    ]
    for args, message in cases:
        before = sorted(p.name for p in tmp_path.iterdir())
        result = run("merge", base, *args)
        assert result.exit_code == 2, result.output
        errors = [line for line in result.output.splitlines() if line.startswith("rora: error:")]
        assert len(errors) == 1 and message in errors[0] and "Traceback" not in result.output, result.output
        assert sorted(p.name for p in tmp_path.iterdir()) == before  # no output, no temporary left behind
    assert not any((tmp_path / "exists").iterdir())

    original = LoraModel.merge_and_unload

    def corrupting(self, *args, **kwargs):
        model = original(self, *args, **kwargs)
        with torch.no_grad():
            model.model.layers[1].self_attn.o_proj.weight.mul_(1.5)
        return model

    monkeypatch.setattr(LoraModel, "merge_and_unload", corrupting)
    before = sorted(p.name for p in tmp_path.iterdir())
    result = run("merge", base, "--adapter", adapter, "--out", tmp_path / "o4")
    assert result.exit_code == 2 and "nothing was written" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_wrong_scale_is_caught_in_float64(monkeypatch):
    """A merge that applies the scale slightly wrong (1e-3 relative) is refused, not written."""
    from peft.tuners.lora.layer import Linear

    peft_model = with_adapter(make_model("llama", heads=4, kv_heads=2), "rora")

    original = Linear.get_delta_weight
    monkeypatch.setattr(Linear, "get_delta_weight", lambda self, adapter: original(self, adapter) * 1.001)
    with pytest.raises(MergeError, match="differs from the adapter model"):
        merge(peft_model)
