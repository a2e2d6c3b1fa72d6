"""The Llama-family layout, in one place: attention heads and KV groups, MLP channels, biases, config sync.

Supported: Llama (multi-head and grouped-query), Mistral, Qwen2 (biases on q/k/v). Every decoder layer has
`self_attn.{q,k,v,o}_proj` and `mlp.{gate,up,down}_proj`; the hidden size, embeddings, norms and lm_head are never
touched, so RoPE stays valid as long as whole heads (head_dim rows each) are removed.

Per-layer shapes may differ after non-uniform pruning. A uniform model gets a standard config that plain
transformers loads; a non-uniform one keeps the shared fields at their maximum and lists every layer's shape under
`rora_layer_shapes`, which `rora.load_model` uses to rebuild the modules before loading the weights strictly.
A uniform Llama whose head count does not divide hidden_size is listed the same way: transformers 5's LlamaConfig
refuses such a config, so no standard config can describe it.
"""
from __future__ import annotations

import functools
import inspect
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .errors import ModelLoadError, ModelShapeError, PruningError, UnsupportedModelError

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")
ATTENTION_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJ = ("gate_proj", "up_proj", "down_proj")
LAYER_SHAPES_KEY = "rora_layer_shapes"


@dataclass(frozen=True)
class LayerShape:
    """The prunable sizes of one decoder layer."""

    q_heads: int
    kv_heads: int
    intermediate: int

    @property
    def group_size(self) -> int:
        return self.q_heads // self.kv_heads


@functools.cache
def _cache_keyword() -> str:
    from transformers import LlamaModel

    return "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"


def cache_argument(cache) -> dict:
    """The keyword argument that hands a KV cache to a decoder's forward or to generate: `cache` in the transformers
    rora is developed on, `past_key_values` in earlier 5.x releases (5.17, the GPU machines' image), which would
    otherwise take `cache` as an unknown keyword and run without it."""
    return {_cache_keyword(): cache}


def check_supported(config) -> None:
    """Raise UnsupportedModelError unless `config.model_type` is a Llama-family type we can rebuild."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(
            f"architecture {model_type!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def decoder_layers(model) -> nn.ModuleList:
    """The decoder layers of a causal LM (or of a PEFT-wrapped one)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.model.layers


def layer_shapes(model) -> list[LayerShape]:
    """Each layer's shape as its weights say (not as the config claims)."""
    hd = head_dim(model.config)
    shapes = []
    for layer in decoder_layers(model):
        attn, mlp = layer.self_attn, layer.mlp
        shapes.append(
            LayerShape(
                q_heads=_weight(attn.q_proj).shape[0] // hd,
                kv_heads=_weight(attn.k_proj).shape[0] // hd,
                intermediate=_weight(mlp.up_proj).shape[0],
            )
        )
    return shapes


def config_layer_shapes(config) -> list[LayerShape]:
    """Each layer's shape as the config says: `rora_layer_shapes` when present, else the uniform fields."""
    listed = getattr(config, LAYER_SHAPES_KEY, None)
    if listed:
        if len(listed) != config.num_hidden_layers:
            raise UnsupportedModelError(
                f"config lists {len(listed)} layer shapes for {config.num_hidden_layers} layers; the config is corrupt"
            )
        return [LayerShape(**s) for s in listed]
    uniform = LayerShape(config.num_attention_heads, config.num_key_value_heads, config.intermediate_size)
    return [uniform] * config.num_hidden_layers


