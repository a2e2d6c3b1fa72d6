"""Convert an LLM-Pruner checkpoint into this project's format.

LLM-Pruner saves `torch.save({'model': module, 'tokenizer': tokenizer})`: a pickle of the pruned module whose
config still carries the ORIGINAL head counts and MLP width. Loading it runs code from the file, so
`rora.models.load_model` only calls this with `allow_pickle=True`. Here the config is synced to the weights'
per-layer shapes (architecture.sync_to_weights, what `rora.adopt` does for a model in memory) and the model is
rebuilt from a plain state dict with `architecture.build_from_state_dict`: the result saves as safetensors with a
truthful config and flows into the later stages like any other model.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..errors import ModelLoadError, detail
from ..architecture import build_from_state_dict, check_supported, sync_to_weights


def load_llm_pruner_checkpoint(path: str | Path, dtype=None):
    """(model, tokenizer) from an LLM-Pruner `torch.save` checkpoint at `path` (trusted input only)."""
    try:
        payload = torch.load(str(path), map_location="cpu", weights_only=False)
    except Exception as exc:  # unpickling can fail in many ways (missing classes, truncated file, ...)
        raise ModelLoadError(f"cannot read {path} as an LLM-Pruner checkpoint: {detail(exc)}") from None
    module = payload.get("model") if isinstance(payload, dict) else None
    if not isinstance(module, torch.nn.Module) or not hasattr(module, "config"):
        raise ModelLoadError(
            f"{path} is not an LLM-Pruner checkpoint: expected a dict with 'model' (a transformers model) and 'tokenizer'"
        )
    config = module.config
    check_supported(config)
    sync_to_weights(module)
    params = {name for name, _ in module.named_parameters(remove_duplicate=False)}
    # Keep parameters only: old checkpoints also hold buffers (rotary inv_freq) that the rebuilt model computes.
    state = {k: v for k, v in module.state_dict().items() if k in params}
    model = build_from_state_dict(config, state, dtype)
    return model, payload.get("tokenizer")
