"""prune(): surgery correctness (ratio 0, mask equivalence, KV cache), importance ranking, ratios, save/reload."""
import copy
import json

import pytest
import torch
from conftest import make_model

from rora.config import PruneConfig
from rora.errors import DataError, PruningError, UnsupportedModelError
from rora.models import load_model
from rora.pruning import importance
from rora.pruning.importance import UNIT_AXIS, _obs_order, obs_mlp_scores, obs_scores, projections, taylor_scores
from rora.artifacts import MANIFEST
from rora.pruning.prune import prune, save_pruned
from rora.architecture import LayerShape, head_dim, is_uniform, layer_shapes

TEXTS = [f"sample {i}: the cat sat on the mat and the answer is true false option{i % 3}" for i in range(12)]


def cfg(**kw):
    kw = {"num_samples": 4, "holdout_samples": 2, "seq_len": 24, **kw}
    return PruneConfig(**kw)


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def masked_copy(original, report):
    """The original model with removed heads' o_proj inputs and removed channels' down_proj inputs zeroed."""
    model = copy.deepcopy(original)
    hd = head_dim(model.config)
    with torch.no_grad():
        for layer, info in zip(model.model.layers, report.layers):
            for h in info["removed_q_heads"]:
                layer.self_attn.o_proj.weight[:, h * hd:(h + 1) * hd] = 0
            layer.mlp.down_proj.weight[:, info["removed_channels"]] = 0
    return model


def test_ratio_zero_leaves_logits_unchanged(tiny_gqa, tokenizer):
    original = copy.deepcopy(tiny_gqa)
    report = prune(tiny_gqa, tokenizer, cfg(ratio=0.0), TEXTS)
    ids = torch.randint(0, 384, (2, 11))
    torch.testing.assert_close(logits(tiny_gqa, ids), logits(original, ids), rtol=0, atol=0)
    assert report.params_after == report.params_before
    assert report.actual == {"q_heads": 0.0, "kv_heads": 0.0, "channels": 0.0, "parameters": 0.0}
    assert report.loss_after == report.loss_before