def weights_problems(config: dict, tensors: dict[str, tuple] | None) -> list[str]:
    """What in a Llama-family config (a dict, as config.json holds it) is impossible or contradicts the weights
    (`tensors`: name -> shape, from the weight files' headers; None: the config alone), found before anything is
    built: a config that claims 10^7 layers or 0 heads is refused instead of allocating or dividing by zero. Other
    architectures pass (check_supported names them where it matters)."""
    if config.get("model_type") not in SUPPORTED_ARCHITECTURES:
        return []
    counts = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
    bad = [f"{k} must be a positive integer, got {config.get(k)!r:.40}" for k in counts
           if type(config.get(k)) is not int or config[k] <= 0]
    if bad:
        return bad
    n, hidden = config["num_hidden_layers"], config["hidden_size"]
    listed = config.get(LAYER_SHAPES_KEY)
    try:
        shapes = [LayerShape(**s) for s in listed] if listed else [LayerShape(
            config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"],
            config["intermediate_size"])]
    except TypeError:
        return [f"{LAYER_SHAPES_KEY} is not a list of {{q_heads, kv_heads, intermediate}}"]
    if listed and len(shapes) != n:
        return [f"it lists {len(shapes)} layer shapes for num_hidden_layers {n}"]
    hd = config.get("head_dim") or hidden // config["num_attention_heads"]
    problems = [f"a layer has {s.q_heads!r:.20} query heads over {s.kv_heads!r:.20} KV heads and {s.intermediate!r:.20} "
                "MLP channels (positive integers, the heads a multiple of the KV heads)"
                for s in shapes if not _valid_shape(s)][:1]
    if type(hd) is not int or hd <= 0:
        problems.append(f"head_dim must be a positive integer, got {hd!r:.40}")
    if problems or tensors is None:
        return problems
    found = {int(k.split(".")[2]) for k in tensors if k.startswith("model.layers.") and k.split(".")[2].isdigit()}
    if found != set(range(n)):
        return [f"num_hidden_layers is {n} but the weights hold {len(found)} layers"]
    expected = {"model.embed_tokens.weight": (config["vocab_size"], hidden)}
    for i in range(n):
        s = shapes[i] if listed else shapes[0]
        expected.update({f"model.layers.{i}.self_attn.q_proj.weight": (s.q_heads * hd, hidden),
                         f"model.layers.{i}.self_attn.k_proj.weight": (s.kv_heads * hd, hidden),
                         f"model.layers.{i}.mlp.up_proj.weight": (s.intermediate, hidden)})
    return [f"{name} is {list(tensors.get(name) or ())} in the weights but {list(shape)} by the config"
            for name, shape in expected.items() if tuple(tensors.get(name) or ()) != shape][:1]


def _valid_shape(s: LayerShape) -> bool:
    return all(type(v) is int and v > 0 for v in (s.q_heads, s.kv_heads, s.intermediate)) and s.q_heads % s.kv_heads == 0


