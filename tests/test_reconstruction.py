"""Reconstruction: the float64 least-squares solver, and the layer-by-layer refit of a tiny pruned model against
its unpruned teacher (each projection's held-out error, each layer's output, the KL on held-out text)."""
from __future__ import annotations

import copy

import pytest
import torch

from conftest import make_model
from rora.architecture import add_output_biases, decoder_layers, keep_units, layer_shapes, sync_config
from rora.config import ReconstructConfig
from rora.errors import ConfigError
from rora.measure import heldout_metrics
from rora.reconstruction.reconstruct import _attention, _layer_inputs, _mlp, reconstruct
from rora.reconstruction.solve import LinearStats, bias_only, candidates, lstsq


def _stats(x, y):
    s = LinearStats(x.shape[1], y.shape[1])
    s.add(x, y)
    return s


def test_lstsq_in_float64_reproduces_a_known_linear_map_exactly():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(500, 12, generator=gen, dtype=torch.float64)
    w, b = torch.randn(7, 12, generator=gen, dtype=torch.float64), torch.randn(7, generator=gen, dtype=torch.float64)
    stats = _stats(x, x @ w.T + b)
    # Statistics added in two batches equal those added at once.
    halves = _stats(x[:200], (x @ w.T + b)[:200]) + _stats(x[200:], (x @ w.T + b)[200:])
    assert torch.allclose(halves.gram, stats.gram) and halves.n == 500
    got_w, got_b = lstsq(stats, torch.zeros(7, 12), torch.zeros(7), damping=1e-14)
    assert torch.allclose(got_w, w, atol=1e-9) and torch.allclose(got_b, b, atol=1e-9)
    assert abs(stats.sse(got_w, got_b)) < 1e-12 * float(stats.yy)  # zero, up to cancellation in the closed form


def test_sse_in_closed_form_equals_the_direct_sum():
    gen = torch.Generator().manual_seed(1)
    x, y = (torch.randn(64, d, generator=gen, dtype=torch.float64) for d in (5, 3))
    w, b = torch.randn(3, 5, generator=gen), torch.randn(3, generator=gen)
    direct = ((y - x @ w.double().T - b.double()) ** 2).sum()
    assert _stats(x, y).sse(w, b) == pytest.approx(float(direct), rel=1e-10)


def test_float32_batches_sum_into_float64_totals_to_float32_precision():
    """A model's float32 activations: each batch's products in float32, the totals in float64 (4x faster than float64
    products on a CPU). Over many batches the totals keep float32's relative precision; they do not drift."""
    gen = torch.Generator().manual_seed(2)
    x, y = torch.randn(64, 1024, 40, generator=gen) + 3.0, torch.randn(64, 1024, 6, generator=gen)
    exact, fast = LinearStats(40, 6), LinearStats(40, 6)
    for xb, yb in zip(x, y):
        exact.add(xb.double(), yb.double())
        fast.add(xb, yb)
    assert fast.gram.dtype == torch.float64 and fast.n == exact.n == 64 * 1024
    for name in ("gram", "sum_x", "cross", "sum_y", "yy"):
        a, b = getattr(fast, name), getattr(exact, name)
        assert float((a - b).abs().max()) <= 1e-5 * float(b.abs().max()), name


def test_damping_pulls_toward_the_old_weights_and_the_bias_is_the_mean_residual():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(40, 6, generator=gen, dtype=torch.float64)
    y = torch.randn(40, 2, generator=gen, dtype=torch.float64)
    old = torch.randn(2, 6, generator=gen, dtype=torch.float64)
    stats = _stats(x, y)
    far, _ = lstsq(stats, old, torch.zeros(2), damping=1e9)
    assert torch.allclose(far, old, atol=1e-6)  # infinite damping keeps the weights
    assert torch.allclose(bias_only(stats, old), (y - x @ old.T).mean(0))
    # the bias-only fit is the best bias for fixed weights: any other bias has a larger error
    b = bias_only(stats, old)
    assert stats.sse(old, b) < stats.sse(old, b + 0.01)
    names = [(c.rule, c.damping) for c in candidates(stats, old, torch.zeros(2), ("bias", "lstsq"), (0.1, 1.0), True)]
    assert names == [("unchanged", None), ("bias", None), ("lstsq", 0.1), ("lstsq", 1.0)]


