"""reconstruct(): refit a pruned model's remaining weights in closed form so that it follows its unpruned teacher.

For a pruned model and its teacher with the same hidden size and layer count (rora's prunes, LLM-Pruner's, any
width prune), layer by layer in order, on calibration text:
  1. the teacher's layer runs on the teacher's own hidden states and gives its residual stream after attention
     (R_t) and after the MLP (X_t of the next layer);
  2. the pruned layer's attention runs on the pruned model's hidden states X_s (already reconstructed below), and
     o_proj is refitted so that X_s + o_proj(heads) follows R_t;
  3. with the new o_proj, the MLP runs on R_s and down_proj is refitted so that R_s + down_proj(channels) follows
     the teacher's next hidden state.
The targets are the teacher's residual stream itself, so each refit also absorbs the drift the layers below left.
Each refit is a damped least-squares problem over accumulated statistics (solve.py): float64, memory bounded by
the projection's input width squared. Candidates (unchanged, bias only, and least squares at each damping of the
grid) are fitted on the calibration sequences and scored on held-out ones in closed form; the best is kept. The
held-out sequences are never fitted on, so the choice at every layer (and the report) sees text the refits did not:
least squares of a projection's ~d_in x d_out weights on a few thousand tokens overfits, and the damping that
held-out text prefers is what keeps it from doing so (RCPU, arXiv 2510.07782). Time: one pass of the teacher and
one of the pruned model over the calibration tokens (each projection's inputs are kept from that pass and the refitted
projection applied to them), plus the solves; the held-out figures before and after add one pass of the pruned model
over the held-out tokens and the heads (the walk's last hidden states serve for the rest). Memory: the statistics
grow with the projection's input width squared; the hidden states and one projection's inputs of every calibration
token are held in the models' dtype (the inputs in bfloat16 under `precision` bfloat16). The forward passes run at
`config.precision` (bfloat16 autocast: ~1.6x faster matmuls on a CPU with bfloat16 instructions); the residual
streams, the statistics (float32 products, float64 sums), the solves and the refitted projections stay in full
precision.
"""
from __future__ import annotations

import dataclasses
import functools
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..architecture import add_output_biases, can_hold_output_biases, check_supported, decoder_layers
from ..artifacts import save_stage_model
from ..config import ReconstructConfig
from ..errors import ConfigError
from ..measure import decoder_states, metrics_of, text_sums
from ..models import adopt
from ..numerics import matmul_precision
from ..registry import RECONSTRUCT_METHODS
from .solve import LinearStats, candidates

PROJECTIONS = (("self_attn", "o_proj"), ("mlp", "down_proj"))


@dataclass
class ReconstructReport:
    """What reconstruct() did: the rule chosen for every refitted projection with its held-out error before and
    after (mean squared error per hidden unit, on the held-out calibration sequences), and the held-out KL to the
    teacher and whole-text loss before and after, with their token counts."""

    config: dict
    calibration: dict  # source, sequences, tokens (fit and held out)
    projections: list[dict] = field(default_factory=list)
    heldout_before: dict = field(default_factory=dict)
    heldout_after: dict = field(default_factory=dict)
    biases_added: bool = False
    seconds: float = 0.0
    prose: dict = field(default_factory=dict)  # {"before", "after"}: held-out prose figures, when measured

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "error_removed": self.error_removed}

    @property
    def error_removed(self) -> float:
        """Share of the summed held-out output error the refits removed, over every projection."""
        before = sum(p["error_before"] for p in self.projections)
        after = sum(p["error_after"] for p in self.projections)
        return 1.0 - after / before if before > 0 else 0.0


def check_pair(model, teacher) -> None:
    """ConfigError unless `teacher` is a separate Llama-family model with the student's hidden size, layer count
    and vocabulary (a width prune of it)."""
    if teacher is None:
        raise ConfigError("reconstruction needs the unpruned model: pass --teacher SPEC (in Python, teacher=model)")
    if teacher is model:
        raise ConfigError("the teacher must be a separate model (the unpruned one), not the model being reconstructed")
    for m in (model, teacher):
        check_supported(m.config)
    s, t = model.config, teacher.config
    pairs = (("hidden size", s.hidden_size, t.hidden_size), ("layer count", len(decoder_layers(model)),
             len(decoder_layers(teacher))), ("vocabulary", model.get_output_embeddings().weight.shape[0],
             teacher.get_output_embeddings().weight.shape[0]))
    for what, a, b in pairs:
        if a != b:
            raise ConfigError(f"the teacher's {what} ({b}) differs from the pruned model's ({a}): reconstruction "
                              "needs the unpruned model this one was pruned from (a width prune keeps both)")


