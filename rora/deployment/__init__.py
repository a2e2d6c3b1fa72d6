"""Deployment export: a Hugging Face safetensors directory or a GGUF file, each with a model card.

hf    uniform layers: a standard config that plain `transformers.AutoModelForCausalLM.from_pretrained` loads (a
      uniform Llama whose head count does not divide hidden_size, which LlamaConfig refuses, is written as the
      identical MistralConfig network; see architecture.plain_config).
      non-uniform, layout=padded: heads and MLP channels zero-padded to one shape (architecture.pad_layer), so the
      model computes the same function and loads anywhere, at a size overhead that is reported.
      non-uniform, layout=compact: the smallest weights, per-layer shapes in the config; only `rora.load_model`
      rebuilds it (plain transformers cannot).
gguf  see gguf_file.py: llama (uniform, or non-uniform zero-padded with --layout padded: llama.cpp, transformers' GGUF
      loader, and runtimes that need uniform shapes), deci (non-uniform, --layout compact: llama.cpp reads its
      per-layer head counts and FFN widths), qwen2 (uniform). dtype f32 | f16 | q8_0, and with llama.cpp installed
      its own q6_k | q5_k_m | q4_k_m.

Every export is verified before it is kept: the written model is loaded back (plain transformers where the
format promises that, rora's GGUF reader where transformers cannot read it) and its logits on fixed probe inputs
are compared with the source model's; in fp32 a difference above `ExportConfig.tolerance` is an ExportError and
nothing is written. When llama-cpp-python is installed, a GGUF is also run in llama.cpp (logits and greedy tokens
against the source model, f32 KV cache), and a quantized GGUF's held-out perplexity is compared with the f32
export's (a warning above `ExportConfig.max_ppl_increase`).

The export's manifest (artifacts.Manifest) is `rora.json` inside an hf directory and NAME.rora.json beside a
NAME.gguf file, as is its card NAME.md.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from ..architecture import check_supported, has_plain_config, is_uniform, layer_shapes
from ..artifacts import FILE_MANIFEST_SUFFIX, check_output, count_parameters
from ..config import ExportConfig
from ..models import adopt
from ..errors import ExportError
from ..numerics import logits_on, probe_inputs
from .common import ExportReport
from .gguf import gguf_model_problems, write_gguf_export
from .gguf_file import GGUF_DTYPES
from .hf import pad_model, write_hf

__all__ = ["export", "export_model", "ExportReport", "pad_model"]


def export(model, tokenizer, config: ExportConfig | None = None, out=None, *, overwrite: bool = False,
           card: dict | None = None, source: str | None = None) -> Path:
    """Export `model` as `config.format` to `out` (a directory for hf, a .gguf file for gguf); returns the path.
    `source`, the spec of the model exported, is recorded in the manifest."""
    return Path(export_model(model, tokenizer, config, out, overwrite=overwrite, card=card, source=source).path)


def export_model(model, tokenizer, config: ExportConfig | None = None, out=None, *, overwrite: bool = False,
                 card: dict | None = None, source: str | None = None) -> ExportReport:
    """`export`, returning the full ExportReport (sizes, padding overhead, verified logit difference)."""
    adopt(model, tokenizer)
    config = ExportConfig.coerce(config)
    if out is None:
        raise ExportError("no output path given (--out)")
    out = Path(out)
    check_supported(model.config)
    shapes = layer_shapes(model)
    uniform = is_uniform(shapes)
    # A uniform model that no standard config describes (output biases and a head count LlamaConfig refuses) is
    # written to HF as rora writes non-uniform ones: compact, for rora.load_model.
    plain = config.format != "hf" or has_plain_config(model.config)
    layout = config.layout if not uniform else "uniform" if plain else "compact"
    _check_request(config, model, out, uniform, overwrite, inputs=[source])
    source_params = count_parameters(model)
    ids = probe_inputs(model.config.vocab_size)
    # Compared in float64: padding changes the summation order, and fp32 rounding of SmolLM2's ~1e4 activations
    # alone moves logits by ~1e-3 (see recovery/merge.py); in float64 an exact export differs by ~1e-12.
    reference = logits_on(model, ids, torch.float64)
    target = pad_model(model) if layout == "padded" else model
    card = {**(card or {}), "shapes": [dataclasses.asdict(s) for s in shapes]}  # the real (unpadded) architecture
    writer = write_hf if config.format == "hf" else write_gguf_export
    return writer(target, tokenizer, config, out, overwrite, layout, source_params, ids, reference, card, source)


def _check_request(config: ExportConfig, model, out: Path, uniform: bool, overwrite: bool, inputs=()) -> None:
    """Every reason to refuse, before any work (and before anything is written)."""
    problems = []
    if config.format == "gguf":
        if out.suffix != ".gguf":
            problems.append(f"a gguf export is one file: --out must end in .gguf, got {out}")
        layout = "uniform" if uniform else config.layout
        problems += gguf_model_problems(model.config, layer_shapes(model), layout, GGUF_DTYPES[config.dtype])
    if problems:
        raise ExportError("; ".join(problems))
    for path in export_paths(out, config.format):
        check_output(path, overwrite, inputs)


def export_paths(out: str | Path, fmt: str) -> list[Path]:
    """What an export to `out` writes: the directory (hf), or the .gguf file with its card and manifest beside it."""
    out = Path(out)
    return [out, out.with_suffix(".md"), out.with_suffix(FILE_MANIFEST_SUFFIX)] if fmt == "gguf" else [out]