def test_a_singular_gram_matrix_still_solves():
    x = torch.ones(30, 4, dtype=torch.float64)  # every input column identical: rank one
    y = 3 * x[:, :2]
    w, b = lstsq(_stats(x, y), torch.zeros(2, 4), torch.zeros(2), damping=0.0)
    assert torch.isfinite(w).all() and _stats(x, y).sse(w, b) == pytest.approx(0.0, abs=1e-8)


# ---- the layer walk on a tiny model -------------------------------------------------------------------------------
def _pruned_pair(seed: int = 0):
    teacher = make_model("llama", layers=3, heads=4, kv_heads=2, intermediate=96, seed=seed)
    student = copy.deepcopy(teacher)
    for layer in decoder_layers(student):
        keep_units(layer, student.config, keep_q=[0, 2], keep_kv=[0, 1], keep_channels=list(range(0, 96, 2)))
    sync_config(student.config, layer_shapes(student))
    return student, teacher


def _ids(n: int, length: int = 24, seed: int = 0):
    return torch.randint(3, 384, (n, length), generator=torch.Generator().manual_seed(seed))


def _layer_outputs(model, ids):
    """Each decoder layer's output on `ids`."""
    outs = []
    handles = [layer.register_forward_hook(lambda m, a, o: outs.append(o[0] if isinstance(o, tuple) else o))
               for layer in decoder_layers(model)]
    with torch.no_grad():
        model(input_ids=ids)
    for h in handles:
        h.remove()
    return outs


def test_the_sublayer_calls_compose_to_the_decoder_layer(tiny_gqa):
    ids = _ids(2)
    x, kw = _layer_inputs(tiny_gqa, ids)
    layer = decoder_layers(tiny_gqa)[0]
    with torch.no_grad():
        r = x + _attention(layer, x, kw)
        assert torch.allclose(r + _mlp(layer, r), layer(x, **kw), atol=1e-6)


def test_output_biases_keep_the_function(tiny_llama):
    ids = _ids(2)
    with torch.no_grad():
        before = tiny_llama(input_ids=ids).logits
        assert add_output_biases(tiny_llama) and tiny_llama.config.attention_bias and tiny_llama.config.mlp_bias
        assert torch.equal(tiny_llama(input_ids=ids).logits, before)


def test_reconstruction_lowers_each_layers_error_and_the_heldout_kl(tokenizer, one_thread):
    student, teacher = _pruned_pair()
    calib, held = _ids(40, seed=1), _ids(8, seed=2)
    errors_before = [(a - b).pow(2).mean() for a, b in zip(_layer_outputs(student, held), _layer_outputs(teacher, held))]
    kl_before = heldout_metrics(student, teacher, tokenizer, held.tolist())["kl"]
    own_before = heldout_metrics(student, teacher, tokenizer, calib[32:].tolist())  # the 8 held-out calibration rows
    cfg = ReconstructConfig(method="lstsq", num_samples=32, holdout_samples=8, batch_size=5)
    report = reconstruct(student, teacher, tokenizer, cfg, sequences=calib, progress=False)
    # The report's held-out figures (from the states the walk left, no model run again) are heldout_metrics' own.
    own_after = heldout_metrics(student, teacher, tokenizer, calib[32:].tolist())
    for got, want in ((report.heldout_before, own_before), (report.heldout_after, own_after)):
        assert got["tokens"] == want["tokens"] == 8 * 23
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5) and got["kl"] == pytest.approx(want["kl"], rel=1e-4)
    errors_after = [(a - b).pow(2).mean() for a, b in zip(_layer_outputs(student, held), _layer_outputs(teacher, held))]
    kl_after = heldout_metrics(student, teacher, tokenizer, held.tolist())["kl"]
    assert all(a < b for a, b in zip(errors_after, errors_before)), (errors_before, errors_after)
    assert kl_after < 0.8 * kl_before
    assert len(report.projections) == 6 and all(p["error_after"] <= p["error_before"] for p in report.projections)
    assert report.heldout_after["kl"] < report.heldout_before["kl"] and report.biases_added
    assert "lstsq" in {p["rule"] for p in report.projections}
    assert report.calibration == {"source": "given", "sequences": 40, "fit_tokens": 32 * 24, "holdout_tokens": 8 * 24}


