"""Reading GGUF files: the architecture tag, the source tokenizer keys a model loaded from a GGUF keeps, and the
torch model a Llama-family GGUF written by rora (or quantized from one by llama.cpp) holds.

The file-format facts both directions need live here (the writer, rora.deployment.gguf_file, imports them): which GGUF
architecture a model type is written as, and llama.cpp's permutation of the q/k rows for its RoPE layout.
"""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch

from ..architecture import LayerShape, build_from_state_dict, sync_config
from ..errors import ModelLoadError

GGUF_TOKENIZER_KEY = "rora_gguf_tokenizer"
# model_type -> (GGUF architecture, whether q/k rows are permuted for llama.cpp's RoPE), as convert_hf_to_gguf.py
GGUF_ARCHS = {"llama": ("llama", True), "mistral": ("llama", True), "qwen2": ("qwen2", False)}


def gguf_architecture(path: str | Path) -> str:
    """The `general.architecture` of a GGUF file (ModelLoadError for a file that is not one)."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except Exception as exc:  # the gguf reader raises plain ValueError/struct errors on bad files
        raise ModelLoadError(f"{path} is not a readable GGUF file: {exc}") from None
    field = reader.fields.get("general.architecture")
    if field is None:
        raise ModelLoadError(f"{path} has no general.architecture field; is it a GGUF model?")
    return bytes(field.parts[field.data[0]]).decode()


def source_tokenizer_keys(path: str | Path) -> dict:
    """A GGUF file's scalar `tokenizer.*` keys (pre-tokenizer tag, special ids, flags, chat template), to record in
    the config of a model loaded from it. The token, type and merge arrays are rebuilt from the tokenizer."""
    from gguf import GGUFReader, GGUFValueType

    reader = GGUFReader(str(path))
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
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
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
