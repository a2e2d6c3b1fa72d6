"""Deployment export: a Hugging Face safetensors directory or a GGUF file, each with a model card.

hf    uniform layers: a standard config that plain `transformers.AutoModelForCausalLM.from_pretrained` loads (a
      uniform Llama whose head count does not divide hidden_size, which LlamaConfig refuses, is written as the
      identical MistralConfig network; see structure.plain_config).
      non-uniform, layout=padded: heads and MLP channels zero-padded to one shape (structure.pad_layer), so the
      model computes the same function and loads anywhere, at a size overhead that is reported.
      non-uniform, layout=compact: the smallest weights, per-layer shapes in the config; only `rora.load_model`
      rebuilds it (plain transformers cannot).
gguf  see gguf.py: llama (uniform, or non-uniform zero-padded with --layout padded: llama.cpp, transformers' GGUF
      loader, and runtimes that need uniform shapes), deci (non-uniform, --layout compact: llama.cpp reads its
      per-layer head counts and FFN widths), qwen2 (uniform). dtype f32 | f16 | q8_0, and with llama.cpp installed
      its own q6_k | q5_k_m | q4_k_m.

Every export is verified before it is kept: the written model is loaded back (plain transformers where the
format promises that, rora's GGUF reader where transformers cannot read it) and its logits on fixed probe inputs
are compared with the source model's; in fp32 a difference above `ExportConfig.tolerance` is an ExportError and
nothing is written. When llama-cpp-python is installed, a GGUF is also run in llama.cpp (logits and greedy tokens
against the source model, f32 KV cache), and a quantized GGUF's held-out perplexity is compared with the f32
export's (a warning above `ExportConfig.max_ppl_increase`).
"""
from __future__ import annotations

import copy
import dataclasses
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..artifacts import atomic_dir, atomic_file, check_output, count_parameters, dir_size, save_model_dir, write_manifest
from ..config import ExportConfig
from ..errors import ExportError
from ..models import resolve_dtype
from ..pruning.structure import (check_supported, head_dim, is_uniform, layer_shapes, pad_layer, padded_shape,
                                 plain_config, sync_config)
from ..recovery.merge import cast_parameters, logits_on, probe_inputs
from .card import render_card
from .gguf import GGUF_ARCHS, GGUF_DTYPES, write_gguf  # noqa: F401  (write_gguf: part of this module's API)

MANIFEST = "rora_export.json"


@dataclass
class ExportReport:
    """What was written (the CLI prints it; hf directories keep it as rora_export.json)."""

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


def export(model, tokenizer, config: ExportConfig | None = None, out=None, *, overwrite: bool = False,
           card: dict | None = None) -> Path:
    """Export `model` as `config.format` to `out` (a directory for hf, a .gguf file for gguf); returns the path."""
    return Path(export_model(model, tokenizer, config, out, overwrite=overwrite, card=card).path)


def export_model(model, tokenizer, config: ExportConfig | None = None, out=None, *, overwrite: bool = False,
                 card: dict | None = None) -> ExportReport:
    """`export`, returning the full ExportReport (sizes, padding overhead, verified logit difference)."""
    config = ExportConfig.coerce(config)
    if out is None:
        raise ExportError("no output path given (--out)")
    out = Path(out)
    check_supported(model.config)
    shapes = layer_shapes(model)
    uniform = is_uniform(shapes)
    layout = "uniform" if uniform else config.layout
    _check_request(config, model, out, uniform, overwrite)
    source_params = count_parameters(model)
    ids = probe_inputs(model.config.vocab_size)
    # Compared in float64: padding changes the summation order, and fp32 rounding of SmolLM2's ~1e4 activations
    # alone moves logits by ~1e-3 (see recovery/merge.py); in float64 an exact export differs by ~1e-12.
    reference = logits_on(model, ids, torch.float64)
    target = pad_model(model) if layout == "padded" else model
    card = {**(card or {}), "shapes": [dataclasses.asdict(s) for s in shapes]}  # the real (unpadded) architecture
    writer = _write_hf if config.format == "hf" else _write_gguf
    return writer(target, tokenizer, config, out, overwrite, layout, source_params, ids, reference, card)