def test_bfloat16_forward_passes_refit_as_float32_does_and_the_stream_sees_each_refit(tokenizer, one_thread):
    """reconstruct.precision bfloat16 runs the forward passes under bfloat16 autocast (a CPU too): the refitted
    weights move by bfloat16's rounding only, the report's held-out figures are the refitted model's (autocast's
    cached bfloat16 weights must not outlive a refit), and auto is float32 exactly on a CPU."""
    calib = _ids(40, seed=1)
    runs = {}
    for precision in ("float32", "bfloat16", "auto"):
        student, teacher = _pruned_pair()
        cfg = ReconstructConfig(method="lstsq", num_samples=32, holdout_samples=8, batch_size=5, precision=precision)
        report = reconstruct(student, teacher, tokenizer, cfg, sequences=calib, progress=False)
        weights = torch.cat([p.detach().flatten() for n, p in student.named_parameters() if "o_proj" in n or "down" in n])
        measured = heldout_metrics(student, teacher, tokenizer, calib[32:].tolist())
        runs[precision] = (weights, report, measured)
    (w32, r32, _), (w16, r16, m16), (wauto, _, _) = runs["float32"], runs["bfloat16"], runs["auto"]
    assert torch.equal(wauto, w32)
    assert not torch.equal(w16, w32) and (w16 - w32).norm() < 0.05 * w32.norm()
    assert r16.heldout_after["kl"] < 0.8 * r16.heldout_before["kl"]
    assert r16.heldout_after["kl"] == pytest.approx(m16["kl"], rel=0.05)
    assert r16.heldout_after["kl"] == pytest.approx(r32.heldout_after["kl"], rel=0.05)


def test_the_bias_method_zeroes_the_mean_residual_and_keeps_the_weights(tokenizer, one_thread):
    student, teacher = _pruned_pair()
    calib = _ids(40, seed=1)
    weights = {k: v.clone() for k, v in student.state_dict().items()}
    report = reconstruct(student, teacher, tokenizer, ReconstructConfig(method="bias", num_samples=32, holdout_samples=8),
                         sequences=calib, progress=False)
    assert all(torch.equal(student.state_dict()[k], v) for k, v in weights.items())  # only biases changed
    first = report.projections[0]
    assert (first["layer"], first["module"], first["rule"]) == (0, "o_proj", "bias")
    # layer 0's o_proj sees inputs no refit changed: its residual to the teacher now averages zero over the tokens it
    # was fitted on (the first 32 sequences; the 8 held out only chose the rule)
    xs, kws = _layer_inputs(student, calib[:32])
    xt, kwt = _layer_inputs(teacher, calib[:32])
    ls, lt = decoder_layers(student)[0], decoder_layers(teacher)[0]
    with torch.no_grad():
        gap = (xt + _attention(lt, xt, kwt)) - (xs + _attention(ls, xs, kws))
    assert gap.reshape(-1, gap.shape[-1]).mean(0).abs().max() < 1e-5
    assert {p["rule"] for p in report.projections} <= {"unchanged", "bias"}


def test_an_unpruned_model_reconstructs_to_itself(tokenizer, one_thread):
    teacher = make_model("llama", layers=2, heads=4, kv_heads=2, seed=3)
    student = copy.deepcopy(teacher)
    reconstruct(student, teacher, tokenizer, ReconstructConfig(num_samples=16, holdout_samples=4), sequences=_ids(20),
                progress=False)
    ids = _ids(2, seed=9)
    with torch.no_grad():
        assert torch.allclose(student(input_ids=ids).logits, teacher(input_ids=ids).logits, atol=1e-4)


@pytest.mark.parametrize("change, message", [
    (lambda s, t: make_model("llama", layers=2, heads=4, kv_heads=2), "layer count"),
    (lambda s, t: make_model("llama", layers=3, hidden=32, heads=4, kv_heads=2), "hidden size"),
    (lambda s, t: make_model("llama", layers=3, heads=4, kv_heads=2, vocab=300), "vocabulary"),
    (lambda s, t: s, "separate model"),
    (lambda s, t: None, "needs the unpruned model"),
])
def test_a_teacher_that_does_not_fit_is_refused(tokenizer, change, message):
    student, teacher = _pruned_pair()
    with pytest.raises(ConfigError, match=message):
        reconstruct(student, change(student, teacher), tokenizer, ReconstructConfig(), sequences=_ids(20),
                    progress=False)


