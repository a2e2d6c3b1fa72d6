"""Deployment export: a Hugging Face safetensors directory or a GGUF file, each with a model card.

hf    uniform layers: a standard config that plain `transformers.AutoModelForCausalLM.from_pretrained` loads.
      non-uniform, layout=padded: heads and MLP channels zero-padded to one shape (structure.pad_layer), so the
      model computes the same function and loads anywhere, at a size overhead that is reported.
      non-uniform, layout=compact: the smallest weights, per-layer shapes in the config; only `rora.load_model`
      rebuilds it (plain transformers cannot).
gguf  the llama architecture (qwen2 for Qwen2) as llama.cpp's convert_hf_to_gguf.py writes it: tensor names from
      the gguf package's own name map, q/k rows permuted for llama.cpp's RoPE layout, the byte-level BPE
      vocabulary, merges and token types. dtype f32 | f16 | q8_0. llama.cpp can read per-layer head counts, but
      transformers' GGUF loader cannot, so non-uniform models need --layout padded.

Every export is verified before it is kept: the written model is loaded back (plain transformers where the
format promises that) and its logits on fixed probe inputs are compared with the source model's; in fp32 a
difference above `ExportConfig.tolerance` is an ExportError and nothing is written.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..artifacts import atomic_dir, atomic_file, check_output, count_parameters, dir_size, save_model_dir, write_manifest
from ..config import ExportConfig
from ..errors import ExportError
from ..models import resolve_dtype
from ..pruning.structure import check_supported, head_dim, is_uniform, layer_shapes, pad_layer, padded_shape, sync_config
from ..recovery.merge import cast_parameters, logits_on, probe_inputs
from .card import render_card

MANIFEST = "rora_export.json"
# --dtype names (checked by ExportConfig) -> GGML tensor type
GGUF_DTYPES = {"f32": "F32", "float32": "F32", "f16": "F16", "float16": "F16", "q8_0": "Q8_0"}
# model_type -> (GGUF architecture, whether q/k rows are permuted for llama.cpp's RoPE), as convert_hf_to_gguf.py
GGUF_ARCHS = {"llama": ("llama", True), "mistral": ("llama", True), "qwen2": ("qwen2", False)}


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
        if not uniform and config.layout == "compact":
            problems.append(
                "this model's layers have different shapes; llama.cpp reads per-layer head counts but transformers' "
                "GGUF loader cannot, so rora writes uniform GGUF only: pass --layout padded (zero-padded, same outputs)"
            )
        problems += _gguf_model_problems(model.config)
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

def _gguf_model_problems(cfg) -> list[str]:
    problems = []
    if cfg.model_type not in GGUF_ARCHS:
        problems.append(f"GGUF export supports {', '.join(GGUF_ARCHS)}, not {cfg.model_type!r}; use --format hf")
    rope = getattr(cfg, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        problems.append(f"GGUF export writes plain RoPE only; this model uses rope_type {rope['rope_type']!r}: use --format hf")
    if cfg.model_type == "qwen2" and head_dim(cfg) != cfg.hidden_size // cfg.num_attention_heads:
        problems.append(
            "transformers' GGUF loader derives a qwen2 head size from hidden_size / heads, which pruning changed; "
            "use --format hf"
        )
    return problems


def _write_gguf(model, tokenizer, config, out, overwrite, layout, source_params, ids, reference, card) -> ExportReport:
    from transformers import AutoModelForCausalLM

    qtype = GGUF_DTYPES[config.dtype]
    with atomic_file(out) as tmp:
        write_gguf(model, tokenizer, tmp, qtype, name=out.stem)
        loaded = AutoModelForCausalLM.from_pretrained(str(tmp.parent), gguf_file=str(tmp), dtype=torch.float32)
        diff = _verify(loaded, ids, reference, config, qtype == "F32", f"GGUF ({qtype})")
        del loaded
        params = count_parameters(model)
        loader = (
            "llama.cpp: `llama-cli -m " + out.name + "`. transformers: "
            f"`AutoModelForCausalLM.from_pretrained(folder, gguf_file=\"{out.name}\")` (dequantized on load)."
        )
        info = {"name": out.stem, "format": "gguf", "layout": layout, "dtype": qtype.lower(), "parameters": params,
                "padding_overhead": _overhead(model, params, source_params, layout),
                "max_logit_diff_vs_source": diff, "loader": loader}
        card_text = render_card({**card, "export": {k: v for k, v in info.items() if v is not None}})
    card_path = out.with_suffix(".md")
    with atomic_file(card_path) as tmp_card:
        tmp_card.write_text(card_text)
    return ExportReport(str(out), "gguf", layout, qtype.lower(), params, source_params, params / source_params - 1,
                        dir_size(out), diff, "transformers (gguf_file)", card_path.name)


def write_gguf(model, tokenizer, path: str | Path, qtype: str = "F32", name: str = "model") -> None:
    """Write a uniform Llama-family `model` and its byte-level BPE `tokenizer` as a GGUF file at `path`."""
    import gguf

    cfg = model.config
    arch, permute = GGUF_ARCHS[cfg.model_type]
    writer = gguf.GGUFWriter(str(path), arch)
    hd = head_dim(cfg)
    rope = getattr(cfg, "rope_parameters", None) or {}
    writer.add_name(name)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(hd)
    writer.add_key_length(hd)  # llama.cpp assumes hidden/heads otherwise, which pruning breaks
    writer.add_value_length(hd)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type({"F32": gguf.LlamaFileType.ALL_F32, "F16": gguf.LlamaFileType.MOSTLY_F16,
                          "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[qtype])
    _add_tokenizer(writer, tokenizer, cfg.vocab_size)
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.upper()), cfg.num_hidden_layers)
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp omits output.weight for tied embeddings; readers tie them back
        base, suffix = hf_name.rsplit(".", 1)
        gguf_name = names.get_name(base)
        if gguf_name is None:
            raise ExportError(f"no GGUF name for tensor {hf_name}; GGUF export supports plain Llama-family models")
        data = tensor.detach().float().cpu()
        if permute and base.endswith("self_attn.q_proj"):
            data = _permute(data, cfg.num_attention_heads, cfg.num_attention_heads)
        elif permute and base.endswith("self_attn.k_proj"):
            data = _permute(data, cfg.num_attention_heads, cfg.num_key_value_heads)
        _add_tensor(writer, f"{gguf_name}.{suffix}", data.numpy(), qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _permute(w: torch.Tensor, n_head: int, n_head_kv: int) -> torch.Tensor:
    """llama.cpp's RoPE layout (convert_hf_to_gguf.py LlamaModel.permute); transformers undoes it on load."""
    if n_head_kv != n_head:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _add_tensor(writer, name: str, data: np.ndarray, qtype: str) -> None:
    import gguf

    Q = gguf.GGMLQuantizationType
    # As llama.cpp does: norms and biases stay f32; q8_0 needs rows in whole 32-value blocks, else f16.
    if data.ndim == 1 or qtype == "F32":
        writer.add_tensor(name, data.astype(np.float32))
    elif qtype == "Q8_0" and data.shape[-1] % gguf.GGML_QUANT_SIZES[Q.Q8_0][0] == 0:
        writer.add_tensor(name, gguf.quants.quantize(data.astype(np.float32), Q.Q8_0), raw_dtype=Q.Q8_0)
    else:
        writer.add_tensor(name, data.astype(np.float16))