def _check_request(config: ExportConfig, model, out: Path, uniform: bool, overwrite: bool) -> None:
    """Every reason to refuse, before any work (and before anything is written)."""
    problems = []
    if config.format == "gguf":
        if out.suffix != ".gguf":
            problems.append(f"a gguf export is one file: --out must end in .gguf, got {out}")
        layout = "uniform" if uniform else config.layout
        problems += _gguf_model_problems(model.config, layer_shapes(model), layout, GGUF_DTYPES[config.dtype])
    if problems:
        raise ExportError("; ".join(problems))
    check_output(out, overwrite)
    if config.format == "gguf":
        check_output(out.with_suffix(".md"), overwrite)


def pad_model(model):
    """A zero-padded uniform copy of a non-uniform model that computes the same function (see pad_layer)."""
    padded = copy.deepcopy(model)
    shapes = layer_shapes(padded)
    target = padded_shape(shapes)
    for layer in padded.model.layers:
        pad_layer(layer, padded.config, target)
    sync_config(padded.config, [target] * len(shapes))
    return padded


def _cast(model, dtype: torch.dtype):
    """`model` in `dtype`; a copy when that changes it, so the caller's model is never altered."""
    if next(model.parameters()).dtype == dtype:
        return model
    return cast_parameters(copy.deepcopy(model), dtype)


def _verify(loaded, ids, reference, config: ExportConfig, exact: bool, what: str) -> float:
    diff = float((logits_on(loaded, ids, torch.float64) - reference).abs().max())
    if exact and not diff <= config.tolerance:  # `not <=` also catches NaN
        raise ExportError(
            f"the exported {what} differs from the source model by {diff:.3g} (max |logit difference|), above "
            f"{config.tolerance:g}; nothing was written. This is a bug: please report it with the model's `rora info`"
        )
    return diff


def _overhead(model, params: int, source_params: int, layout: str) -> str | None:
    if layout != "padded":
        return None
    s = layer_shapes(model)[0]
    return (f"{100 * (params / source_params - 1):.1f}% more parameters (every layer padded to {s.q_heads} query "
            f"heads, {s.kv_heads} KV heads, MLP width {s.intermediate})")


# --- hf -----------------------------------------------------------------------------------------------------------

_HF_LOADERS = {
    "uniform": "A standard Llama-family checkpoint: `transformers.AutoModelForCausalLM.from_pretrained(path)` loads it.",
    "padded": (
        "Zero-padded to uniform shapes, so plain `transformers.AutoModelForCausalLM.from_pretrained(path)` loads it "
        "(padded heads and channels are exact zeros and change no output)."
    ),
    "compact": (
        "**Plain transformers cannot load this directory**: its layers have different shapes (listed under "
        "`rora_layer_shapes` in config.json). Load it with `rora.load_model(path)`, or re-export with "
        "`rora export PATH --format hf --layout padded` for a copy that loads anywhere."
    ),
}


def _write_hf(model, tokenizer, config, out, overwrite, layout, source_params, ids, reference, card) -> ExportReport:
    from transformers import AutoModelForCausalLM

    from ..models import load_hf_dir

    model = _cast(model, resolve_dtype(config.dtype))
    with atomic_dir(out, overwrite=overwrite) as tmp:
        save_model_dir(model, tokenizer, tmp)
        if layout != "compact":
            plain_config(model.config).save_pretrained(tmp)  # the model's own, or its MistralConfig twin
        if layout == "compact":
            loaded, verified_with = load_hf_dir(tmp)[0], "rora.load_model"
        else:
            loaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32)
            verified_with = "transformers.AutoModelForCausalLM"
        diff = _verify(loaded, ids, reference, config, config.dtype == "float32", f"{layout} hf directory")
        del loaded
        params = count_parameters(model)
        info = {"name": out.name, "format": "hf", "layout": layout, "dtype": config.dtype, "parameters": params,
                "padding_overhead": _overhead(model, params, source_params, layout),
                "max_logit_diff_vs_source": diff, "loader": _HF_LOADERS[layout]}
        (tmp / "README.md").write_text(render_card({**card, "export": {k: v for k, v in info.items() if v is not None}}))
        report = ExportReport(str(out), "hf", layout, config.dtype, params, source_params, params / source_params - 1,
                              0, diff, verified_with, "README.md")
        write_manifest(tmp, MANIFEST, {"stage": "export", "export": report.to_dict(), "config": config.to_dict()})
    report.size_bytes = dir_size(out)
    return report