def module_problems(model, hd: int) -> list[str]:
    """What in a Llama-family model's modules contradicts itself, read from the weights alone (the config may be
    stale): every projection's widths against the hidden size (the embedding's width) and its partners, whole heads
    of `hd` rows, query heads a multiple of the KV heads, RoPE's frequencies against `hd`. A pruner that left any
    of these inconsistent made a model that no config describes; every problem is listed, one per layer."""
    hidden = model.get_input_embeddings().weight.shape[1]
    problems = []
    rotary = getattr(getattr(getattr(model, "model", None), "rotary_emb", None), "inv_freq", None)
    if rotary is not None and rotary.numel() * 2 != hd:
        problems.append(f"RoPE rotates {rotary.numel() * 2} dimensions per head but the heads are {hd} wide "
                        "(head dimensions were pruned; rora keeps whole heads only)")
    for i, layer in enumerate(decoder_layers(model)):
        attn, mlp = layer.self_attn, layer.mlp
        q, k, v, o = (_weight(getattr(attn, n)) for n in ATTENTION_PROJ)
        gate, up, down = (_weight(getattr(mlp, n)) for n in MLP_PROJ)
        found = [f"{name} reads {w.shape[1]} features, not the hidden size {hidden}"
                 for name, w in (("q_proj", q), ("k_proj", k), ("v_proj", v), ("gate_proj", gate), ("up_proj", up))
                 if w.shape[1] != hidden]
        found += [f"{name} writes {w.shape[0]} features, not the hidden size {hidden}"
                  for name, w in (("o_proj", o), ("down_proj", down)) if w.shape[0] != hidden]
        found += [f"{name} has {w.shape[0]} rows, not whole heads of {hd}" for name, w in (("q_proj", q), ("k_proj", k))
                  if w.shape[0] % hd or not w.shape[0]]
        if v.shape[0] != k.shape[0]:
            found.append(f"v_proj has {v.shape[0]} rows but k_proj {k.shape[0]}")
        if o.shape[1] != q.shape[0]:
            found.append(f"o_proj reads {o.shape[1]} features but q_proj writes {q.shape[0]}")
        if not found and (q.shape[0] // hd) % (k.shape[0] // hd):
            found.append(f"{q.shape[0] // hd} query heads are not a multiple of {k.shape[0] // hd} KV heads")
        if gate.shape[0] != up.shape[0] or down.shape[1] != up.shape[0] or not up.shape[0]:
            found.append(f"the MLP's gate/up/down widths {gate.shape[0]}/{up.shape[0]}/{down.shape[1]} differ")
        if found:
            problems.append(f"layer {i}: " + "; ".join(found))
    return problems


def sync_to_weights(model) -> list[LayerShape]:
    """Make `model`'s config and attention modules describe its weights, in place, as another pruner left them
    (Torch-Pruning, LLM-Pruner and hand surgery keep the original head counts and widths in the config); returns
    the per-layer shapes. ModelShapeError, listing every problem, when the modules contradict each other.

    The head width comes from the attention modules (they compute with it), else the config. The hidden size is
    the embedding's width: a pruner that narrowed it everywhere leaves a consistent, smaller model."""
    config = model.config
    hd = getattr(decoder_layers(model)[0].self_attn, "head_dim", None) or head_dim(config)
    problems = module_problems(model, hd)
    if problems:
        raise ModelShapeError("the model's modules contradict each other, so no config can describe it: "
                              + " | ".join(problems))
    config.hidden_size = model.get_input_embeddings().weight.shape[1]
    config.head_dim = hd
    shapes = layer_shapes(model)
    sync_modules(model, shapes)
    sync_config(config, shapes)
    return shapes


def sync_modules(model, shapes: list[LayerShape]) -> None:
    """Make each module's own counts match its weights (`shapes`), as rebuild_layer and keep_units do: every
    projection's in/out_features (PEFT sizes its adapters by them); transformers' eager and grouped-query
    attention repeat the KV heads `num_key_value_groups` times, and older versions also read
    `num_heads`/`num_key_value_heads` from the module."""
    for layer, shape in zip(decoder_layers(model), shapes):
        attn = layer.self_attn
        for owner, names in ((attn, ATTENTION_PROJ), (layer.mlp, MLP_PROJ)):
            for name in names:
                linear = getattr(getattr(owner, name), "base_layer", getattr(owner, name))
                linear.out_features, linear.in_features = linear.weight.shape
        attn.num_key_value_groups = shape.group_size
        for name, value in (("num_heads", shape.q_heads), ("num_key_value_heads", shape.kv_heads)):
            if hasattr(attn, name):
                setattr(attn, name, value)


def layer_runs(shapes: list[dict]) -> list[tuple[str, tuple[int, int, int]]]:
    """Identical consecutive layers grouped, e.g. [("0-3", (6, 3, 1075)), ("4", (9, 3, 1536))], so 30 layers
    stay readable in `rora info` and model cards. `shapes` are dicts with q_heads, kv_heads, intermediate."""
    runs = []
    for i, s in enumerate(shapes):
        key = (s["q_heads"], s["kv_heads"], s["intermediate"])
        if runs and runs[-1][2] == key:
            runs[-1][1] = i
        else:
            runs.append([i, i, key])
    return [(f"{a}" if a == b else f"{a}-{b}", key) for a, b, key in runs]


def is_uniform(shapes: list[LayerShape]) -> bool:
    return len(set(shapes)) <= 1


def sync_config(config, shapes: list[LayerShape]) -> None:
    """Make the config describe `shapes`: standard fields when uniform, else their maxima plus the per-layer list."""
    config.head_dim = head_dim(config)  # explicit: hidden_size // heads no longer holds after pruning
    config.num_attention_heads = max(s.q_heads for s in shapes)
    config.num_key_value_heads = max(s.kv_heads for s in shapes)
    config.intermediate_size = max(s.intermediate for s in shapes)
    standard = is_uniform(shapes) and _config_valid(config)
    if not _config_valid(config):
        # transformers 5 LlamaConfig rejects (on save and on load) a head count that does not divide hidden_size,
        # e.g. 26 of Llama-7B's 32 heads. Such a model keeps a valid stand-in count and lists its real shapes.
        config.num_attention_heads = next(n for n in range(config.num_attention_heads, config.hidden_size + 1)
                                          if config.hidden_size % n == 0)
    if standard:
        if hasattr(config, LAYER_SHAPES_KEY):
            delattr(config, LAYER_SHAPES_KEY)
    else:
        setattr(config, LAYER_SHAPES_KEY, [asdict(s) for s in shapes])


def plain_config(config):
    """A config from which plain transformers builds this uniform model's exact shapes, for saving it.

    The model's own config when it is standard. A uniform Llama whose head count does not divide hidden_size
    (LLaMA-7B's 32 heads pruned to 26) has none: LlamaConfig refuses it. MistralConfig with no sliding window is
    the same network (same modules and weight names, RMSNorm, SiLU MLP, RoPE, scaling by head_dim) and takes an
    explicit head_dim without that check, so the model is saved as a Mistral one.
    """
    if is_standard_config(config):
        return config
    shapes = config_layer_shapes(config)
    if not is_uniform(shapes):
        raise PruningError("plain_config needs uniform layers; pad a non-uniform model first (pad_layer)")
    from transformers import MistralConfig

    if not has_plain_config(config):
        raise UnsupportedModelError(
            f"no standard config describes this {config.model_type} model ({shapes[0].q_heads} query heads over "
            f"hidden size {config.hidden_size}); export it with --layout compact (rora.load_model reads it)"
        )
    fields = {k: v for k, v in config.to_dict().items()
              if k not in ("model_type", "architectures", "attention_bias", "mlp_bias", "pretraining_tp",
                           "transformers_version", LAYER_SHAPES_KEY)}
    fields.update(num_attention_heads=shapes[0].q_heads, num_key_value_heads=shapes[0].kv_heads,
                  intermediate_size=shapes[0].intermediate, head_dim=head_dim(config), sliding_window=None,
                  architectures=["MistralForCausalLM"])
    return MistralConfig(**fields)


def has_plain_config(config) -> bool:
    """Whether plain_config can describe this uniform model: a standard config, or a bias-free Llama whose Mistral
    twin takes its head count (MistralConfig has no biases, so a reconstructed Llama with output biases and a head
    count LlamaConfig refuses has no plain config: rora.load_model reads it)."""
    return is_standard_config(config) or (config.model_type == "llama" and not getattr(config, "attention_bias", False)
                                          and not getattr(config, "mlp_bias", False))


def is_standard_config(config) -> bool:
    """Whether plain transformers builds the right shapes from this config (no per-layer list needed)."""
    return not getattr(config, LAYER_SHAPES_KEY, None)


def _config_valid(config) -> bool:
    validate = getattr(config, "validate", None)  # transformers 5 configs are strict dataclasses
    if validate is None:
        return True
    try:
        validate()
    except Exception:  # huggingface_hub's StrictDataclassClassValidationError (a ValueError subclass)
        return False
    return True


def rebuild_layer(layer: nn.Module, shape: LayerShape, config) -> None:
    """Replace the layer's projections by freshly allocated ones of `shape` (contents are to be loaded)."""
    if shape.q_heads <= 0 or shape.kv_heads <= 0 or shape.q_heads % shape.kv_heads or shape.intermediate <= 0:
        raise PruningError(f"invalid layer shape {shape}: need q_heads a positive multiple of kv_heads, intermediate > 0")
    hd, hidden = head_dim(config), config.hidden_size
    attn, mlp = layer.self_attn, layer.mlp
    rows = {"q_proj": shape.q_heads * hd, "k_proj": shape.kv_heads * hd, "v_proj": shape.kv_heads * hd}
    for name, out_features in rows.items():
        setattr(attn, name, _like(getattr(attn, name), hidden, out_features))
    attn.o_proj = _like(attn.o_proj, shape.q_heads * hd, hidden)
    attn.num_key_value_groups = shape.group_size
    mlp.gate_proj = _like(mlp.gate_proj, hidden, shape.intermediate)
    mlp.up_proj = _like(mlp.up_proj, hidden, shape.intermediate)
    mlp.down_proj = _like(mlp.down_proj, shape.intermediate, hidden)


def apply_shapes(model, shapes: list[LayerShape]) -> None:
    """Rebuild every layer whose modules differ from `shapes`, then sync the config."""
    layers = decoder_layers(model)
    if len(shapes) != len(layers):
        raise PruningError(f"{len(shapes)} shapes given for {len(layers)} layers")
    current = layer_shapes(model)
    for layer, want, have in zip(layers, shapes, current):
        if want != have:
            rebuild_layer(layer, want, model.config)
    sync_config(model.config, shapes)


def keep_units(layer: nn.Module, config, keep_q: list[int], keep_kv: list[int], keep_channels: list[int]) -> LayerShape:
    """Physically keep only the listed query heads, KV heads and MLP channels of one layer (in place).

    Every kept query head must belong to a kept KV head's group and every kept group must keep the same number
    of query heads, so grouped-query attention stays valid (q_heads a multiple of kv_heads, heads in group order).
    """
    hd = head_dim(config)
    attn, mlp = layer.self_attn, layer.mlp
    old = LayerShape(_weight(attn.q_proj).shape[0] // hd, _weight(attn.k_proj).shape[0] // hd, _weight(mlp.up_proj).shape[0])
    keep_q, keep_kv, keep_channels = sorted(keep_q), sorted(keep_kv), sorted(keep_channels)
    per_group = {g: [h for h in keep_q if h // old.group_size == g] for g in keep_kv}
    counts = {len(v) for v in per_group.values()}
    if not keep_kv or not keep_channels or len(counts) != 1 or 0 in counts or sum(map(len, per_group.values())) != len(keep_q):
        raise PruningError(
            f"cannot keep query heads {keep_q} with KV heads {keep_kv} and {len(keep_channels)} channels: every kept "
            "KV group needs the same, non-zero number of its own query heads, and at least one channel must stay"
        )
    q_rows = _head_rows(keep_q, hd)
    kv_rows = _head_rows(keep_kv, hd)
    _select(attn.q_proj, q_rows, dim=0)
    _select(attn.k_proj, kv_rows, dim=0)
    _select(attn.v_proj, kv_rows, dim=0)
    _select(attn.o_proj, q_rows, dim=1)
    channels = torch.tensor(keep_channels, dtype=torch.long)
    _select(mlp.gate_proj, channels, dim=0)
    _select(mlp.up_proj, channels, dim=0)
    _select(mlp.down_proj, channels, dim=1)
    new = LayerShape(len(keep_q), len(keep_kv), len(keep_channels))
    attn.num_key_value_groups = new.group_size
    return new


def can_hold_output_biases(config) -> bool:
    """Whether o_proj and down_proj may carry a bias: Llama's attention_bias and mlp_bias (each switches on the
    biases of all four attention or all three MLP projections; transformers and llama.cpp read them). Mistral has
    no such switch, and Qwen2's o_proj never has a bias."""
    return getattr(config, "model_type", None) == "llama"


def add_output_biases(model) -> bool:
    """Give every attention and MLP projection of every layer a bias (zeros where it had none) and switch on
    attention_bias and mlp_bias, so the model computes what it computed and o_proj/down_proj can be given output
    biases; returns whether anything was added. Llama only (can_hold_output_biases)."""
    if not can_hold_output_biases(model.config):
        raise UnsupportedModelError(f"a {model.config.model_type} model cannot hold output biases")
    added = False
    for layer in decoder_layers(model):
        for owner, names in ((layer.self_attn, ATTENTION_PROJ), (layer.mlp, MLP_PROJ)):
            for name in names:
                linear = getattr(owner, name)
                if linear.bias is None:
                    w = linear.weight
                    linear.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device),
                                               requires_grad=w.requires_grad)
                    added = True
    model.config.attention_bias = True
    model.config.mlp_bias = True
    return added


def build_from_state_dict(config, state_dict: dict, dtype=None):
    """Build the modules the config describes (per-layer shapes included) and load `state_dict` strictly."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config, dtype=dtype or torch.float32)
    apply_shapes(model, config_layer_shapes(config))
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if unexpected or set(missing) - tied:
        raise ModelLoadError(
            f"weights do not match the config: missing {sorted(set(missing) - tied)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    model.tie_weights()
    return model


def padded_shape(shapes: list[LayerShape]) -> LayerShape:
    """The smallest uniform shape every layer pads into: most KV groups, largest group, widest MLP."""
    kv = max(s.kv_heads for s in shapes)
    return LayerShape(kv * max(s.group_size for s in shapes), kv, max(s.intermediate for s in shapes))


def pad_layer(layer: nn.Module, config, target: LayerShape) -> None:
    """Zero-pad one layer up to `target` in place, so that it computes exactly what it computed before.

    KV group g stays group g and its query heads take the first slots of the group's `target.group_size`. A
    padded query head has a zero q row, which gives uniform attention over the values, not zero output, so
    its o_proj columns are zero too; a padded KV head (zero k/v rows) only serves padded query heads. MLP
    channels get zero gate/up rows and zero down_proj columns (silu(0) * 0 = 0).
    """
    hd = head_dim(config)
    attn, mlp = layer.self_attn, layer.mlp
    old = LayerShape(_weight(attn.q_proj).shape[0] // hd, _weight(attn.k_proj).shape[0] // hd, _weight(mlp.up_proj).shape[0])
    if old.kv_heads > target.kv_heads or old.group_size > target.group_size or old.intermediate > target.intermediate:
        raise PruningError(f"cannot pad layer shape {old} into {target}: the target must be at least as large everywhere")
    q_slots = [(h // old.group_size) * target.group_size + h % old.group_size for h in range(old.q_heads)]
    q_rows = _head_rows(q_slots, hd)
    kv_rows = torch.arange(old.kv_heads * hd)
    _scatter(attn.q_proj, q_rows, target.q_heads * hd, dim=0)
    _scatter(attn.k_proj, kv_rows, target.kv_heads * hd, dim=0)
    _scatter(attn.v_proj, kv_rows, target.kv_heads * hd, dim=0)
    _scatter(attn.o_proj, q_rows, target.q_heads * hd, dim=1)
    channels = torch.arange(old.intermediate)
    _scatter(mlp.gate_proj, channels, target.intermediate, dim=0)
    _scatter(mlp.up_proj, channels, target.intermediate, dim=0)
    _scatter(mlp.down_proj, channels, target.intermediate, dim=1)
    attn.num_key_value_groups = target.group_size


def _scatter(linear: nn.Linear, index: torch.Tensor, size: int, dim: int) -> None:
    """Grow `linear` to `size` along `dim`: its current rows/columns go to `index`, the rest are zero."""
    def grow(t: torch.Tensor, d: int) -> torch.Tensor:
        shape = list(t.shape)
        shape[d] = size
        return t.new_zeros(shape).index_copy_(d, index.to(t.device), t)

    linear.weight = nn.Parameter(grow(linear.weight.data, dim), requires_grad=linear.weight.requires_grad)
    if dim == 0 and linear.bias is not None:
        linear.bias = nn.Parameter(grow(linear.bias.data, 0), requires_grad=linear.bias.requires_grad)
    if dim == 0:
        linear.out_features = size
    else:
        linear.in_features = size


def _head_rows(heads: list[int], hd: int) -> torch.Tensor:
    return torch.cat([torch.arange(h * hd, (h + 1) * hd) for h in heads]) if heads else torch.empty(0, dtype=torch.long)


def _weight(linear: nn.Module) -> torch.Tensor:
    # A PEFT-wrapped Linear keeps the frozen layer as base_layer.
    return getattr(linear, "base_layer", linear).weight


def _select(linear: nn.Linear, index: torch.Tensor, dim: int) -> None:
    index = index.to(linear.weight.device)
    linear.weight = nn.Parameter(linear.weight.data.index_select(dim, index).contiguous(), requires_grad=linear.weight.requires_grad)
    if dim == 0 and linear.bias is not None:
        linear.bias = nn.Parameter(linear.bias.data.index_select(0, index).contiguous(), requires_grad=linear.bias.requires_grad)
    if dim == 0:
        linear.out_features = linear.weight.shape[0]
    else:
        linear.in_features = linear.weight.shape[1]


def _like(old: nn.Linear, in_features: int, out_features: int) -> nn.Linear:
    w = old.weight
    return nn.Linear(in_features, out_features, bias=old.bias is not None, device=w.device, dtype=w.dtype)