def test_bias_method_on_an_architecture_without_output_biases_is_refused(tokenizer):
    teacher = make_model("mistral", layers=2, heads=4, kv_heads=2)
    with pytest.raises(ConfigError, match="no output bias"):
        reconstruct(copy.deepcopy(teacher), teacher, tokenizer, ReconstructConfig(method="bias", num_samples=16,
                    holdout_samples=4), sequences=_ids(20), progress=False)


def test_lstsq_on_mistral_refits_weights_only(tokenizer, one_thread):
    teacher = make_model("mistral", layers=2, heads=4, kv_heads=2)
    student = copy.deepcopy(teacher)
    for layer in decoder_layers(student):
        keep_units(layer, student.config, keep_q=[0, 2], keep_kv=[0, 1], keep_channels=list(range(0, 96, 2)))
    sync_config(student.config, layer_shapes(student))
    report = reconstruct(student, teacher, tokenizer, ReconstructConfig(num_samples=24, holdout_samples=8),
                         sequences=_ids(32), progress=False)
    assert not report.biases_added and all(decoder_layers(student)[0].self_attn.o_proj.bias is None for _ in [0])
    assert report.heldout_after["kl"] < report.heldout_before["kl"]


@pytest.mark.parametrize("ids, message", [
    (torch.zeros(20, 1, dtype=torch.long), "seq_len >= 2"),
    (torch.zeros(16, 8, dtype=torch.long), "leave none to fit"),
    (torch.full((20, 8), 9999), r"must lie in \[0, 384\)"),
])
def test_bad_calibration_sequences_are_one_clear_error(tokenizer, ids, message):
    student, teacher = _pruned_pair()
    with pytest.raises(ConfigError, match=message):
        reconstruct(student, teacher, tokenizer, ReconstructConfig(num_samples=8, holdout_samples=16), sequences=ids,
                    progress=False)


# ---- the command line, and the stage's output through merge and export -------------------------------------------
@pytest.fixture(scope="module")
def cli_world(tmp_path_factory):
    """A tiny base model, its 50% prune (made by rora prune), training records, and a wrong teacher."""
    import json

    from click.testing import CliRunner

    from conftest import make_tokenizer
    from rora.artifacts import save_model_dir
    from rora.cli import main

    root = tmp_path_factory.mktemp("reconstruct")
    tok = make_tokenizer()
    save_model_dir(make_model("llama", layers=3, heads=4, kv_heads=2), tok, root / "base")
    save_model_dir(make_model("llama", layers=2, heads=4, kv_heads=2), tok, root / "two_layers")
    records = [{"instruction": f"Is {i} even?", "input": "", "output": f"the correct answer is {i % 2 == 0}"}
               for i in range(40)]
    (root / "train.json").write_text(json.dumps(records))
    done = CliRunner().invoke(main, ["prune", str(root / "base"), "--ratio", "0.5", "--importance", "l2",
                                     "--num-samples", "2", "--out", str(root / "pruned")])
    assert done.exit_code == 0, done.output
    return root


def _cli(*args):
    from click.testing import CliRunner

    from rora.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


SMALL = ("--num-samples", 8, "--holdout-samples", 4, "--seq-len", 32, "--prose", "none")