def reconstruct(model, teacher, tokenizer, config: ReconstructConfig | dict | None = None, *, sequences=None,
                source: str = "given", progress: bool = True) -> ReconstructReport:
    """Refit `model`'s o_proj and down_proj (in place) layer by layer against `teacher` (see the module docstring).

    `sequences`: calibration token ids, a LongTensor [n, seq_len] of n >= 2 sequences; the last
    `config.holdout_samples` are held out to choose each projection's rule and damping. `source` says where they
    came from, for the report. Both models stay where they are (same device expected)."""
    config = ReconstructConfig.coerce(config)
    adopt(model, tokenizer)  # a model pruned elsewhere: its config synced to its weights before they are compared
    check_pair(model, teacher)
    method = RECONSTRUCT_METHODS[config.method]
    fit_bias = config.bias and can_hold_output_biases(model.config)
    if method.needs_bias and not fit_bias:
        why = "reconstruct.bias is false" if not config.bias else f"a {model.config.model_type} model has no output bias"
        raise ConfigError(f"method {config.method!r} fits output biases, but {why}; use --method lstsq")
    ids = _check_sequences(sequences, config, model.get_output_embeddings().weight.shape[0])
    n_fit = ids.shape[0] - config.holdout_samples
    start = time.perf_counter()
    report = ReconstructReport(config.to_dict(), {"source": source, "sequences": int(ids.shape[0]),
                                                 "fit_tokens": int(n_fit * ids.shape[1]),
                                                 "holdout_tokens": int((ids.shape[0] - n_fit) * ids.shape[1])})
    modes = [(m, m.training) for m in (model, teacher)]
    try:
        model.eval(), teacher.eval()
        with torch.no_grad():
            batches = [_Batch(part[s : s + config.batch_size], model, teacher, held)  # none straddles the split
                       for part, held in ((ids[:n_fit], False), (ids[n_fit:], True))
                       for s in range(0, part.shape[0], config.batch_size)]
            held = [b for b in batches if b.held]
            cast = functools.partial(matmul_precision, model.device, config.precision)
            with cast():
                pruned_states = [decoder_states(model, b.ids) for b in held]
            if fit_bias:
                report.biases_added = add_output_biases(model)
            _walk(model, teacher, batches, config, method.rules, fit_bias, report, progress, cast)
            # The walk leaves both models' last hidden states in every batch: the held-out figures before and after
            # need no model to run again, only the final norms and the heads.
            states = [model.get_decoder().norm(b.x_s) for b in held]
            report.heldout_before, report.heldout_after = (_heldout(model, teacher, held, s)
                                                           for s in (pruned_states, states))
    finally:
        for m, was in modes:
            m.train(was)
    report.seconds = time.perf_counter() - start
    return report


def _check_sequences(sequences, config: ReconstructConfig, vocab: int) -> torch.Tensor:
    if sequences is None:
        raise ConfigError("no calibration sequences given")
    ids = torch.as_tensor(sequences, dtype=torch.long)
    if ids.dim() != 2 or ids.shape[1] < 2:
        raise ConfigError(f"calibration sequences must be [n, seq_len >= 2] token ids, got shape {tuple(ids.shape)}")
    if ids.shape[0] <= config.holdout_samples:
        raise ConfigError(f"{ids.shape[0]} calibration sequences leave none to fit on after holdout_samples "
                          f"({config.holdout_samples}); give more text or lower --holdout-samples")
    if int(ids.min()) < 0 or int(ids.max()) >= vocab:
        raise ConfigError(f"calibration token ids must lie in [0, {vocab}), got {int(ids.min())}..{int(ids.max())}")
    return ids


class _Batch:
    """One calibration batch on its way up: its token ids, the pruned model's hidden states, the teacher's, and each
    model's per-layer keyword arguments (causal mask, rotary embeddings) as its decoder passes them."""

    def __init__(self, ids: torch.Tensor, model, teacher, held: bool):
        self.ids, self.held = ids.to(model.device), held
        self.x_s, self.kw_s = _layer_inputs(model, ids)
        self.x_t, self.kw_t = _layer_inputs(teacher, ids)


class _Stop(Exception):
    pass


