"""Importance scores of the prunable units: query heads, KV heads and MLP channels of each decoder layer.

Every score starts per channel of each projection: a row of q/k/v/gate/up (output channel) or a column of o/down
(input channel). Unit scores sum their channels across the coupled projections (LLM-Pruner's group reduction
"sum"):
  * query head h:   q_proj rows of h + o_proj columns of h   (head_dim channels each)
  * KV head j:      k_proj rows of j + v_proj rows of j
  * MLP channel c:  gate_proj row c + up_proj row c + down_proj column c
Biases are not scored (LLM-Pruner scores weights only); they go with their rows when a unit is removed.

Scorers (a registry, `SCORERS`):
  * l1 / l2: sum of |w|^p over a unit's weights (LLM-Pruner's MagnitudeImportance, no root taken).
  * random: seeded uniform scores per unit (a baseline).
  * obs: reconstruction-aware (structured Optimal Brain Surgeon, as SlimGPT prunes): the output error a unit's removal
    leaves in o_proj / down_proj after the best least-squares compensation of the remaining inputs and an output
    bias, on the unpruned model's own inputs to them. For a group G of input columns of W with H the covariance of
    the inputs (a free bias takes their mean; damped by 1% of its mean diagonal), that error is
    tr(W_G [H^-1]_GG^-1 W_G^T).
    Units are removed greedily, a few at a time (1/64 of them per step), each step updating W and H^-1 as the
    compensation would (so two redundant channels are not both judged spare), and a unit's score is its place in
    that order. It pairs with `rora reconstruct`, which then refits the compensation for real: what it ranks low is
    what a refit can make up for. Query heads are groups of head_dim columns of o_proj, KV heads the columns of all
    their query heads, MLP channels single columns of down_proj; the other projections' rows go with them.
  * obs-mlp: MLP channels by obs, attention heads by Taylor (the `taylor` variant) on the first 8 calibration samples
    (LLM-Pruner's scale: each costs a backward pass). On SmolLM2 obs's choice of heads makes the pruned model loop
    when it writes greedily; this mix keeps most of obs's gain and writes as well as the unpruned model after the
    demo's recovery (README, Prune).
  * taylor: first/second-order Taylor estimates of the loss change when a weight is zeroed, from per-sample
    gradients on the calibration texts, with g the mean gradient over samples and F = mean of g_sample**2 (the
    Fisher approximation of the Hessian diagonal, LLM-Pruner's `acc_grad`):
      vectorwise  per channel |sum(w * g)|          (LLM-Pruner `vectorize`)
      element1    per channel sum |w * g|           (LLM-Pruner `param_first`)
      element2    per channel sum |w*g - 0.5*w*F*w| (LLM-Pruner `param_mix`: first- plus second-order term)

Taylor memory: only the prunable projection weights require grad, one backward per sample, no graph kept. Each
weight's gradient is folded into an fp32 accumulator by a post-accumulate hook and then dropped, so at most one
weight gradient exists at a time: vectorwise keeps one number per channel, element1 one tensor per weight,
element2 two (all in one allocation). Measured peak memory while pruning smollm2-135m, weights included:
1.7x, 2.1x and 2.9x its fp32 weight bytes (benchmarks/bench_prune.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import PruningError
from ..architecture import ATTENTION_PROJ, MLP_PROJ, decoder_layers, head_dim

# The weight dimension that indexes a unit's channels: rows for projections out of the unit, columns into it.
UNIT_AXIS = {"q_proj": 0, "k_proj": 0, "v_proj": 0, "o_proj": 1, "gate_proj": 0, "up_proj": 0, "down_proj": 1}


@dataclass
class UnitScores:
    """Importance of each unit of one layer; higher means more important."""

    q_heads: torch.Tensor  # (num query heads,)
    kv_heads: torch.Tensor  # (num KV heads,)
    channels: torch.Tensor  # (intermediate size,)


def projections(layer) -> dict[str, torch.nn.Linear]:
    """The seven prunable projections of a decoder layer by name."""
    attn, mlp = layer.self_attn, layer.mlp
    return {**{n: getattr(attn, n) for n in ATTENTION_PROJ}, **{n: getattr(mlp, n) for n in MLP_PROJ}}


def units_from_channels(per_channel: dict[str, torch.Tensor], hd: int) -> UnitScores:
    """Sum per-channel scores of the coupled projections into head and channel scores."""
    return UnitScores(
        q_heads=(per_channel["q_proj"] + per_channel["o_proj"]).view(-1, hd).sum(1),
        kv_heads=(per_channel["k_proj"] + per_channel["v_proj"]).view(-1, hd).sum(1),
        channels=per_channel["gate_proj"] + per_channel["up_proj"] + per_channel["down_proj"],
    )


def _per_channel(name: str, elementwise: torch.Tensor) -> torch.Tensor:
    return elementwise.sum(dim=1 - UNIT_AXIS[name])


def magnitude_scores(model, layer_ids: list[int], p: int) -> dict[int, UnitScores]:
    """Sum of |w|^p over each unit's weights (p=1: l1, p=2: l2)."""
    hd, layers, out = head_dim(model.config), decoder_layers(model), {}
    with torch.no_grad():
        for i in layer_ids:
            per_channel = {n: _per_channel(n, lin.weight.float().abs().pow(p)) for n, lin in projections(layers[i]).items()}
            out[i] = units_from_channels(per_channel, hd)
    return out