@pytest.mark.parametrize("calibration", ["teacher", "records"])
def test_rora_reconstruct_writes_a_stage_that_merge_and_export_carry(cli_world, tmp_path, calibration, monkeypatch):
    from rora.artifacts import lineage, read_manifest
    from rora.models import load_model

    monkeypatch.setenv("RORA_CACHE_DIR", str(tmp_path / "cache"))
    w = cli_world
    done = _cli("reconstruct", w / "pruned", "--teacher", w / "base", "--out", tmp_path / "rec", "--calibration",
                calibration, *(("--data", w / "train.json") if calibration == "records" else ()), *SMALL)
    assert done.exit_code == 0, done.output
    assert "held-out KL" in done.output and "saved" in done.output
    manifest = read_manifest(tmp_path / "rec")
    assert manifest.stage == "reconstruct" and manifest.source == {"model": str(w / "pruned"), "teacher": str(w / "base")}
    report = manifest.report
    assert report["heldout_after"]["kl"] < report["heldout_before"]["kl"] and report["calibration"]["fit_tokens"] == 8 * 32
    assert ("training records" in report["calibration"]["source"]) == (calibration == "records")
    model, _ = load_model(tmp_path / "rec")
    assert model.config.attention_bias and model.config.mlp_bias  # the output biases survive the save
    # The next stages take the reconstructed directory: recover, merge the recovery, export to HF and GGUF.
    assert _cli("recover", tmp_path / "rec", "--data", w / "train.json", "--out", tmp_path / "recovery", "--rank", 4,
                "--max-steps", 2, "--batch-size", 4, "--micro-batch-size", 2, "--val-set-size", 4, "--eval-steps", 2,
                "--save-steps", 2, "--warmup-steps", 0).exit_code == 0
    assert _cli("merge", tmp_path / "recovery", "--out", tmp_path / "merged").exit_code == 0
    assert [m.stage for m in lineage(tmp_path / "merged")] == ["merge", "reconstruct", "recover", "prune"]
    for fmt, out in (("hf", tmp_path / "export"), ("gguf", tmp_path / "model.gguf")):
        done = _cli("export", tmp_path / "merged", "--format", fmt, "--out", out)
        assert done.exit_code == 0, done.output
    merged, _ = load_model(tmp_path / "merged")
    ids = _ids(2, seed=5)
    for path in (tmp_path / "export", tmp_path / "model.gguf"):  # rora.load_model reads the GGUF's biases too
        exported, _ = load_model(path)
        with torch.no_grad():
            torch.testing.assert_close(exported(input_ids=ids).logits, merged(input_ids=ids).logits, rtol=0, atol=1e-4)


@pytest.mark.parametrize("args, fragment", [
    ("--teacher {w}/two_layers", "layer count"),
    ("--teacher {w}/base --calibration records", "needs --data"),
    ("--teacher {w}/base --damping x", "comma-separated list of float"),
    ("--teacher {w}/base --method lsq", "did you mean 'lstsq'"),
    ("--teacher {w}/base --calibration {w}/missing.txt", "not found"),
    ("--teacher {w}/base --prose {w}/missing.txt", "not found"),
    ("--teacher {w}/base --num-samples 0", "num_samples must be > 0"),
    ("--teacher {w}/missing", "unknown model"),
])
def test_rora_reconstruct_bad_input_is_one_line_and_writes_nothing(cli_world, tmp_path, args, fragment):
    sizes = "--holdout-samples 4 --seq-len 32" + ("" if "--num-samples" in args else " --num-samples 8")
    done = _cli("reconstruct", cli_world / "pruned", "--out", tmp_path / "rec",
                *f"{args} {sizes}".format(w=cli_world).split())
    assert done.exit_code == 2 and fragment in done.output, done.output
    assert not (tmp_path / "rec").exists()


def test_output_biases_with_a_head_count_llama_refuses_export_compact_and_load_back(tmp_path, tokenizer):
    """3 query heads over hidden size 64 has no LlamaConfig, and MistralConfig (its usual twin) holds no biases: the
    HF export is written compact, for rora.load_model, computing what the model computes."""
    from rora.deployment import export_model
    from rora.models import load_model

    model = make_model("llama", heads=4, kv_heads=4)
    for layer in decoder_layers(model):
        keep_units(layer, model.config, keep_q=[0, 1, 2], keep_kv=[0, 1, 2], keep_channels=list(range(96)))
    sync_config(model.config, layer_shapes(model))
    add_output_biases(model)
    with torch.no_grad():
        decoder_layers(model)[0].mlp.down_proj.bias.fill_(0.1)
    report = export_model(model, tokenizer, {"format": "hf"}, tmp_path / "export")
    loaded, _ = load_model(tmp_path / "export")
    ids = _ids(2)
    assert report.layout == "compact" and loaded.config.mlp_bias
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=1e-5)