@pytest.mark.parametrize(
    "heads,kv,gqa,importance",
    [(4, 4, "within-group", "l2"), (4, 2, "within-group", "taylor"), (4, 2, "whole-group", "l1"), (8, 2, "within-group", "random")],
    ids=["mha", "gqa-within", "gqa-whole", "gqa4-within"],
)
def test_mask_equivalence(heads, kv, gqa, importance, tokenizer):
    model = make_model("llama", heads=heads, kv_heads=kv, hidden=64)
    original = copy.deepcopy(model)
    report = prune(model, tokenizer, cfg(ratio=0.5, gqa=gqa, importance=importance), TEXTS)
    assert report.params_after < report.params_before
    ids = torch.randint(0, 384, (2, 13))
    torch.testing.assert_close(logits(model, ids), logits(masked_copy(original, report), ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("gqa", ["within-group", "whole-group"])
def test_mask_equivalence_every_architecture(tiny_any, gqa, tokenizer):
    original = copy.deepcopy(tiny_any)
    report = prune(tiny_any, tokenizer, cfg(ratio=0.5, gqa=gqa, importance="taylor", taylor="element1"), TEXTS)
    expect = LayerShape(2, 1 if gqa == "whole-group" else 2, 48)
    assert layer_shapes(tiny_any) == [expect, expect]
    if tiny_any.config.model_type == "qwen2":  # q/k/v biases are cut with their rows
        assert tiny_any.model.layers[0].self_attn.q_proj.bias.shape == (2 * 16,)
    ids = torch.randint(0, 384, (2, 9))
    torch.testing.assert_close(logits(tiny_any, ids), logits(masked_copy(original, report), ids), rtol=1e-5, atol=1e-5)


def _shrink(model, q_heads=(), kv_heads=(), channels=(), factor=0.01):
    """Scale some units' weights down so that every importance measure ranks them least important."""
    hd = head_dim(model.config)
    with torch.no_grad():
        for layer in model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            for h in q_heads:
                attn.q_proj.weight[h * hd:(h + 1) * hd] *= factor
                attn.o_proj.weight[:, h * hd:(h + 1) * hd] *= factor
            for h in kv_heads:
                attn.k_proj.weight[h * hd:(h + 1) * hd] *= factor
                attn.v_proj.weight[h * hd:(h + 1) * hd] *= factor
            for c in channels:
                mlp.gate_proj.weight[c] *= factor
                mlp.up_proj.weight[c] *= factor
                mlp.down_proj.weight[:, c] *= factor


IMPORTANCES = [("l1", "vectorwise"), ("l2", "vectorwise"), ("taylor", "vectorwise"), ("taylor", "element1"), ("taylor", "element2"),
               ("obs", "vectorwise"), ("obs-mlp", "element1")]


@pytest.mark.parametrize("importance,taylor", IMPORTANCES)
def test_least_important_units_are_removed(importance, taylor, tokenizer):
    model = make_model("llama", heads=4, kv_heads=2)
    _shrink(model, q_heads=[1, 2], channels=[5, 17, 40])
    heads = prune(copy.deepcopy(model), tokenizer, cfg(ratio=0.5, mlp=False, importance=importance, taylor=taylor), TEXTS)
    assert [l["removed_q_heads"] for l in heads.layers] == [[1, 2], [1, 2]]  # one per KV group: heads 0-1, 2-3
    channels = prune(model, tokenizer, cfg(ratio=3 / 96, attention=False, importance=importance, taylor=taylor), TEXTS)
    assert [l["removed_channels"] for l in channels.layers] == [[5, 17, 40], [5, 17, 40]]


@pytest.mark.parametrize("importance", ["l2", "taylor", "obs", "obs-mlp"])
def test_whole_group_removes_least_important_group(importance, tokenizer):
    model = make_model("llama", heads=6, kv_heads=3, hidden=96)
    _shrink(model, q_heads=[2, 3], kv_heads=[1])
    report = prune(model, tokenizer, cfg(ratio=0.3, gqa="whole-group", mlp=False, importance=importance), TEXTS)
    assert [(l["removed_kv_heads"], l["removed_q_heads"]) for l in report.layers] == [([1], [2, 3])] * 2
    assert layer_shapes(model) == [LayerShape(4, 2, 96)] * 2


def _compensated_error(x, w, drop):
    """Output error of removing input columns `drop` of y = x w^T, after refitting the rest and a bias by least
    squares (float64, undamped): what OBS importance estimates."""
    keep = [j for j in range(x.shape[1]) if j not in drop]
    a = torch.cat([x[:, keep], torch.ones(len(x), 1, dtype=x.dtype)], 1)
    y = x @ w.T
    return float(((a @ torch.linalg.lstsq(a, y).solution - y) ** 2).sum())


def test_obs_order_is_greedy_compensated_error(monkeypatch):
    """Each greedy OBS step removes the column whose removal, with the rest and a bias refitted, costs least: a
    constant channel first (the bias makes up for it), then one of two duplicated channels, but not the other (its
    twin is gone), although magnitude ranks all three highest. Undamped, every step is the brute-force cheapest."""
    torch.manual_seed(0)
    x = torch.randn(400, 8, dtype=torch.float64)
    x[:, 0] = 3.0 + 1e-3 * x[:, 0]
    x[:, 2] = x[:, 1] + 1e-3 * x[:, 2]
    w = torch.randn(5, 8, dtype=torch.float64) * torch.tensor([4, 3, 3, 1, 1, 1, 1, 1.0])
    gram = torch.cat([x, torch.ones(400, 1, dtype=x.dtype)], 1)
    gram = gram.T @ gram
    order = _obs_order(w, gram, 1).long()
    assert order[0] == 0 and sorted(order[1:3].tolist())[0] == 1 and sorted(order[1:3].tolist())[1] > 2  # see above
    monkeypatch.setattr(importance, "_OBS_DAMPING", 1e-12)
    order, removed = _obs_order(w, gram, 1).long(), []
    for step in range(7):
        first = int((order == step).nonzero())
        costs = {j: _compensated_error(x, w, removed + [j]) for j in range(8) if j not in removed}
        assert costs[first] <= min(costs.values()) * (1 + 1e-6) + 1e-9, (step, costs)
        removed.append(first)


def test_obs_mlp_takes_heads_from_taylor_and_channels_from_obs(tokenizer, monkeypatch):
    """Heads: Taylor on the first _HEAD_SAMPLES samples only; channels: obs on all of them."""
    monkeypatch.setattr(importance, "_HEAD_SAMPLES", 2)
    model = make_model("llama", layers=2, heads=4, kv_heads=2)
    samples = [tokenizer(t, return_tensors="pt").input_ids for t in TEXTS[:4]]
    mixed = obs_mlp_scores(model, [0, 1], samples, "element1")
    taylor, obs = taylor_scores(model, [0, 1], samples[:2], "element1"), obs_scores(model, [0, 1], samples)
    assert not torch.equal(taylor[0].q_heads, taylor_scores(model, [0], samples, "element1")[0].q_heads)  # 2 != 4
    for i in (0, 1):
        assert torch.equal(mixed[i].q_heads, taylor[i].q_heads) and torch.equal(mixed[i].kv_heads, taylor[i].kv_heads)
        assert torch.equal(mixed[i].channels, obs[i].channels)
        assert not torch.equal(obs[i].channels, taylor[i].channels.argsort().argsort().float())  # two real rankings


def test_obs_on_a_prune_that_keeps_every_head_ranks_the_channels_alone(tokenizer):
    """attention: false: obs gathers no o_proj statistics; the channel order is the one obs gives with the heads."""
    model = make_model("llama", layers=2, heads=4, kv_heads=2)
    samples = [tokenizer(t, return_tensors="pt").input_ids for t in TEXTS[:4]]
    full, mlp_only = obs_scores(model, [0, 1], samples), importance.SCORERS["obs"](
        model, [0, 1], samples, cfg(importance="obs", attention=False))
    for i in (0, 1):
        assert torch.equal(mlp_only[i].channels, full[i].channels) and not torch.equal(full[i].q_heads, torch.zeros(4))
        assert torch.equal(mlp_only[i].q_heads, torch.zeros(4)) and torch.equal(mlp_only[i].kv_heads, torch.zeros(2))


def test_taylor_scores_match_autograd_reference(tokenizer):
    """Per-unit Taylor scores equal a direct computation from per-sample gradients (all three variants)."""
    model = make_model("llama", layers=1, heads=4, kv_heads=2)
    samples = [torch.randint(3, 384, (1, n)) for n in (7, 9, 5)]
    names = list(UNIT_AXIS)
    weights = [getattr(projections(model.model.layers[0])[n], "weight") for n in names]
    per_sample = [torch.autograd.grad(model(input_ids=s, labels=s).loss, weights) for s in samples]
    g = {n: sum(ps[k] for ps in per_sample) / 3 for k, n in enumerate(names)}
    fisher = {n: sum(ps[k] ** 2 for ps in per_sample) / 3 for k, n in enumerate(names)}
    w = {n: weights[k].detach() for k, n in enumerate(names)}
    other = {n: 1 - UNIT_AXIS[n] for n in names}
    expected = {
        "vectorwise": {n: (w[n] * g[n]).sum(other[n]).abs() for n in names},
        "element1": {n: (w[n] * g[n]).abs().sum(other[n]) for n in names},
        "element2": {n: (w[n] * g[n] - 0.5 * w[n] * fisher[n] * w[n]).abs().sum(other[n]) for n in names},
    }
    for variant, pc in expected.items():
        got = taylor_scores(model, [0], samples, variant)[0]
        torch.testing.assert_close(got.q_heads, (pc["q_proj"] + pc["o_proj"]).view(4, 16).sum(1), rtol=1e-4, atol=1e-9)
        torch.testing.assert_close(got.kv_heads, (pc["k_proj"] + pc["v_proj"]).view(2, 16).sum(1), rtol=1e-4, atol=1e-9)
        torch.testing.assert_close(got.channels, pc["gate_proj"] + pc["up_proj"] + pc["down_proj"], rtol=1e-4, atol=1e-9)
    # The model is left as it was: no gradients kept, requires_grad restored.
    assert all(p.grad is None and p.requires_grad for p in model.parameters())


def test_ratios_round_half_up_and_are_reported(tokenizer):
    model = make_model("llama", heads=6, kv_heads=2, hidden=96)  # group size 3, like SmolLM2's 9 over 3
    report = prune(model, tokenizer, cfg(ratio=0.3, importance="l2"), TEXTS)
    # round(0.3 * 3) = 1 head per group -> 2 of 6; round(0.3 * 96) = round(28.8) = 29 channels.
    assert layer_shapes(model) == [LayerShape(4, 2, 67)] * 2
    assert report.actual["q_heads"] == pytest.approx(2 / 6, abs=1e-6) and report.actual["kv_heads"] == 0.0
    assert report.actual["channels"] == pytest.approx(29 / 96, abs=1e-6)
    assert report.params_after == sum(p.numel() for p in model.parameters())
    assert report.actual["parameters"] == pytest.approx(1 - report.params_after / report.params_before, abs=1e-6)
    assert report.requested_ratio == 0.3 and report.seed == 42 and report.importance == "l2"
    assert report.loss_before > 0 and report.loss_after > 0
    assert report.perplexity_after == pytest.approx(torch.tensor(report.loss_after).exp().item(), rel=1e-6)


def test_mlp_ratio_prunes_channels_at_their_own_fraction(tmp_path, tokenizer):
    """Heads at ratio, channels at mlp_ratio; the report, the manifest and `rora prune`'s first line say so."""
    from click.testing import CliRunner

    from rora.artifacts import save_model_dir
    from rora.cli import main

    model = make_model("llama", heads=6, kv_heads=2, hidden=96)
    report = prune(model, tokenizer, cfg(ratio=0.7, mlp_ratio=0.1, importance="l2"), TEXTS)
    # round(0.7 * 3) = 2 heads per group -> 4 of 6; round(0.1 * 96) = 10 channels.
    assert layer_shapes(model) == [LayerShape(2, 2, 86)] * 2
    assert report.actual["q_heads"] == pytest.approx(4 / 6, abs=1e-6)
    assert report.actual["channels"] == pytest.approx(10 / 96, abs=1e-6)
    heads_only = make_model("llama", heads=6, kv_heads=2, hidden=96)
    prune(heads_only, tokenizer, cfg(ratio=0.7, mlp_ratio=0.0, importance="l2"), TEXTS)
    assert layer_shapes(heads_only) == [LayerShape(2, 2, 96)] * 2

    save_model_dir(make_model("llama", heads=6, kv_heads=2, hidden=96), tokenizer, tmp_path / "m")
    result = CliRunner().invoke(main, ["prune", str(tmp_path / "m"), "--out", str(tmp_path / "p"), "--ratio", "0.4",
                                       "--mlp-ratio", "0.25", "--importance", "l2"])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("pruned         l2 importance, ratio 0.4 (MLP channels 0.25), layers 0-1")
    manifest = json.loads((tmp_path / "p" / "rora.json").read_text())
    assert manifest["config"]["mlp_ratio"] == 0.25 and manifest["report"]["layers"][0]["intermediate"] == 72


def test_random_importance_is_seeded(tokenizer):
    runs = [prune(make_model("llama"), tokenizer, cfg(ratio=0.5, importance="random", seed=s), TEXTS) for s in (1, 1, 2)]
    assert runs[0].layers == runs[1].layers
    assert runs[0].layers != runs[2].layers


def test_pruned_model_generates_with_kv_cache(tiny_gqa, tokenizer):
    prune(tiny_gqa, tokenizer, cfg(ratio=0.5, importance="l2"), TEXTS)
    ids = torch.randint(3, 384, (1, 6))
    cached = tiny_gqa.generate(ids, max_new_tokens=8, do_sample=False, use_cache=True)
    uncached = tiny_gqa.generate(ids, max_new_tokens=8, do_sample=False, use_cache=False)
    assert cached.shape == (1, 14) and torch.equal(cached, uncached)


def test_uniform_output_loads_with_plain_transformers(tmp_path, tiny_any, tokenizer):
    from transformers import AutoModelForCausalLM

    report = prune(tiny_any, tokenizer, cfg(ratio=0.5, importance="l2"), TEXTS)
    out = save_pruned(tiny_any, tokenizer, report, tmp_path / "p", source="tiny")
    loaded = AutoModelForCausalLM.from_pretrained(out)
    config = json.loads((out / "config.json").read_text())
    assert "rora_layer_shapes" not in config
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["intermediate_size"]) == (2, 2, 48)
    assert layer_shapes(loaded) == layer_shapes(tiny_any)
    ids = torch.randint(0, 384, (1, 8))
    torch.testing.assert_close(logits(loaded, ids), logits(tiny_any, ids), rtol=0, atol=0)
    manifest = json.loads((out / MANIFEST).read_text())
    record = manifest["report"]
    assert manifest["source"]["model"] == "tiny" and manifest["config"]["ratio"] == 0.5 and record["importance"] == "l2"
    assert record["layers"][0]["q_heads"] == 2 and record["params_after"] == report.params_after
    assert record["loss_before"] == report.loss_before and "provenance" in manifest
    assert sorted(p.name for p in out.glob("*.safetensors")) and not list(out.glob("*.bin"))


def test_layer_range_round_trips_through_load_model(tmp_path, tokenizer):
    model = make_model("llama", layers=3, heads=4, kv_heads=2)
    report = prune(model, tokenizer, cfg(ratio=0.5, layers="1:3", importance="taylor"), TEXTS)
    assert report.pruned_layers == [1, 2]
    assert layer_shapes(model) == [LayerShape(4, 2, 96), LayerShape(2, 2, 48), LayerShape(2, 2, 48)]
    assert report.layers[0]["removed_q_heads"] == [] and not is_uniform(layer_shapes(model))
    out = save_pruned(model, tokenizer, report, tmp_path / "p")
    loaded, _ = load_model(out)
    assert layer_shapes(loaded) == layer_shapes(model)
    ids = torch.randint(0, 384, (2, 8))
    torch.testing.assert_close(logits(loaded, ids), logits(model, ids), rtol=0, atol=0)


@pytest.mark.parametrize(
    "kw,error,match",
    [
        ({"ratio": 0.9}, PruningError, "all 2 query heads"),
        ({"ratio": 0.75, "gqa": "whole-group"}, PruningError, "all 2 attention head groups"),
        ({"ratio": 0.5, "layers": "1:5"}, PruningError, "outside the model's 2 layers"),
        ({"ratio": 0.2, "num_samples": 20}, DataError, "12 texts"),
    ],
)
def test_bad_requests_change_nothing(kw, error, match, tiny_gqa, tokenizer):
    before = copy.deepcopy(tiny_gqa.state_dict())
    with pytest.raises(error, match=match):
        prune(tiny_gqa, tokenizer, cfg(**kw), TEXTS)
    after = tiny_gqa.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_empty_calibration_is_a_data_error(tiny_gqa, tokenizer):
    with pytest.raises(DataError, match="empty"):
        prune(tiny_gqa, tokenizer, cfg(), [])


def test_unsupported_architecture_is_named(tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=384))
    with pytest.raises(UnsupportedModelError, match="llama, mistral, qwen2"):
        prune(gpt2, tokenizer, cfg(), TEXTS)