# --- gguf ---------------------------------------------------------------------------------------------------------

# llama.cpp's f32 kernels sum in another order than torch; on SmolLM2's ~1e4 activations fp32 rounding alone moves
# logits by ~1e-3 (recovery/merge.py), measured 2e-4 for SmolLM2 in llama.cpp. A wrong head count, permutation or
# tensor is off by whole units, so 2e-3 separates the two with room on both sides.
LLAMACPP_TOLERANCE = 2e-3
GREEDY_TOKENS = 16
HELDOUT = Path(__file__).with_name("heldout.txt")


def _gguf_model_problems(cfg, shapes, layout: str, qtype: str) -> list[str]:
    from . import llamacpp
    from .gguf import LLAMACPP_ONLY, gguf_arch

    problems = []
    if cfg.model_type not in GGUF_ARCHS:
        return [f"GGUF export supports {', '.join(GGUF_ARCHS)}, not {cfg.model_type!r}; use --format hf"]
    rope = getattr(cfg, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        problems.append(f"GGUF export writes plain RoPE only; this model uses rope_type {rope['rope_type']!r}: use --format hf")
    if layout == "compact":
        try:
            gguf_arch(cfg, shapes)
        except ExportError as exc:
            problems.append(str(exc))
    if qtype in LLAMACPP_ONLY and not llamacpp.available():
        problems.append(f"--dtype {qtype.lower()} is quantized by llama.cpp's own quantizer, which is not installed: "
                        f"{llamacpp.INSTALL_HINT}; or use --dtype q8_0")
    return problems


def _transformers_reads(arch: str, cfg, shapes) -> bool:
    """Whether transformers' GGUF loader rebuilds this file: it knows no deci, derives qwen2's head size from
    hidden_size / heads, and builds a LlamaConfig, which refuses a head count that does not divide hidden_size."""
    heads = shapes[0].q_heads
    return arch in ("llama", "qwen2") and cfg.hidden_size % heads == 0 and (
        arch == "llama" or head_dim(cfg) == cfg.hidden_size // heads)


def _write_gguf(model, tokenizer, config, out, overwrite, layout, source_params, ids, reference, card) -> ExportReport:
    from . import llamacpp
    from .gguf import LLAMACPP_ONLY

    qtype = GGUF_DTYPES[config.dtype]
    shapes = layer_shapes(model)
    notes = []
    with atomic_file(out) as tmp, tempfile.TemporaryDirectory(prefix=f".{out.name}.work-", dir=out.parent) as work:
        # Always an f32 file first: it is checked exactly, and it is the unquantized reference of the quality check.
        f32 = Path(work) / "f32.gguf"
        arch = write_gguf(model, tokenizer, f32, "F32", name=out.stem)
        reader, f32_model = _read_back(f32, model, arch, shapes)
        f32_diff = _verify(f32_model, ids, reference, config, True, f"GGUF ({arch}, F32) read back by {reader}")
        del f32_model
        edge = expected = None
        if llamacpp.available():
            expected = _greedy(model, ids[0, :8].tolist(), GREEDY_TOKENS)  # once: 16 full forward passes
            edge = _llamacpp_check(f32, expected, ids, reference, strict=True)
        else:
            notes.append(f"llama.cpp check skipped (llama-cpp-python is not installed): {llamacpp.INSTALL_HINT}")
        if qtype == "F32":
            Path(f32).replace(tmp)
        elif qtype in LLAMACPP_ONLY or (qtype == "Q8_0" and edge is not None):
            llamacpp.quantize(f32, tmp, qtype)  # llama.cpp's own quantizer, fallbacks included
        else:
            write_gguf(model, tokenizer, tmp, qtype, name=out.stem)
        quality = None
        if qtype == "F32":
            diff, verified_with = (edge or {}).get("max_abs_diff", f32_diff), reader
        elif edge is not None:
            # The quantized file is checked where it will run; a torch read-back would model neither llama.cpp's
            # fallback types' kernels nor its int8 activations, and costs a second full load.
            edge = {**_llamacpp_check(tmp, expected, ids, reference, strict=False), "f32_max_abs_diff": edge["max_abs_diff"]}
            diff, verified_with = edge["max_abs_diff"], reader
            quality = quantization_quality(f32, tmp, model, None, tokenizer, config.max_ppl_increase, True)
        else:
            verified_with, loaded = _read_back(tmp, model, arch, shapes)
            diff = _diff(loaded, ids, reference)
            quality = quantization_quality(f32, tmp, model, loaded, tokenizer, config.max_ppl_increase, False)
            del loaded
        if qtype not in ("F32", "F16"):
            notes += _fallback_note(tmp, qtype)
        if edge is not None:
            verified_with = f"{verified_with} and llama.cpp ({edge['version']})"
        params = count_parameters(model)
        info = {"name": out.stem, "format": "gguf", "architecture": arch, "layout": layout, "dtype": qtype.lower(),
                "parameters": params, "padding_overhead": _overhead(model, params, source_params, layout),
                "max_logit_diff_vs_source": diff, "loader": _gguf_loader(out.name, arch, model.config, shapes)}
        if edge is not None:
            info["llama.cpp"] = edge["version"]
            info["greedy_tokens_equal_to_source"] = f"{edge['greedy_match']}/{GREEDY_TOKENS}"
        if quality:
            info.update({"heldout_ppl_unquantized": quality["reference_ppl"], "heldout_ppl": quality["ppl"],
                         "heldout_ppl_change": f"{quality['increase']:+.2%}", "recommendation": quality["recommendation"]})
        info["checks"] = notes + ([quality["warning"]] if quality and quality["warning"] else []) or None
        card_text = render_card({**card, "export": {k: v for k, v in info.items() if v is not None}})
    card_path = out.with_suffix(".md")
    with atomic_file(card_path) as tmp_card:
        tmp_card.write_text(card_text)
    return ExportReport(str(out), "gguf", layout, qtype.lower(), params, source_params, params / source_params - 1,
                        dir_size(out), diff, verified_with, card_path.name, architecture=arch, llamacpp=edge,
                        quality=quality, notes=notes)


def _fallback_note(path: Path, qtype: str) -> list[str]:
    """Matrices left in f16 because their rows are not whole quantization blocks (32 values; llama.cpp's K-quants
    fall back to 32-value types below 256). Pruning causes this: 30% of SmolLM2's 1536 MLP channels leaves 1075,
    so every down_proj stays f16, which costs the file size and speed the prune was for."""
    from gguf import GGUFReader

    # t.shape is ggml's order: shape[0] is the row length
    rows = [int(t.shape[0]) for t in GGUFReader(str(path)).tensors if len(t.shape) == 2 and t.tensor_type.name == "F16"]
    if not rows:
        return []
    return [f"{len(rows)} matrices stay f16 in this {qtype.lower()} file: their rows of "
            f"{', '.join(map(str, sorted(set(rows))))} values are not whole 32-value quantization blocks; prune to a "
            "multiple of 32 MLP channels to quantize them"]


def _read_back(path: Path, model, arch: str, shapes):
    """(reader name, torch model) of a written GGUF: transformers' loader where it can read the file, else rora's."""
    from transformers import AutoModelForCausalLM

    from .gguf import read_gguf_model

    if _transformers_reads(arch, model.config, shapes):
        loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=str(path), dtype=torch.float32)
        return "transformers (gguf_file)", loaded
    return "rora's GGUF reader", read_gguf_model(path, model)


def _diff(loaded, ids, reference) -> float:
    return float((logits_on(loaded, ids, torch.float64) - reference).abs().max())


def _llamacpp_check(path: Path, expected: list[int], ids, reference, strict: bool) -> dict:
    """Run the file in llama.cpp: logits on the probe ids and greedy tokens, against the source model's
    (`reference` logits, `expected` greedy tokens after ids[0, :8])."""
    from . import llamacpp

    with llamacpp.Runner(path, n_ctx=ids.shape[1] + GREEDY_TOKENS) as runner:
        got = np.stack([runner.logits(row.tolist()) for row in ids])
        prompt = ids[0, :8].tolist()
        tokens = runner.greedy(prompt, GREEDY_TOKENS)
    diff = float(np.abs(got - reference.numpy()).max())
    match = next((i for i, (a, b) in enumerate(zip(tokens, expected)) if a != b), GREEDY_TOKENS)
    if strict and not diff <= LLAMACPP_TOLERANCE:
        raise ExportError(
            f"llama.cpp computes something else from the exported GGUF: max |logit difference| {diff:.3g} vs the "
            f"source model (above {LLAMACPP_TOLERANCE:g}); nothing was written. This is a bug: please report it with "
            "the model's `rora info`"
        )
    return {"version": llamacpp.version(), "max_abs_diff": diff, "greedy_match": match, "greedy_tokens": tokens,
            "source_greedy_tokens": expected}


@torch.no_grad()
def _greedy(model, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt])
    out = []
    for _ in range(n):
        nxt = int(logits_on(model, ids)[0, -1].argmax())
        out.append(nxt)
        ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return out