def random_scores(model, layer_ids: list[int], seed: int) -> dict[int, UnitScores]:
    """Uniform random scores from a generator seeded with `seed` (same seed, same units removed)."""
    gen, hd, layers, out = torch.Generator().manual_seed(seed), head_dim(model.config), decoder_layers(model), {}
    for i in layer_ids:
        proj = projections(layers[i])
        out[i] = UnitScores(
            q_heads=torch.rand(proj["q_proj"].weight.shape[0] // hd, generator=gen),
            kv_heads=torch.rand(proj["k_proj"].weight.shape[0] // hd, generator=gen),
            channels=torch.rand(proj["up_proj"].weight.shape[0], generator=gen),
        )
    return out


def taylor_scores(model, layer_ids: list[int], samples: list[torch.Tensor], variant: str) -> dict[int, UnitScores]:
    """LLM-Pruner's Taylor importance (see the module docstring) from one backward per calibration sample."""
    if not samples:
        raise PruningError("taylor importance needs calibration samples; num_samples must be > 0")
    layers, n = decoder_layers(model), len(samples)
    weights = {(i, name): lin.weight for i in layer_ids for name, lin in projections(layers[i]).items()}
    # Accumulators: vectorwise, sum over samples of per-channel sum(w*g)/n; else the mean gradient g, and for
    # element2 the mean of g_sample**2 (Fisher diagonal).
    first = _accumulators(weights, per_channel=variant == "vectorwise")
    second = _accumulators(weights, per_channel=False) if variant == "element2" else {}

    def fold(key, param):
        g = param.grad.float()
        param.grad = None  # drop it now: only one weight's gradient is alive at any time
        if variant == "vectorwise":
            first[key].add_(_per_channel(key[1], param.detach().float() * g), alpha=1 / n)
        else:  # in-place updates: no weight-sized temporaries besides the gradient itself
            first[key].add_(g, alpha=1 / n)
            if variant == "element2":
                second[key].addcmul_(g, g, value=1 / n)

    saved = {p: p.requires_grad for p in model.parameters()}
    hooks = []
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for key, w in weights.items():
            w.requires_grad_(True)
            hooks.append(w.register_post_accumulate_grad_hook(lambda p, key=key: fold(key, p)))
        for ids in samples:
            ids = ids.to(model.device)
            with torch.enable_grad():
                loss = model(input_ids=ids, labels=ids, use_cache=False).loss
                if not torch.isfinite(loss):
                    raise PruningError(f"calibration loss is {loss.item()}; the model or the calibration text is broken")
                loss.backward()
    finally:
        for h in hooks:
            h.remove()
        for p, flag in saved.items():
            p.grad = None
            p.requires_grad_(flag)

    hd, out = head_dim(model.config), {}
    with torch.no_grad():
        for i in layer_ids:
            per_channel = {}
            for name in UNIT_AXIS:
                key, w = (i, name), weights[(i, name)].detach().float()
                # In place on the accumulators (no longer needed): no weight-sized temporaries at the peak.
                if variant == "vectorwise":
                    per_channel[name] = first[key].abs()
                elif variant == "element1":
                    per_channel[name] = _per_channel(name, first[key].mul_(w).abs_())
                else:  # |w*g - 0.5 * w*F*w|
                    salience = first[key].mul_(w).sub_(second[key].mul_(w).mul_(w), alpha=0.5)
                    per_channel[name] = _per_channel(name, salience.abs_())
            out[i] = units_from_channels(per_channel, hd)
    return out


def obs_scores(model, layer_ids: list[int], samples: list[torch.Tensor], heads: bool = True) -> dict[int, UnitScores]:
    """Greedy structured-OBS ranks of every unit (see the module docstring). `heads=False` (a prune that keeps every
    head) ranks the MLP channels alone: o_proj's statistics are not gathered, the heads all score 0."""
    hd = head_dim(model.config)
    group = model.config.num_attention_heads // model.config.num_key_value_heads
    units = {"q_heads": ("o_proj", hd), "kv_heads": ("o_proj", hd * group)} if heads else {}
    orders = _obs_orders(model, layer_ids, samples, {**units, "channels": ("down_proj", 1)})
    width = {i: projections(decoder_layers(model)[i])["o_proj"].in_features for i in layer_ids}
    return {i: UnitScores(**{"q_heads": torch.zeros(width[i] // hd), "kv_heads": torch.zeros(width[i] // (hd * group)),
                             **orders[i]}) for i in layer_ids}


def _obs_orders(model, layer_ids: list[int], samples: list[torch.Tensor], units: dict[str, tuple[str, int]]) -> dict:
    """{layer: {kind: greedy OBS order}} for each kind of unit in `units` (kind -> (projection, input columns per
    unit)), from the inputs the calibration samples give those projections. The Gram matrices are float64 and
    (width + 1)^2 each; layers are visited in chunks whose matrices fit `_GRAM_BYTES`, one forward pass of the samples
    per chunk."""
    if not samples:
        raise PruningError("obs importance needs calibration samples; num_samples must be > 0")
    layers, out = decoder_layers(model), {}
    names = sorted({name for name, _ in units.values()})
    for chunk in _chunks(layer_ids, [_gram_bytes(layers[i], names) for i in layer_ids]):
        grams = _input_grams(model, [(i, name) for i in chunk for name in names], samples)
        for i in chunk:
            proj = projections(layers[i])
            out[i] = {kind: _obs_order(proj[name].weight, grams[(i, name)], size) for kind, (name, size) in units.items()}
        del grams
    return out


_GRAM_BYTES = 2**30  # float64 Gram matrices held at once: all of a small model's layers, one of LLaMA-7B's (~1 GB)
_OBS_DAMPING = 0.01  # of the mean diagonal, as GPTQ / SlimGPT damp their Hessians


def _gram_bytes(layer, names: list[str]) -> int:
    proj = projections(layer)
    return 8 * sum((proj[n].in_features + 1) ** 2 for n in names)


def _chunks(items: list, sizes: list[int]) -> list[list]:
    """Consecutive runs of `items` whose `sizes` sum to at most _GRAM_BYTES (at least one item each)."""
    runs, total = [], _GRAM_BYTES
    for item, size in zip(items, sizes):
        if total + size > _GRAM_BYTES:
            runs.append([])
            total = 0
        runs[-1].append(item)
        total += size
    return runs


def _input_grams(model, keys: list[tuple[int, str]], samples: list[torch.Tensor]) -> dict:
    """For each (layer, projection) key: the float64 Gram matrix of [x, 1] over every token the projection reads
    while the model runs the samples (consecutive samples of one length batched together)."""
    layers = decoder_layers(model)
    grams, part, hooks = {}, {}, []

    def add(key, module, args):  # float32 products summed in place within a batch, then into the float64 total
        x = args[0].reshape(-1, args[0].shape[-1]).float()
        x = torch.cat([x, torch.ones_like(x[:, :1])], 1)
        if key not in part:
            part[key] = torch.zeros(x.shape[1], x.shape[1], device=x.device)
        part[key].addmm_(x.T, x)

    try:
        for key in keys:
            linear = projections(layers[key[0]])[key[1]]
            hooks.append(linear.register_forward_pre_hook(lambda m, args, key=key: add(key, m, args)))
        with torch.no_grad():
            for ids in _batches(samples):
                model.get_decoder()(input_ids=ids.to(model.device), use_cache=False)  # the head reads nothing
                for key, p in part.items():
                    grams[key] = grams.get(key, 0) + p.double()
                    p.zero_()
    finally:
        for h in hooks:
            h.remove()
    return grams


def _batches(samples: list[torch.Tensor], size: int = 16) -> list[torch.Tensor]:
    """The [1, length] samples in order, runs of equal length concatenated into batches of at most `size`."""
    out = []
    for ids in samples:
        if out and out[-1][-1].shape == ids.shape and len(out[-1]) < size:
            out[-1].append(ids)
        else:
            out.append([ids])
    return [torch.cat(b) for b in out]


def _obs_order(weight: torch.Tensor, gram: torch.Tensor, size: int) -> torch.Tensor:
    """The place of each group of `size` input columns of `weight` [d_out, d_in] in a greedy structured-OBS removal
    (0: removed first): each step removes the groups whose removal, after compensation by the remaining columns and
    an output bias, adds the least output error, then applies that compensation to W and H^-1. `gram`: the Gram
    matrix of [x, 1]; a free bias makes H the inputs' covariance (sums about their mean), damped by _OBS_DAMPING of
    its mean diagonal."""
    d_in = weight.shape[1]
    n = d_in // size
    h = gram[:d_in, :d_in] - torch.outer(gram[:d_in, -1], gram[:d_in, -1]) / gram[-1, -1]
    h.diagonal().add_(_OBS_DAMPING * h.diagonal().mean())
    hinv = torch.linalg.inv(h)
    w = weight.detach().to(h)
    order, alive, step, done = torch.empty(n), torch.ones(n, dtype=torch.bool), -(-n // 64), 0
    cols = torch.arange(d_in).view(n, size)
    while done < n:
        live = alive.nonzero().flatten()
        c = cols[live]  # [groups alive, size]
        wg = w[:, c].transpose(0, 1)  # [groups alive, d_out, size]
        errors = (wg @ torch.linalg.inv(hinv[c[:, :, None], c[:, None, :]]) * wg).sum((1, 2))
        take = live[errors.topk(min(step, n - done), largest=False).indices.cpu()]
        order[take] = torch.arange(done, done + len(take), dtype=order.dtype)
        alive[take], done = False, done + len(take)
        c = cols[take].flatten()
        block = torch.linalg.inv(hinv[c][:, c]) @ hinv[c]  # [H^-1]_cc^-1 [H^-1]_c,: : the compensation's direction
        w.addmm_(w[:, c], block, alpha=-1)  # (indexing copies: the updates may write in place)
        hinv.addmm_(hinv[:, c], block, alpha=-1)
    return order


_HEAD_SAMPLES = 8  # obs-mlp's Taylor head scores read the first 8 samples: a backward pass each, where obs needs
                   # one forward pass for all of them (64 samples: 58 s of the demo's prune; 8: 7 s)


def obs_mlp_scores(model, layer_ids: list[int], samples: list[torch.Tensor], variant: str) -> dict[int, UnitScores]:
    """Taylor's head scores (`variant`) from the first _HEAD_SAMPLES calibration samples, with obs's MLP channel
    ranks from all of them (obs gathers only down_proj's inputs)."""
    heads = taylor_scores(model, layer_ids, samples[:_HEAD_SAMPLES], variant)
    mlp = _obs_orders(model, layer_ids, samples, {"channels": ("down_proj", 1)})
    return {i: UnitScores(q_heads=heads[i].q_heads, kv_heads=heads[i].kv_heads, channels=mlp[i]["channels"])
            for i in layer_ids}


def _accumulators(weights: dict, per_channel: bool) -> dict:
    """fp32 zeros per weight (or per unit channel), as views of ONE allocation: many weight-sized buffers allocated
    between the transient gradients fragment the C heap and cost ~0.3x the weight bytes on top (measured)."""
    shapes = {k: (w.shape[UNIT_AXIS[k[1]]],) if per_channel else tuple(w.shape) for k, w in weights.items()}
    sizes = [math.prod(s) for s in shapes.values()]
    device = next(iter(weights.values())).device
    flat = torch.zeros(sum(sizes), dtype=torch.float32, device=device)
    return {k: v.view(shapes[k]) for k, v in zip(shapes, flat.split(sizes))}


Scorer = Callable[..., dict[int, UnitScores]]
SCORERS: dict[str, Scorer] = {
    "l1": lambda model, layer_ids, samples, config: magnitude_scores(model, layer_ids, 1),
    "l2": lambda model, layer_ids, samples, config: magnitude_scores(model, layer_ids, 2),
    "random": lambda model, layer_ids, samples, config: random_scores(model, layer_ids, config.seed),
    "taylor": lambda model, layer_ids, samples, config: taylor_scores(model, layer_ids, samples, config.taylor),
    "obs": lambda model, layer_ids, samples, config: obs_scores(model, layer_ids, samples, config.attention),
    "obs-mlp": lambda model, layer_ids, samples, config: obs_mlp_scores(model, layer_ids, samples, config.taylor),
}
TAYLOR_BASED = ("taylor", "obs-mlp")  # the scorers that read config.taylor
OBS_BASED = ("obs", "obs-mlp")  # the scorers that rank down_proj's inputs from their covariance


def needs_samples(importance: str) -> bool:
    """Whether a scorer reads calibration samples (the others only read weights)."""
    return importance in (*OBS_BASED, *TAYLOR_BASED)


def thin_calibration(model, layer_ids: list[int], samples: list[torch.Tensor], importance: str) -> str | None:
    """A warning when an obs scorer reads fewer calibration tokens than down_proj has inputs: the covariance is then
    mostly its damping, and the order little better than Taylor's (SmolLM2, 10 built-in paragraphs, ~450 tokens
    against 1,536 inputs: reconstructed KL 1.042 against Taylor's 1.101, where 64 x 128 tokens give 0.747;
    BENCHMARKS.md "Which units to prune"). None otherwise."""
    if importance not in OBS_BASED or not layer_ids:
        return None
    tokens = sum(ids.numel() for ids in samples)
    width = max(projections(decoder_layers(model)[i])["down_proj"].in_features for i in layer_ids)
    if tokens >= width:
        return None
    return (f"{importance} importance read {tokens:,} calibration tokens, fewer than down_proj's {width:,} inputs, so "
            "its order is little better than Taylor's; give it thousands of tokens of a corpus (--calibration "
            "corpus.parquet --num-samples 64)")
