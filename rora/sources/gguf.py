"""Reading GGUF files: the architecture tag, the source tokenizer keys a model loaded from a GGUF keeps, and the
torch model a Llama-family GGUF written by rora (or quantized from one by llama.cpp) holds.

The file-format facts both directions need live here (the writer, rora.deployment.gguf_file, imports them): which GGUF
architecture a model type is written as, and llama.cpp's permutation of the q/k rows for its RoPE layout.
"""
from __future__ import annotations

import copy
import dataclasses
import struct
from pathlib import Path

import numpy as np
import torch

from ..architecture import LAYER_SHAPES_KEY, LayerShape, build_from_state_dict, sync_config, weights_problems
from ..errors import ModelLoadError, detail

GGUF_TOKENIZER_KEY = "rora_gguf_tokenizer"
# model_type -> (GGUF architecture, whether q/k rows are permuted for llama.cpp's RoPE), as convert_hf_to_gguf.py
GGUF_ARCHS = {"llama": ("llama", True), "mistral": ("llama", True), "qwen2": ("qwen2", False)}


def open_gguf(path: str | Path):
    """A GGUFReader of `path`, after checking that the header's counts of keys and tensors fit in the file (the
    reader would loop over 10^12 of them first); ModelLoadError for a file that is no readable GGUF."""
    from gguf import GGUFReader

    size = Path(path).stat().st_size
    with open(path, "rb") as f:
        head = f.read(24)
    if len(head) < 24 or head[:4] != b"GGUF":
        raise ModelLoadError(f"{path} is not a readable GGUF file (no GGUF header)")
    order = "<" if struct.unpack("<I", head[4:8])[0] < 2**16 else ">"  # the reader accepts both byte orders
    n_tensors, n_kv = struct.unpack(order + "QQ", head[8:24])
    if 24 + 8 * n_kv + 24 * n_tensors > size:  # every key and every tensor takes at least that many bytes
        raise ModelLoadError(f"{path} is corrupt: its header declares {n_kv} keys and {n_tensors} tensors, more than "
                             f"its {size} bytes can hold")
    try:
        return GGUFReader(str(path))
    except Exception as exc:  # the gguf reader raises plain ValueError/struct errors on bad files
        raise ModelLoadError(f"{path} is not a readable GGUF file: {detail(exc)}") from None


def gguf_architecture(path: str | Path) -> str:
    """The `general.architecture` of a GGUF file (ModelLoadError for a file that is not one)."""
    field = open_gguf(path).fields.get("general.architecture")
    if field is None:
        raise ModelLoadError(f"{path} has no general.architecture field; is it a GGUF model?")
    return bytes(field.parts[field.data[0]]).decode()


# GGUF tensor names -> the Llama-family names weights_problems compares with what the file declares
_GGUF_NAMES = {"token_embd": "model.embed_tokens", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
               "ffn_up": "mlp.up_proj"}