def _add_tokenizer(writer, tokenizer, vocab_size: int) -> None:
    """The vocabulary the way convert_hf_to_gguf.py writes a gpt2-style (byte-level BPE) tokenizer."""
    import gguf

    if tokenizer is None:
        raise ExportError("GGUF export needs the model's tokenizer (GGUF files carry their vocabulary)")
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    pre = _pre_tokenizer_name(backend)
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise ExportError(f"the tokenizer has ids up to {max(vocab.values())} but the model's vocabulary is {vocab_size}")
    by_id = {i: t for t, i in vocab.items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")  # the model has more rows than the tokenizer has tokens
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(added[i].content)
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in backend["model"]["merges"]])
    for kind in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{kind}_token_id", None)
        if token_id is not None:
            getattr(writer, f"add_{kind}_token_id")(token_id)
    probe = tokenizer("a")["input_ids"]
    writer.add_add_bos_token(bool(probe) and probe[0] == tokenizer.bos_token_id)
    writer.add_add_eos_token(bool(probe) and probe[-1] == tokenizer.eos_token_id)
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)


def _pre_tokenizer_name(backend: dict) -> str:
    """llama.cpp's name for how the text is split before BPE; refuse splits no GGUF reader would reproduce."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    model, pre = backend.get("model") or {}, backend.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if model.get("type") == "BPE" and kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and model.get("type") == "BPE":
        pattern = (steps[0].get("pattern") or {}).get("Regex")
        for name, regex in GGUF_PRE_TOKENIZER_SPLITS.items():
            if regex == pattern:
                return name
    raise ExportError(
        f"GGUF export writes byte-level BPE tokenizers (gpt2 style); this one ({model.get('type')} model, "
        f"pre-tokenizer {'+'.join(map(str, kinds))}) has no GGUF equivalent rora can vouch for: use --format hf"
    )