@pytest.mark.parametrize("arch,standard", [("llama", False), ("qwen2", True)])
def test_head_count_not_dividing_hidden_size(arch, standard, tmp_path, tokenizer):
    """6 of 8 heads in hidden 64: transformers 5's LlamaConfig refuses it, so the shapes are listed instead."""
    model = make_model(arch, heads=8, kv_heads=8)
    report = prune(model, tokenizer, cfg(ratio=0.25, mlp=False, importance="l2"), TEXTS)
    assert layer_shapes(model) == [LayerShape(6, 6, 96)] * 2
    assert report.standard_config is standard
    out = save_pruned(model, tokenizer, report, tmp_path / "p")
    loaded, _ = load_model(out)
    ids = torch.randint(0, 384, (1, 8))
    torch.testing.assert_close(logits(loaded, ids), logits(model, ids), rtol=0, atol=0)


def test_channel_multiple_keeps_a_multiple_nearest_the_ratio(tokenizer):
    from rora.pruning.prune import removal_counts

    # SmolLM2: 30% of 1536 keeps 1075 (not a multiple of 32, so llama.cpp keeps ffn_down in f16); 1088 is nearest.
    shape = LayerShape(q_heads=9, kv_heads=3, intermediate=1536)
    assert removal_counts(shape, cfg(ratio=0.3), 0)[2] == 461
    assert removal_counts(shape, cfg(ratio=0.3, channel_multiple=32), 0)[2] == 1536 - 1088
    assert removal_counts(shape, cfg(ratio=0.0, channel_multiple=32), 0)[2] == 0  # ratio 0 stays a no-op
    model = make_model(intermediate=96)
    prune(model, tokenizer, cfg(ratio=0.3, channel_multiple=32, importance="l2"), TEXTS)
    assert [s.intermediate for s in layer_shapes(model)] == [64, 64]  # 96 - 29 = 67 kept -> 64
    with pytest.raises(Exception, match="prune.channel_multiple must be > 0"):
        cfg(channel_multiple=0)


