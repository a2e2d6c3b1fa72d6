"""Adapter dropout that draws one random number per dropped element instead of one per element.

The adapters' input dropout (p=0.05 in the recipe) is `nn.Dropout`: on a CPU it samples a Bernoulli variable for
every element of every adapted module's input, and that sampling cost 18% of a training step on smollm2 (as much
as a third of the adapter work; measured in benchmarks/bench_recover.py). Here the dropped positions are drawn
directly: the gaps between successive dropped elements of an i.i.d. Bernoulli(p) sequence are i.i.d.
Geometric(p), so ~p*n geometric draws give exactly nn.Dropout's distribution (each element zeroed independently
with probability p, survivors scaled by 1/(1-p)). The backward keeps only the dropped indices (5% of int64s rather
than a full mask). On GPUs the fused built-in kernel is already cheap and is used instead.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def dropped_positions(n: int, p: float, device=None) -> torch.Tensor:
    """Sorted flat indices in [0, n) at which an i.i.d. Bernoulli(p) sequence of length n is 1."""
    mean = n * p
    draws = int(mean + 6 * math.sqrt(mean) + 16)  # enough to pass n almost always; loop otherwise
    chunks, reached = [], 0
    while reached < n:
        # Trials to the next success: floor(log(u) / log(1-p)) + 1 with u uniform on (0, 1] is exactly
        # Geometric(p); written out because it is ~10x faster than Tensor.geometric_ on CPU.
        u = 1.0 - torch.rand(draws, dtype=torch.float64, device=device)
        gaps = (u.log() / math.log1p(-p)).floor_().to(torch.int64) + 1
        chunks.append(gaps)
        reached += int(gaps.sum())
    positions = torch.cat(chunks).cumsum(0) - 1
    return positions[: int(torch.searchsorted(positions, n))]  # sorted: cut rather than mask (3x faster)


class _SparseDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float):
        positions = dropped_positions(x.numel(), p, x.device)
        out = (x * (1.0 / (1.0 - p))).contiguous()
        out.view(-1).index_fill_(0, positions, 0)
        ctx.save_for_backward(positions)
        ctx.p = p
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (positions,) = ctx.saved_tensors
        grad_in = (grad * (1.0 / (1.0 - ctx.p))).contiguous()
        grad_in.view(-1).index_fill_(0, positions, 0)
        return grad_in, None


class SparseDropout(nn.Dropout):
    """`nn.Dropout` with the same distribution, sampled by dropped position (fast on CPU; see the module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or x.device.type != "cpu" or self.inplace:
            return F.dropout(x, self.p, self.training, self.inplace)
        return _SparseDropout.apply(x, self.p)


def use_sparse_dropout(model: nn.Module) -> int:
    """Swap every plain `nn.Dropout` inside PEFT adapter layers (their `lora_dropout` dicts) for SparseDropout.

    Returns how many were swapped. Only the adapters' input dropout changes; the base model's own dropout (none in
    Llama) and the saved adapter are untouched.
    """
    swapped = 0
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if not isinstance(dropouts, nn.ModuleDict):
            continue
        for name, d in list(dropouts.items()):
            if type(d) is nn.Dropout:
                dropouts[name] = SparseDropout(d.p)
                swapped += 1
    return swapped
