"""The GGUF export: an f32 file checked exactly, then the requested type (written here, or quantized by llama.cpp),
verified in llama.cpp when it is installed, and a quantized file's held-out perplexity against the f32 one."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..architecture import head_dim, layer_shapes
from ..artifacts import atomic_file, count_parameters, dir_size, write_stage_manifest
from ..errors import ExportError
from ..numerics import logits_on
from ..sources.gguf import GGUF_ARCHS, read_gguf_model
from . import llamacpp
from .card import render_card
from .common import ExportReport, logit_diff, padding_note, verify_logits
from .gguf_file import GGUF_DTYPES, LLAMACPP_ONLY, gguf_arch, write_gguf

LLAMACPP_TOLERANCE = 2e-3
GREEDY_TOKENS = 16
HELDOUT = Path(__file__).with_name("heldout.txt")


def gguf_model_problems(cfg, shapes, layout: str, qtype: str) -> list[str]:
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
    hidden_size / heads, builds a LlamaConfig, which refuses a head count that does not divide hidden_size, and
    drops a llama file's bias tensors (a reconstructed model's output biases)."""
    heads = shapes[0].q_heads
    biases = arch == "llama" and (getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False))
    return arch in ("llama", "qwen2") and cfg.hidden_size % heads == 0 and not biases and (
        arch == "llama" or head_dim(cfg) == cfg.hidden_size // heads)


def write_gguf_export(model, tokenizer, config, out, overwrite, layout, source_params, ids, reference, card,
                      source) -> ExportReport:
    qtype = GGUF_DTYPES[config.dtype]
    shapes = layer_shapes(model)
    notes = []
    with atomic_file(out) as tmp:
        # Always an f32 file first: it is checked exactly, and it is the unquantized reference of the quality check.
        # It is a work file of the export's marked staging directory, so a killed export leaves nothing unmarked.
        f32 = tmp.with_name(f"f32-{out.name}")
        arch = write_gguf(model, tokenizer, f32, "F32", name=out.stem)
        reader, f32_model = _read_back(f32, model, arch, shapes)
        f32_diff = verify_logits(f32_model, ids, reference, config, True, f"GGUF ({arch}, F32) read back by {reader}")
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
            diff = logit_diff(loaded, ids, reference)
            quality = quantization_quality(f32, tmp, model, loaded, tokenizer, config.max_ppl_increase, False)
            del loaded
        if qtype not in ("F32", "F16"):
            notes += _fallback_note(tmp, qtype)
        if edge is not None:
            verified_with = f"{verified_with} and llama.cpp ({edge['version']})"
        params = count_parameters(model)
        info = {"name": out.stem, "format": "gguf", "architecture": arch, "layout": layout, "dtype": qtype.lower(),
                "parameters": params, "padding_overhead": padding_note(model, params, source_params, layout),
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
    report = ExportReport(str(out), "gguf", layout, qtype.lower(), params, source_params, params / source_params - 1,
                          dir_size(out), diff, verified_with, card_path.name, architecture=arch, llamacpp=edge,
                          quality=quality, notes=notes)
    write_stage_manifest(out, "export", {"model": source}, config.to_dict(), report.to_dict())  # NAME.rora.json
    return report


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

    if _transformers_reads(arch, model.config, shapes):
        # gguf_file is a name inside the folder: a relative folder given twice would name another file
        loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
        return "transformers (gguf_file)", loaded
    return "rora's GGUF reader", read_gguf_model(path, model)


def _llamacpp_check(path: Path, expected: list[int], ids, reference, strict: bool) -> dict:
    """Run the file in llama.cpp: logits on the probe ids and greedy tokens, against the source model's
    (`reference` logits, `expected` greedy tokens after ids[0, :8])."""
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
