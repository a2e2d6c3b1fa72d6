"""prune(): LLM-Pruner-style structured pruning of whole attention heads and MLP channels, in place.

Units and ratio (R = `PruneConfig.ratio`, applied to every pruned layer; rounding is half up):
  * MLP: remove round(R * intermediate) channels (gate/up rows and down columns together); `mlp_ratio`, when set,
    takes R's place here, so heads and channels can be pruned at different fractions.
  * attention, `gqa="within-group"` (default): remove round(R * group_size) query heads from EVERY KV group, the
    least important inside each group; all KV heads stay. Total heads removed = num_kv_heads * round(R * group_size),
    the multiple of the group count nearest to R * num_heads. For SmolLM2 (9 heads, 3 groups), R=0.3 removes 3 heads.
  * attention, `gqa="whole-group"`: remove round(R * num_kv_heads) whole KV groups (the KV head with its query
    heads), ranked by the sum of their heads' scores. Multi-head attention (group size 1) always prunes this way:
    a query head there owns its KV head, so removing it removes the group.
  * A ratio that would remove every head (of a group, or every group) or every channel of a layer is a PruningError.
  Head granularity makes the actual fractions differ from R; the report gives requested and actual fractions of
  heads, channels and parameters.

Layers: "uniform" prunes every layer alike, so the config stays standard (plain `from_pretrained` loads it);
"START:END" prunes layers START..END-1 (LLM-Pruner's default is 4:30) and leaves a non-uniform model whose config
lists per-layer shapes (see rora/architecture.py). Importance is computed for all pruned layers before any surgery, so
scores are of the original model, as in LLM-Pruner's one-shot mode.

The held-out loss is measured before and after on calibration-pool texts disjoint from those used for importance.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..artifacts import count_parameters, save_stage_model
from ..config import PruneConfig
from ..models import check_loaded
from ..errors import PruningError
from .calibration import calibration_samples
from .importance import SCORERS, TAYLOR_BASED, UnitScores, needs_samples, thin_calibration
from ..architecture import (
    LayerShape, check_supported, decoder_layers, is_standard_config, keep_units, layer_shapes, sync_config,
)

log = logging.getLogger(__name__)


@dataclass
class PruneReport:
    """What prune() did: per-layer shapes and removed units, requested vs actual ratios, parameters, losses."""

    config: dict
    importance: str  # e.g. "taylor/vectorwise", "l2"
    seed: int
    pruned_layers: list[int]
    requested_ratio: float
    actual: dict  # fractions removed: q_heads, kv_heads, channels (in pruned layers), parameters (whole model)
    params_before: int
    params_after: int
    layers: list[dict]  # per layer: q_heads, kv_heads, intermediate, removed_q_heads, removed_kv_heads, removed_channels
    calibration: dict  # source, num_samples, holdout_samples, seq_len
    loss_before: float | None = None  # held-out mean token NLL
    loss_after: float | None = None
    standard_config: bool = True  # plain transformers from_pretrained loads it (else only rora.load_model)
    seconds: float = 0.0
    prose: dict = field(default_factory=dict)  # {"before", "after"}: figures on held-out prose, when measured
    warning: str | None = None  # what the user should know about the calibration (importance.thin_calibration)
    perplexity_before: float | None = field(init=False, default=None)
    perplexity_after: float | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.perplexity_before = _ppl(self.loss_before)
        self.perplexity_after = _ppl(self.loss_after)

    def to_dict(self) -> dict:
        return asdict(self)


def prune(model, tokenizer, config: PruneConfig, calibration: list[str] | None = None) -> PruneReport:
    """Prune `model` in place as `config` says and return the report.

    `calibration`: texts to draw importance and held-out samples from (first `num_samples`, then
    `holdout_samples`); None loads `config.calibration` ('builtin', training records or a text source).
    """
    start = time.perf_counter()
    check_loaded(model, tokenizer)
    config = PruneConfig.coerce(config)
    check_supported(model.config)
    before = layer_shapes(model)
    layer_ids = resolve_layers(config.layers, len(before))
    counts = {i: removal_counts(before[i], config, i) for i in layer_ids}

    samples, holdout, source = calibration_samples(tokenizer, config, calibration)
    calib = samples if needs_samples(config.importance) else []

    params_before = count_parameters(model)
    loss_before = heldout_loss(model, holdout)
    removing = [i for i in layer_ids if any(counts[i])]
    warning = thin_calibration(model, removing, calib, config.importance)
    scores = SCORERS[config.importance](model, removing, calib, config) if removing else {}
    layers = decoder_layers(model)
    removed = {}
    for i in removing:
        removed[i] = choose_removed(before[i], scores[i], counts[i], config.gqa)
        keep_units(layers[i], model.config, *_kept(before[i], removed[i]))
    after = layer_shapes(model)
    sync_config(model.config, after)
    loss_after = heldout_loss(model, holdout)

    per_layer = []
    for i, shape in enumerate(after):
        q, kv, ch = removed.get(i, ([], [], []))
        per_layer.append({**asdict(shape), "removed_q_heads": q, "removed_kv_heads": kv, "removed_channels": ch})
    params_after = count_parameters(model)
    report = PruneReport(
        config=config.to_dict(),
        importance=config.importance + (f"/{config.taylor}" if config.importance in TAYLOR_BASED else ""),
        seed=config.seed,
        pruned_layers=layer_ids,
        requested_ratio=config.ratio,
        actual=_fractions(before, after, layer_ids, params_before, params_after),
        params_before=params_before,
        params_after=params_after,
        layers=per_layer,
        calibration={
            "source": source,
            "num_samples": len(samples),
            "holdout_samples": len(holdout),
            "seq_len": config.seq_len,
        },
        loss_before=loss_before,
        loss_after=loss_after,
        standard_config=is_standard_config(model.config),
        seconds=round(time.perf_counter() - start, 3),
        warning=warning,
    )
    log.info("pruned %s -> %s parameters in %.1f s", params_before, params_after, report.seconds)
    return report


def resolve_layers(spec: str, num_layers: int) -> list[int]:
    """Layer indices to prune: all for 'uniform', else range(START, END), which must lie inside the model."""
    if spec == "uniform":
        return list(range(num_layers))
    start, _, end = spec.partition(":")
    start, end = int(start), int(end)
    if not 0 <= start < end <= num_layers:
        raise PruningError(
            f"layer range {spec} lies outside the model's {num_layers} layers; use START:END with "
            f"0 <= START < END <= {num_layers}, or 'uniform'"
        )
    return list(range(start, end))


def removal_counts(shape: LayerShape, config: PruneConfig, index: int) -> tuple[int, int, int]:
    """(query heads per KV group, whole KV groups, MLP channels) to remove from a layer of `shape`."""
    per_group = groups = channels = 0
    if config.attention:
        if config.gqa == "within-group" and shape.group_size > 1:
            per_group = _round(config.ratio * shape.group_size)
            if per_group >= shape.group_size:
                raise PruningError(
                    f"ratio {config.ratio} would remove all {shape.group_size} query heads of every KV group in layer "
                    f"{index}; lower --ratio (below {(shape.group_size - 0.5) / shape.group_size:.3f})"
                )
        else:
            groups = _round(config.ratio * shape.kv_heads)
            if groups >= shape.kv_heads:
                raise PruningError(
                    f"ratio {config.ratio} would remove all {shape.kv_heads} attention head groups of layer {index}; "
                    f"lower --ratio (below {(shape.kv_heads - 0.5) / shape.kv_heads:.3f})"
                )
    if config.mlp:
        channels = _round(config.channel_ratio * shape.intermediate)
        if config.channel_multiple > 1 and channels:  # round what is kept, not what is removed
            m = config.channel_multiple
            kept = min(max(m, m * _round((shape.intermediate - channels) / m)), shape.intermediate)
            channels = shape.intermediate - kept
        if channels >= shape.intermediate:
            raise PruningError(f"ratio {config.channel_ratio} would remove all {shape.intermediate} MLP channels of layer "
                               f"{index}")
    return per_group, groups, channels


def choose_removed(shape: LayerShape, scores: UnitScores, counts: tuple[int, int, int], gqa: str):
    """The least important (query heads, KV heads, channels) to remove; ties go to the lower index."""
    per_group, groups, channels = counts
    g = shape.group_size
    q_scores = scores.q_heads.view(shape.kv_heads, g)
    if per_group:
        order = _lowest(q_scores, per_group)  # (kv_heads, per_group) indices within each group
        removed_q = sorted(int(k * g + j) for k in range(shape.kv_heads) for j in order[k])
        removed_kv = []
    elif groups:
        group_scores = q_scores.sum(1) + scores.kv_heads
        removed_kv = sorted(int(k) for k in _lowest(group_scores, groups))
        removed_q = [k * g + j for k in removed_kv for j in range(g)]
    else:
        removed_q, removed_kv = [], []
    removed_ch = sorted(int(c) for c in _lowest(scores.channels, channels)) if channels else []
    return removed_q, removed_kv, removed_ch


def heldout_loss(model, samples: list[torch.Tensor]) -> float | None:
    """Mean next-token NLL over all predicted tokens of `samples` (None when there are none)."""
    if not samples:
        return None
    total, tokens = 0.0, 0
    with torch.no_grad():
        for ids in samples:
            ids = ids.to(model.device)
            n = ids.shape[1] - 1
            total += model(input_ids=ids, labels=ids, use_cache=False).loss.item() * n
            tokens += n
    return total / tokens


def save_pruned(model, tokenizer, report: PruneReport, out, overwrite: bool = False, source: str | None = None) -> Path:
    """Write the pruned model (safetensors, config, tokenizer) and its manifest atomically to `out`; `source` is
    the spec of the model that was pruned."""
    return save_stage_model(model, tokenizer, out, "prune", {"model": source}, report.to_dict(), overwrite,
                            inputs=[source])


def _kept(shape: LayerShape, removed) -> tuple[list[int], list[int], list[int]]:
    q, kv, ch = (set(r) for r in removed)
    return (
        [h for h in range(shape.q_heads) if h not in q],
        [h for h in range(shape.kv_heads) if h not in kv],
        [c for c in range(shape.intermediate) if c not in ch],
    )


def _lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k lowest scores along the last dim (stable: equal scores remove the lower index first)."""
    return torch.argsort(scores.float(), dim=-1, stable=True)[..., :k]


def _round(x: float) -> int:
    # Half up, with a little slack for float error (0.3 * 5 = 1.4999999999999998 must round to 2).
    return int(math.floor(x + 0.5 + 1e-9))


def _fractions(before, after, layer_ids, params_before: int, params_after: int) -> dict:
    def frac(attr):
        total = sum(getattr(before[i], attr) for i in layer_ids)
        left = sum(getattr(after[i], attr) for i in layer_ids)
        return round(1 - left / total, 6)

    return {
        "q_heads": frac("q_heads"),
        "kv_heads": frac("kv_heads"),
        "channels": frac("intermediate"),
        "parameters": round(1 - params_after / params_before, 6),
    }


def _ppl(loss: float | None) -> float | None:
    return None if loss is None else math.exp(min(loss, 700.0))