def test_obs_on_fewer_tokens_than_down_proj_inputs_warns_in_the_report_and_the_cli(tmp_path, tokenizer):
    """obs's covariance from fewer tokens than down_proj has inputs is mostly damping: the report, `rora prune`
    (stderr) say so (`rora run`: test_reliability); Taylor, and obs on enough text, say nothing."""
    from click.testing import CliRunner

    from rora.artifacts import save_model_dir
    from rora.cli import main
    from rora.pruning.importance import thin_calibration

    model = make_model(layers=2, intermediate=96)
    few, enough = [torch.randint(3, 384, (1, 20))] * 2, [torch.randint(3, 384, (1, 48))] * 2
    warning = thin_calibration(model, [0, 1], few, "obs-mlp")
    assert warning.startswith("obs-mlp importance read 40 calibration tokens, fewer than down_proj's 96 inputs")
    assert thin_calibration(model, [0, 1], enough, "obs") is None and thin_calibration(model, [0, 1], few, "taylor") is None
    assert thin_calibration(model, [], few, "obs") is None  # nothing pruned, nothing ranked
    save_model_dir(make_model(layers=2, intermediate=512), tokenizer, tmp_path / "model")  # 2 paragraphs < 512
    args = ["prune", str(tmp_path / "model"), "--ratio", "0.25", "--importance", "obs", "--num-samples", "2",
            "--prose", "none", "--out"]
    done = CliRunner().invoke(main, [*args, str(tmp_path / "obs")])
    assert done.exit_code == 0, done.output
    said = [line for line in done.stderr.splitlines() if line.startswith("rora: warning: ")]
    assert len(said) == 1 and said[0].startswith("rora: warning: obs importance read ") and "corpus" in said[0]
    manifest = json.loads((tmp_path / "obs" / MANIFEST).read_text())
    assert manifest["report"]["warning"] == said[0].removeprefix("rora: warning: ")
    quiet = CliRunner().invoke(main, [*args[:5], "taylor", *args[6:], str(tmp_path / "taylor")])
    assert quiet.exit_code == 0 and "warning" not in quiet.stderr, quiet.output
