"""Merge a LoRA / RoRA / DoRA adapter into dense weights, and prove the merge reproduces the adapter model.

PEFT owns the scaling (alpha/r, alpha/sqrt(r) for RoRA, DoRA's magnitude): we call its `merge_and_unload` and
never re-derive a scale by hand, so any scaling rule PEFT applies is merged the way it was trained. Merging
happens in float64 by default (`MergeConfig.compute_dtype`; merging into a bf16 base loses ~1e-2 relative
accuracy), then the result is cast. Before anything is returned, the merged model's logits on fixed probe inputs
must equal the adapter model's within `MergeConfig.tolerance`, both computed in the compute dtype; otherwise
MergeError, and nothing is written.

Why float64: SmolLM2's residual stream carries activations of ~1.8e4, so merely rounding correctly merged
weights to fp32 moves its logits by ~2e-3, twenty times the 1e-4 tolerance. In float64 a right merge differs by
~1e-12 and any wrong scaling rule by far more than 1e-4, so the check separates the two. The difference of the
final (cast) model is reported too, as `max_abs_diff_after_cast`: that is the precision floor of the output dtype.
"""
from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..artifacts import read_json, save_stage_model
from ..config import MergeConfig
from ..errors import MergeError, detail
from ..models import check_loaded, load_adapter, safetensors_shapes, weights_files
from ..numerics import cast_parameters, logits_on, probe_inputs, resolve_dtype

ADAPTER_WEIGHTS = "adapter_model.safetensors"
# Saved adapter keys look like base_model.model.<module path>.lora_A.weight (the adapter name is stripped).
_ADAPTER_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.(?P<part>lora_A|lora_B|lora_magnitude_vector)(\.weight)?$")


@dataclass
class MergeReport:
    """What was merged and how faithfully (the report of the merged directory's manifest; `config` is its config)."""

    method: str  # lora | rora | dora, from the adapter config (use_dora, use_rslora)
    rank: int
    alpha: float
    effective_scale: float | list[float]  # PEFT's own `scaling` (one value, or the distinct per-module values)
    merged_modules: int
    target_modules: list[str]
    max_abs_diff: float  # max |logit(merged) - logit(adapter)| on the probe inputs, in compute_dtype
    tolerance: float
    compute_dtype: str
    max_abs_diff_after_cast: float  # the same after casting to `dtype` (that dtype's precision floor; not checked)
    dtype: str  # dtype of the returned model
    probe_shape: list[int]
    adapter: str | None = None  # adapter directory, when merged from disk
    use_rslora: bool = False
    use_dora: bool = False
    extra: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)  # the MergeConfig it ran with

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def merge(model, adapter=None, config: MergeConfig | None = None, *, probe_ids: torch.Tensor | None = None,
          allow_pickle: bool = False):
    """Merge an adapter into `model`; return `(merged model, MergeReport)`.

    `model` is a PeftModel (adapter attached), or a base model plus `adapter`, a PEFT adapter directory.
    The adapter model is consumed: PEFT merges in place. The merged model's logits on `probe_ids` (default:
    `probe_inputs`) must match the adapter model's within `config.tolerance` (both in `config.compute_dtype`), else MergeError.
    An adapter whose weights are pickled (adapter_model.bin) is refused unless `allow_pickle`.
    """
    from peft.tuners.lora import LoraLayer

    check_loaded(model)
    config = MergeConfig.coerce(config)
    peft_model = _attach(model, adapter, allow_pickle)
    cast_parameters(peft_model, resolve_dtype(config.compute_dtype))  # whatever the adapter was trained in
    name = peft_model.active_adapter
    peft_config = peft_model.peft_config[name]
    wrapped = [m for m in peft_model.modules() if isinstance(m, LoraLayer) and name in m.scaling]
    if not wrapped:
        raise MergeError(f"adapter {name!r} wraps no module of the model; nothing to merge")
    scales = sorted({float(m.scaling[name]) for m in wrapped})
    ids = probe_ids if probe_ids is not None else probe_inputs(peft_model.config.vocab_size)
    reference = logits_on(peft_model, ids)
    merged = peft_model.merge_and_unload()
    diff = float((logits_on(merged, ids) - reference).abs().max())
    if not diff <= config.tolerance:  # `not <=` also catches NaN
        raise MergeError(
            f"the merged model differs from the adapter model by {diff:.3g} (max |logit difference|), above the "
            f"tolerance {config.tolerance:g}; nothing was written. Check the adapter for non-finite weights, or raise "
            "merge.tolerance if the difference is expected"
        )
    cast_parameters(merged, resolve_dtype(config.dtype))
    after_cast = float((logits_on(merged, ids) - reference).abs().max())
    targets = peft_config.target_modules
    report = MergeReport(
        method="dora" if peft_config.use_dora else "rora" if peft_config.use_rslora else "lora",
        rank=int(peft_config.r),
        alpha=float(peft_config.lora_alpha),
        effective_scale=scales[0] if len(scales) == 1 else scales,
        merged_modules=len(wrapped),
        target_modules=sorted(targets) if isinstance(targets, (set, list, tuple)) else [str(targets)],
        max_abs_diff=diff,
        tolerance=config.tolerance,
        compute_dtype=config.compute_dtype,
        max_abs_diff_after_cast=after_cast,
        dtype=config.dtype,
        probe_shape=list(ids.shape),
        adapter=str(adapter) if adapter is not None else None,
        use_rslora=bool(peft_config.use_rslora),
        use_dora=bool(peft_config.use_dora),
        config=config.to_dict(),
    )
    return merged, report


