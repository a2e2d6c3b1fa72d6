"""GGUF files for llama.cpp: the writer (the reader is rora.sources.gguf).

Writer: tensors named by the gguf package's own name map, q/k rows permuted for llama.cpp's RoPE layout, the
byte-level BPE vocabulary, merges and token types, as llama.cpp's convert_hf_to_gguf.py writes them. Head counts,
KV head counts and FFN widths come from the weights (architecture.layer_shapes), never from the config, whose head
count is a stand-in when the real one does not divide hidden_size (architecture.sync_config).

Architectures (read in llama.cpp 0c1e57098, src/models/*.cpp):
  llama  uniform layers. llama.cpp builds every layer from layer 0's head count and FFN size (LLAMA_LOAD_LOCALS),
         so a non-uniform model must be zero-padded first (--layout padded). transformers' GGUF loader reads it.
  deci   non-uniform (--layout compact): the same network and RoPE, but `deci.attention.head_count`,
         `head_count_kv` and `feed_forward_length` are per-layer arrays (hparams.n_head(il) etc. in deci.cpp).
         llama.cpp reads it; transformers' GGUF loader has no deci support.
  qwen2  uniform only: llama.cpp's qwen2 builds every layer alike, and deci has no NEOX-RoPE/bias variant.

Tokenizer: a model that came from a GGUF carries that file's scalar `tokenizer.*` keys in its config (the key
below, recorded by rora.models.load_gguf and kept by every stage's saved config); they override what rora derives
from the rebuilt tokenizer. This matters: transformers rebuilds SmolLM2's tokenizer without its Digits split, so
the derived pre-tokenizer tag is gpt-2 where the source says smollm, and llama.cpp then cleans up spaces when it
detokenises ("Hello , world ." -> "Hello, world."). The token list, types and merges are rebuilt from the tokenizer;
for SmolLM2 they equal the source file's entry for entry.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..architecture import LayerShape, head_dim, is_uniform, layer_shapes
from ..errors import ExportError
from ..sources.gguf import GGUF_ARCHS, GGUF_TOKENIZER_KEY, permute, permuted_heads

# The gguf dtypes of rora.registry.EXPORT_FORMATS, aliases included (tests/test_registry.py checks they agree) -> GGML
# file type name. The K-quants are llama.cpp's own quantizer only.
GGUF_DTYPES = {"f32": "F32", "float32": "F32", "f16": "F16", "float16": "F16", "q8_0": "Q8_0",
               "q6_k": "Q6_K", "q5_k_m": "Q5_K_M", "q4_k_m": "Q4_K_M"}
LLAMACPP_ONLY = ("Q6_K", "Q5_K_M", "Q4_K_M")


def gguf_arch(cfg, shapes: list[LayerShape]) -> str:
    """The GGUF architecture that runs `shapes` unpadded in llama.cpp (see the module docstring)."""
    arch, _ = GGUF_ARCHS[cfg.model_type]
    if is_uniform(shapes):
        return arch
    if arch != "llama":
        raise ExportError(
            f"llama.cpp cannot run a non-uniform {cfg.model_type} model compact (its {arch} architecture builds every "
            "layer alike, and deci, which reads per-layer shapes, is Llama-only): pass --layout padded"
        )
    return "deci"


def write_gguf(model, tokenizer, path: str | Path, qtype: str = "F32", name: str = "model") -> str:
    """Write a Llama-family `model` and its byte-level BPE `tokenizer` as a GGUF file; returns the architecture.

    `qtype` is F32, F16 or Q8_0 (the types the gguf package writes itself); non-uniform models get the deci
    architecture with per-layer head counts and FFN widths."""
    import gguf

    cfg = model.config
    shapes = layer_shapes(model)
    arch = gguf_arch(cfg, shapes)
    rope_rows = GGUF_ARCHS[cfg.model_type][1]
    uniform = is_uniform(shapes)
    writer = gguf.GGUFWriter(str(path), arch)
    hd = head_dim(cfg)
    rope = getattr(cfg, "rope_parameters", None) or {}
    writer.add_name(name)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(len(shapes))
    per_layer = (lambda f: f(shapes[0])) if uniform else (lambda f: [f(s) for s in shapes])
    writer.add_feed_forward_length(per_layer(lambda s: s.intermediate))
    writer.add_head_count(per_layer(lambda s: s.q_heads))
    writer.add_head_count_kv(per_layer(lambda s: s.kv_heads))
    writer.add_rope_dimension_count(hd)
    writer.add_key_length(hd)  # llama.cpp assumes hidden/heads otherwise, which pruning breaks
    writer.add_value_length(hd)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type({"F32": gguf.LlamaFileType.ALL_F32, "F16": gguf.LlamaFileType.MOSTLY_F16,
                          "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[qtype])
    _add_tokenizer(writer, tokenizer, cfg.vocab_size, getattr(cfg, GGUF_TOKENIZER_KEY, None) or {})
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.upper()), len(shapes))
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp omits output.weight for tied embeddings; readers tie them back
        base, suffix = hf_name.rsplit(".", 1)
        gguf_name = names.get_name(base)
        if gguf_name is None:
            raise ExportError(f"no GGUF name for tensor {hf_name}; GGUF export supports plain Llama-family models")
        data = tensor.detach().float().cpu()
        heads = permuted_heads(base, shapes) if rope_rows else None
        if heads:
            data = permute(data, heads)
        _add_tensor(writer, f"{gguf_name}.{suffix}", data.numpy(), qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return arch


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


def _add_tokenizer(writer, tokenizer, vocab_size: int, source_keys: dict) -> None:
    """The vocabulary the way convert_hf_to_gguf.py writes a gpt2-style (byte-level BPE) tokenizer; the scalar
    keys of the GGUF the model came from, when recorded, win over the derived ones."""
    import gguf

    if tokenizer is None:
        raise ExportError("GGUF export needs the model's tokenizer (GGUF files carry their vocabulary)")
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
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
    K = gguf.Keys.Tokenizer
    scalars = {K.MODEL: "gpt2"}
    if "tokenizer.ggml.pre" not in source_keys:  # the source's tag is authoritative, even where we could not derive one
        scalars[K.PRE] = pre_tokenizer_name(backend)
    ids = {"bos": K.BOS_ID, "eos": K.EOS_ID, "unk": K.UNK_ID, "pad": K.PAD_ID}
    for kind, key in ids.items():
        token_id = getattr(tokenizer, f"{kind}_token_id", None)
        if token_id is not None:
            scalars[key] = int(token_id)
    probe = tokenizer("a")["input_ids"]
    scalars[K.ADD_BOS] = bool(probe) and probe[0] == tokenizer.bos_token_id
    scalars[K.ADD_EOS] = bool(probe) and probe[-1] == tokenizer.eos_token_id
    if getattr(tokenizer, "chat_template", None):
        scalars[K.CHAT_TEMPLATE] = tokenizer.chat_template
    scalars.update(source_keys)
    for key, value in scalars.items():
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        else:
            writer.add_string(key, str(value))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in backend["model"]["merges"]])


def pre_tokenizer_name(backend: dict) -> str:
    """llama.cpp's name for how the text is split before BPE; refuse splits no GGUF reader would reproduce."""
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS
    except ImportError:  # transformers before 5.2x reads no split-regex pre-tokenizer back: refuse those exports
        GGUF_PRE_TOKENIZER_SPLITS = {}

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


