"""Handing a Llama-family model to Torch-Pruning (pip `torch-pruning`, the extra `rora[torch-pruning]`) and back.

Torch-Pruning builds its dependency graph by tracing one forward pass through autograd. With Torch-Pruning 1.6.1,
torch 2.13 and transformers 5, two things in Llama attention defeat it (found by reading its code; each is a few
lines to fix upstream):

1. It hangs. RoPE's `rotate_half` ends in `torch.cat((-x2, x1), dim=-1)`. torch exposes that node's saved dim as
   the unsigned 2**64 - 1, and Torch-Pruning's guard `_saved_dim != 1 and _saved_dim < MAX_VALID_DIM`
   (dependency/index_mapping.py, update_concat_index_mapping; the guard exists for torch 1.11's uninitialised
   values) takes it for an unknown dim, so a concatenation of half-heads becomes a concatenation of channels with
   offsets. Going round the q -> rotate_half -> q*cos + ... cycle then shifts the indices by the offset each lap,
   and `get_pruning_group` only stops on an exact repeat (graph.py, `_fix_dependency_graph_non_recursive`), so it
   never stops. Upstream: read the saved dim as signed (`d - 2**64 if d >= 2**63`), normalise it by the
   tensor's rank, and drop indices outside a node's channel range instead of following them.
2. With SDPA, transformers 5 hands the grouped KV heads to `scaled_dot_product_attention(enable_gqa=True)`
   without `repeat_kv`, and Torch-Pruning treats that op as element-wise: query channel i is tied to key channel
   i, which is wrong for grouped-query attention. Its GQA index mapping needs repeat_kv's expand in the trace.

`traceable(model)` works around both for the duration of the trace, computing exactly what the model computes:
eager attention (repeat_kv), no KV cache, and a `rotate_half` that concatenates along the same dim named as a
non-negative number. A third problem is Torch-Pruning's to fix alone, and rora can only catch its result:
BasePruner recomputes "is this GQA?" after lowering the query head count (pruner/algorithms/base_pruner.py, the
`_is_gqa` after `self.num_heads[qkv_layer] -= ...`), so a prune that leaves exactly as many query heads as KV
heads no longer shields the KV projections; their group then fails `check_pruning_group` and the layer's heads
are silently left unpruned. Choose ratios that keep more query heads than KV heads.

What Torch-Pruning leaves behind (the config's original head counts and widths, each attention module's
`num_key_value_groups`) is what `rora.adopt` syncs.
"""
from __future__ import annotations

import contextlib
import sys

import torch

from ..architecture import decoder_layers, layer_shapes


def head_counts(model) -> dict:
    """Torch-Pruning's `num_heads` argument for a Llama-family model: each layer's q_proj with its query heads,
    k_proj and v_proj with their KV heads (read from the weights, so a model pruned before counts right)."""
    counts = {}
    for layer, shape in zip(decoder_layers(model), layer_shapes(model)):
        attn = layer.self_attn
        counts.update({attn.q_proj: shape.q_heads, attn.k_proj: shape.kv_heads, attn.v_proj: shape.kv_heads})
    return counts


@contextlib.contextmanager
def traceable(model):
    """Within it, Torch-Pruning can trace `model` (see the module docstring): eager attention, no KV cache, and
    its modeling module's `rotate_half` replaced by one that names its dim as a non-negative number. Everything
    is restored on exit; the model computes the same numbers throughout."""
    config = model.config
    modeling = sys.modules[type(decoder_layers(model)[0].self_attn).__module__]
    saved = (config._attn_implementation, config.use_cache, modeling.rotate_half)
    config._attn_implementation, config.use_cache = "eager", False
    modeling.rotate_half = _rotate_half
    try:
        yield model
    finally:
        config._attn_implementation, config.use_cache, modeling.rotate_half = saved


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=x.dim() - 1)