def _attach(model, adapter, allow_pickle: bool = False):
    """The PeftModel to merge: `model` itself, or `model` with the adapter directory loaded onto it."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        if adapter is not None:
            raise MergeError("the model already carries an adapter; pass either a PeftModel or a base model plus adapter")
        return model
    if adapter is None:
        raise MergeError("no adapter to merge: pass a PeftModel or an adapter directory (--adapter DIR)")
    if not isinstance(adapter, (str, os.PathLike)):
        raise MergeError(f"the adapter must be a directory's path, got {type(adapter).__name__}")
    check_fit(model, adapter, allow_pickle)
    return load_adapter(model, adapter, allow_pickle)


def check_fit(model, adapter: str | Path, allow_pickle: bool = False) -> None:
    """Raise MergeError naming the first module the adapter expects but the model lacks, or whose shape differs."""
    adapter = Path(adapter)
    if not (adapter / "adapter_config.json").is_file():
        raise MergeError(f"{adapter} is not a PEFT adapter directory (no adapter_config.json)")
    weights = weights_files(adapter, allow_pickle, "adapter")
    if not weights:
        raise MergeError(f"{adapter} has no adapter weights ({ADAPTER_WEIGHTS})")
    adapter_config = read_json(adapter / "adapter_config.json", MergeError)
    adapter_type = adapter_config.get("peft_type") if isinstance(adapter_config, dict) else None
    if adapter_type != "LORA":
        raise MergeError(f"{adapter} is a {adapter_type} adapter; rora merges LoRA-family adapters (lora, rora, dora)")
    modules = dict(model.named_modules())
    for key, shape in _weight_shapes(weights[0]).items():
        match = _ADAPTER_KEY.match(key)
        if not match:
            continue
        path, part = match["module"], match["part"]
        module = modules.get(path)
        if module is None or not hasattr(module, "weight") or module.weight.dim() != 2:
            raise MergeError(f"adapter {adapter} does not fit the model: it adapts {path}, which the model lacks")
        out_features, in_features = module.weight.shape
        fits = {"lora_A": shape[1:] == (in_features,), "lora_B": shape[:1] == (out_features,),
                "lora_magnitude_vector": shape == (out_features,)}[part]
        if not fits:
            raise MergeError(
                f"adapter {adapter} does not fit the model: {path} is {out_features}x{in_features} but the "
                f"adapter's {part} has shape {list(shape)} (was it trained on a differently pruned model?)"
            )


def _weight_shapes(path: Path) -> dict[str, tuple]:
    """Tensor name -> shape, from safetensors (header only) or, opted in, a pickle read with weights_only."""
    if path.suffix == ".safetensors":
        return safetensors_shapes([path], MergeError)
    try:
        return {k: tuple(v.shape) for k, v in torch.load(path, map_location="cpu", weights_only=True).items()}
    except (OSError, RuntimeError, ValueError, AttributeError) as exc:
        raise MergeError(f"{path} is corrupt or not adapter weights: {detail(exc)}") from None


def save_merged(model, tokenizer, report: MergeReport, out, overwrite: bool = False, source=None,
                adapter=None) -> Path:
    """Write the merged model as an atomic directory: safetensors, config, tokenizer, manifest. `source` is the
    base model's spec, `adapter` the adapter directory (default: the one merge() read, `report.adapter`)."""
    adapter = adapter or report.adapter
    return save_stage_model(model, tokenizer, out, "merge", {"model": source, "adapter": adapter}, report.to_dict(),
                            overwrite, inputs=[source, adapter])