def check_gguf(path: str | Path) -> None:
    """What a Llama-family GGUF declares (layers, heads, widths) against its tensors' shapes, before a model is
    built from it (see architecture.weights_problems); ModelLoadError naming the file otherwise."""
    reader = open_gguf(path)
    meta = {k: _plain(f.contents()) for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.")}
    arch = meta.get("general.architecture")
    needed = [f"{arch}.{k}" for k in ("block_count", "embedding_length", "attention.head_count", "feed_forward_length")]
    missing = [k for k in needed if k not in meta]
    if missing:
        raise ModelLoadError(f"{path} lacks the GGUF keys {', '.join(missing)}; is it a complete model file?")
    tensors = {_hf_name(t.name): tuple(int(d) for d in reversed(t.shape)) for t in reader.tensors}  # ggml: innermost first
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    heads = meta[needed[2]]
    config = {"model_type": "qwen2" if arch == "qwen2" else "llama", "num_hidden_layers": meta[needed[0]],
              "hidden_size": meta[needed[1]], "num_attention_heads": _largest(heads),
              "num_key_value_heads": _largest(meta.get(f"{arch}.attention.head_count_kv", heads)),
              "intermediate_size": _largest(meta[needed[3]]), "head_dim": meta.get(f"{arch}.attention.key_length"),
              "vocab_size": len(tokens.data) if tokens is not None else tensors.get("model.embed_tokens.weight", (0,))[0]}
    if any(isinstance(meta[k], list) for k in needed[2:]):  # per-layer counts
        try:
            config[LAYER_SHAPES_KEY] = [dataclasses.asdict(s) for s in read_layer_shapes(meta)]
        except (TypeError, ValueError) as exc:
            raise ModelLoadError(f"{path} has malformed per-layer counts: {detail(exc)}") from None
    problems = weights_problems(config, tensors)
    if problems:
        raise ModelLoadError(f"{path} does not describe its tensors: {problems[0]}")


def _hf_name(name: str) -> str:
    """blk.3.attn_q.weight -> model.layers.3.self_attn.q_proj.weight; names weights_problems does not compare stay."""
    stem, _, suffix = name.rpartition(".")
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _GGUF_NAMES:
        return f"model.layers.{parts[1]}.{_GGUF_NAMES[parts[2]]}.{suffix}"
    return f"{_GGUF_NAMES[stem]}.{suffix}" if stem == "token_embd" else name


def _plain(value):
    """A GGUF field's contents as plain Python values (the reader gives numpy scalars)."""
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value.item() if hasattr(value, "item") else value


def _largest(value):
    return max(value) if isinstance(value, list) and value else value


def source_tokenizer_keys(path: str | Path) -> dict:
    """A GGUF file's scalar `tokenizer.*` keys (pre-tokenizer tag, special ids, flags, chat template), to record in
    the config of a model loaded from it. The token, type and merge arrays are rebuilt from the tokenizer."""
    from gguf import GGUFValueType

    reader = open_gguf(path)
    keys = {}
    for key, field in reader.fields.items():
        if key.startswith("tokenizer.") and field.types and field.types[0] != GGUFValueType.ARRAY:
            value = field.contents()
            keys[key] = value.item() if hasattr(value, "item") else value
    return keys


def permuted_heads(base: str, shapes: list[LayerShape]) -> int | None:
    """How many heads of this layer's q or k projection to permute (None: not a q/k projection)."""
    if not base.endswith(("self_attn.q_proj", "self_attn.k_proj")):
        return None
    shape = shapes[int(base.split(".layers.")[1].split(".")[0])]
    return shape.q_heads if base.endswith("q_proj") else shape.kv_heads


def permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's RoPE layout (convert_hf_to_gguf.py LlamaModel.permute); transformers undoes it on load."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_metadata(path: str | Path) -> dict:
    """The scalar and small-array keys of a GGUF file (not the vocabulary), and its tensors' GGML types."""
    reader = open_gguf(path)
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.") or len(f.data) < 64}
    meta["tensor_types"] = {t.name: t.tensor_type.name for t in reader.tensors}
    return meta


def read_layer_shapes(meta: dict) -> list[LayerShape]:
    """Per-layer shapes as a GGUF file declares them (a scalar means every layer alike)."""
    arch = meta["general.architecture"]
    n = int(meta[f"{arch}.block_count"])

    def each(key):
        value = meta[f"{arch}.{key}"]
        return [int(v) for v in value] if isinstance(value, list) else [int(value)] * n

    return [LayerShape(q, kv, ff) for q, kv, ff in
            zip(each("attention.head_count"), each("attention.head_count_kv"), each("feed_forward_length"))]


def read_gguf_model(path: str | Path, like):
    """The torch model a GGUF file written by `write_gguf` (or quantized from one by llama.cpp) holds, built on a
    copy of `like`'s config: tensors dequantized, q/k rows un-permuted, layer shapes from the file's own keys.

    This verifies the file's contents where transformers' GGUF loader cannot read it (deci, head counts that do
    not divide hidden_size); what llama.cpp computes from it is checked separately (rora.deployment.llamacpp)."""
    import gguf

    meta = gguf_metadata(path)
    arch = meta["general.architecture"]
    shapes = read_layer_shapes(meta)
    config = copy.deepcopy(like.config)
    config.head_dim = int(meta[f"{arch}.attention.key_length"])
    config.num_hidden_layers = len(shapes)
    sync_config(config, shapes)
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.upper()), len(shapes))
    hf_names = {}
    for hf_name in like.state_dict():
        base, suffix = hf_name.rsplit(".", 1)
        hf_names[f"{names.get_name(base)}.{suffix}"] = hf_name
    rope_rows = GGUF_ARCHS[config.model_type][1]
    state = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        if t.name not in hf_names:
            raise ModelLoadError(f"{path}: unexpected tensor {t.name}")
        data = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))
        hf_name = hf_names[t.name]
        heads = permuted_heads(hf_name.rsplit(".", 1)[0], shapes) if rope_rows else None
        state[hf_name] = unpermute(data, heads) if heads else data
    return build_from_state_dict(config, state)
