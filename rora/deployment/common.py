"""What every export shares: the report it returns, and the numerics of its verification."""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import torch

from ..architecture import layer_shapes
from ..errors import ExportError
from ..numerics import cast_parameters, logits_on


@dataclass
class ExportReport:
    """What was written (the CLI prints it; the export's manifest keeps it as its report)."""

    path: str
    format: str
    layout: str  # uniform | padded | compact
    dtype: str
    parameters: int  # of the written model
    source_parameters: int  # of the model passed in
    overhead: float  # parameters / source_parameters - 1 (padding), 0 otherwise
    size_bytes: int
    max_abs_diff: float  # max |logit difference|, written model (loaded back) vs the source model
    verified_with: str  # the loader that read the written model back
    card: str
    architecture: str | None = None  # gguf: llama | deci | qwen2
    llamacpp: dict | None = None  # gguf with llama.cpp installed: its logit difference and greedy tokens vs source
    quality: dict | None = None  # quantized gguf: held-out perplexity vs the f32 export (quantization_quality)
    notes: list = dataclasses.field(default_factory=list)  # checks skipped, warnings

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def cast_copy(model, dtype: torch.dtype):
    """`model` in `dtype`; a copy when that changes it, so the caller's model is never altered."""
    if next(model.parameters()).dtype == dtype:
        return model
    return cast_parameters(copy.deepcopy(model), dtype)


def verify_logits(loaded, ids, reference, config, exact: bool, what: str) -> float:
    diff = logit_diff(loaded, ids, reference)
    if exact and not diff <= config.tolerance:  # `not <=` also catches NaN
        raise ExportError(
            f"the exported {what} differs from the source model by {diff:.3g} (max |logit difference|), above "
            f"{config.tolerance:g}; nothing was written. This is a bug: please report it with the model's `rora info`"
        )
    return diff


def padding_note(model, params: int, source_params: int, layout: str) -> str | None:
    if layout != "padded":
        return None
    s = layer_shapes(model)[0]
    return (f"{100 * (params / source_params - 1):.1f}% more parameters (every layer padded to {s.q_heads} query "
            f"heads, {s.kv_heads} KV heads, MLP width {s.intermediate})")




def logit_diff(loaded, ids, reference) -> float:
    """max |logit difference| of `loaded` on `ids` against the source model's `reference` logits, in float64."""
    return float((logits_on(loaded, ids, torch.float64) - reference).abs().max())
