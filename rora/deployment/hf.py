"""The Hugging Face safetensors export: uniform, zero-padded (loads in plain transformers) or compact."""
from __future__ import annotations

import copy

import torch

from ..architecture import layer_shapes, pad_layer, padded_shape, plain_config, sync_config
from ..artifacts import atomic_dir, count_parameters, dir_size, save_model_dir, write_stage_manifest
from ..numerics import resolve_dtype
from .card import render_card
from .common import ExportReport, cast_copy, padding_note, verify_logits


def pad_model(model):
    """A zero-padded uniform copy of a non-uniform model that computes the same function (see pad_layer)."""
    padded = copy.deepcopy(model)
    shapes = layer_shapes(padded)
    target = padded_shape(shapes)
    for layer in padded.model.layers:
        pad_layer(layer, padded.config, target)
    sync_config(padded.config, [target] * len(shapes))
    return padded


HF_LOADERS = {
    "uniform": "A standard Llama-family checkpoint: `transformers.AutoModelForCausalLM.from_pretrained(path)` loads it.",
    "padded": (
        "Zero-padded to uniform shapes, so plain `transformers.AutoModelForCausalLM.from_pretrained(path)` loads it "
        "(padded heads and channels are exact zeros and change no output)."
    ),
    "compact": (
        "**Plain transformers cannot load this directory**: config.json lists its per-layer shapes under "
        "`rora_layer_shapes` (its layers differ, or it has output biases and a head count that transformers' "
        "LlamaConfig refuses). Load it with `rora.load_model(path)`; a non-uniform model re-exported with "
        "`rora export PATH --format hf --layout padded` loads anywhere."
    ),
}


def write_hf(model, tokenizer, config, out, overwrite, layout, source_params, ids, reference, card,
             source) -> ExportReport:
    from transformers import AutoModelForCausalLM

    from ..models import load_hf_dir

    model = cast_copy(model, resolve_dtype(config.dtype))
    with atomic_dir(out, overwrite=overwrite) as tmp:
        save_model_dir(model, tokenizer, tmp)
        if layout != "compact":
            plain_config(model.config).save_pretrained(tmp)  # the model's own, or its MistralConfig twin
        if layout == "compact":
            loaded, verified_with = load_hf_dir(tmp)[0], "rora.load_model"
        else:
            loaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32)
            verified_with = "transformers.AutoModelForCausalLM"
        diff = verify_logits(loaded, ids, reference, config, config.dtype == "float32", f"{layout} hf directory")
        del loaded
        params = count_parameters(model)
        info = {"name": out.name, "format": "hf", "layout": layout, "dtype": config.dtype, "parameters": params,
                "padding_overhead": padding_note(model, params, source_params, layout),
                "max_logit_diff_vs_source": diff, "loader": HF_LOADERS[layout]}
        (tmp / "README.md").write_text(render_card({**card, "export": {k: v for k, v in info.items() if v is not None}}))
        report = ExportReport(str(out), "hf", layout, config.dtype, params, source_params, params / source_params - 1,
                              dir_size(tmp), diff, verified_with, "README.md")
        write_stage_manifest(tmp, "export", {"model": source}, config.to_dict(), report.to_dict())
    report.size_bytes = dir_size(out)
    return report


# --- gguf ---------------------------------------------------------------------------------------------------------

# llama.cpp's f32 kernels sum in another order than torch; on SmolLM2's ~1e4 activations fp32 rounding alone moves