def _layer_inputs(model, ids: torch.Tensor):
    """The hidden states and keyword arguments the decoder hands its first layer, caught by a pre-hook."""
    caught = {}

    def catch(module, args, kwargs):
        caught["x"] = args[0] if args else kwargs["hidden_states"]
        caught["kw"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        raise _Stop

    handle = decoder_layers(model)[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        model.get_decoder()(input_ids=ids.to(model.device), use_cache=False)
    except _Stop:
        pass
    finally:
        handle.remove()
    return caught["x"], caught["kw"]


def _attention(layer, x, kw):
    """The attention branch of a Llama-family decoder layer (what it adds to the residual stream)."""
    return layer.self_attn(hidden_states=layer.input_layernorm(x), position_embeddings=kw.get("position_embeddings"),
                           attention_mask=kw.get("attention_mask"), position_ids=kw.get("position_ids"))[0]


def _mlp(layer, r):
    return layer.mlp(layer.post_attention_layernorm(r))


def _inputs_of(linear: nn.Linear, run):
    """`run()`'s result and the input `linear` saw during it."""
    seen = {}
    handle = linear.register_forward_pre_hook(lambda m, args: seen.__setitem__("x", args[0]))
    try:
        out = run()
    finally:
        handle.remove()
    return out, seen["x"]


def _heldout(model, teacher, held: list[_Batch], states) -> dict:
    """Held-out loss, perplexity, KL to the teacher and tokens of the model whose last decoder states on the `held`
    batches are `states`, against the teacher's, which the walk left in each batch."""
    norm = teacher.get_decoder().norm
    sums = sum(text_sums(model, teacher, h, b.ids, torch.full((b.ids.shape[0],), b.ids.shape[1], device=h.device),
                         ref_hidden=norm(b.x_t)) for b, h in zip(held, states))
    return metrics_of(sums, with_kl=True)


def _walk(model, teacher, batches, config, rules, fit_bias, report, progress, cast) -> None:
    """`cast()`: the context of each forward pass (numerics.matmul_precision), entered afresh after every refit: under
    autocast a projection's bfloat16 copy of its weights would outlive the refit while its context stays open."""
    from tqdm.auto import tqdm

    layers_s, layers_t = decoder_layers(model), decoder_layers(teacher)
    for index in tqdm(range(len(layers_s)), desc="reconstruct", unit="layer", disable=not progress):
        ls, lt = layers_s[index], layers_t[index]
        with cast():  # the teacher's targets: its residual stream after attention and after the MLP
            for b in batches:
                b.r_t = b.x_t + _attention(lt, b.x_t, b.kw_t).to(b.x_t.dtype)
                b.x_t = b.r_t + _mlp(lt, b.r_t).to(b.x_t.dtype)
        for (branch, name), run, target in (
            (PROJECTIONS[0], lambda b: _attention(ls, b.x_s, b.kw_s), lambda b: b.r_t),
            (PROJECTIONS[1], lambda b: _mlp(ls, b.r_s), lambda b: b.x_t),
        ):
            linear = getattr(getattr(ls, branch), name)
            residual = (lambda b: b.x_s) if name == "o_proj" else (lambda b: b.r_s)
            # The branch runs once per batch: what the projection reads does not depend on its own weights, so the
            # refitted projection is applied to the inputs kept from that run (one student pass per layer, not two).
            with cast():
                inputs = [_inputs_of(linear, lambda: run(b))[1] for b in batches]
            report.projections.append(
                _refit(linear, batches, inputs, residual, target, rules, config.damping, fit_bias, index, name))
            for b, x in zip(batches, inputs):  # the pruned model's stream with the refitted projection
                out = residual(b) + linear(x.to(linear.weight.dtype)).to(b.x_s.dtype)
                if name == "o_proj":
                    b.r_s = out
                else:
                    b.x_s = out


def _refit(linear: nn.Linear, batches, inputs, residual, target, rules, dampings, fit_bias, index, name) -> dict:
    """Accumulate the projection's statistics (fit and held-out) from each batch's `inputs` to it, choose the rule
    on the held-out sums and write its weights, fitted on the fit sums, into `linear`."""
    d_in, d_out = linear.in_features, linear.out_features
    fit, held = LinearStats(d_in, d_out, linear.weight.device), LinearStats(d_in, d_out, linear.weight.device)
    for b, x in zip(batches, inputs):
        (held if b.held else fit).add(x, target(b) - residual(b))
    bias = linear.bias.detach() if linear.bias is not None else torch.zeros(d_out, device=linear.weight.device)
    weight = linear.weight.detach()
    # Scored on the held-out sums only, and never refitted on them: the held-out sequences stay held out for every
    # layer above (a refit on them would make their hidden states in-sample and bias each later choice toward
    # overfitting), and for the report's before/after figures.
    scored = [(held.sse(c.weight, c.bias), c) for c in candidates(fit, weight, bias, rules, dampings, fit_bias)
              if all(torch.isfinite(t).all() for t in (c.weight, c.bias))]  # a degenerate solve never wins
    before = scored[0][0]  # "unchanged" comes first
    after, best = min(scored, key=lambda sc: sc[0])
    linear.weight.data.copy_(best.weight.to(linear.weight.dtype))
    if linear.bias is not None:
        linear.bias.data.copy_(best.bias.to(linear.bias.dtype))
    per = max(held.n * d_out, 1)
    return {"layer": index, "module": name, "rule": best.rule, "damping": best.damping,
            "error_before": before / per, "error_after": after / per}


def save_reconstructed(model, tokenizer, report: ReconstructReport, out, overwrite: bool = False, source=None,
                       teacher=None) -> Path:
    """Write the reconstructed model and its manifest atomically to `out`; `source` is the pruned model's spec,
    `teacher` the unpruned model's."""
    return save_stage_model(model, tokenizer, out, "reconstruct", {"model": source, "teacher": teacher},
                            report.to_dict(), overwrite, inputs=[source, teacher])