def heldout_chunks(tokenizer, length: int = 128, max_chunks: int = 4) -> list[list[int]]:
    """Token chunks of the packaged held-out prose (written for rora, so in no training set)."""
    ids = tokenizer(HELDOUT.read_text())["input_ids"]
    chunks = [ids[i:i + length] for i in range(0, len(ids) - 1, length)][:max_chunks]
    return [c for c in chunks if len(c) > 1]


def quantization_quality(reference_file, quantized_file, model, loaded, tokenizer, threshold: float,
                         use_llamacpp: bool) -> dict:
    """Held-out perplexity of the quantized export against the unquantized (f32) one, in llama.cpp when it is
    installed, else in torch from the dequantized weights (llama.cpp's int8 activations are then not modelled)."""
    from . import llamacpp

    chunks = heldout_chunks(tokenizer)
    if use_llamacpp:
        ref, got, engine = llamacpp.perplexity(reference_file, chunks), llamacpp.perplexity(quantized_file, chunks), "llama.cpp"
    else:
        ref, got, engine = _torch_ppl(model, chunks), _torch_ppl(loaded, chunks), "torch (dequantized weights)"
    increase = got / ref - 1
    name = Path(quantized_file).name
    warning = None
    if not increase <= threshold:
        warning = (f"quantization raises held-out perplexity by {increase:+.1%} ({ref:.4g} -> {got:.4g}), above "
                   f"{threshold:.0%}: this model does not survive this type well; deploy f16 or q8_0 instead")
        recommendation = "not recommended for deployment (see the perplexity change); export f16 or q8_0"
    else:
        recommendation = f"deploy this file: {increase:+.2%} held-out perplexity for its size"
    return {"engine": engine, "reference_ppl": ref, "ppl": got, "increase": increase, "threshold": threshold,
            "tokens": sum(len(c) - 1 for c in chunks), "warning": warning, "recommendation": recommendation,
            "file": name}


@torch.no_grad()
def _torch_ppl(model, chunks) -> float:
    from .llamacpp import nll

    return float(np.exp(np.mean([nll(logits_on(model, torch.tensor([c]))[0].numpy(), c) for c in chunks])))


def _gguf_loader(name: str, arch: str, cfg, shapes) -> str:
    text = f"llama.cpp: `llama-cli -m {name}` (architecture {arch}"
    text += ", per-layer head counts and FFN widths)." if arch == "deci" else ")."
    if _transformers_reads(arch, cfg, shapes):
        text += f" transformers: `AutoModelForCausalLM.from_pretrained(folder, gguf_file=\"{name}\")` (dequantized on load)."
    else:
        text += " transformers' GGUF loader cannot read it; for transformers export `--format hf`."
    return text
