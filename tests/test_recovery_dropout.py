"""SparseDropout must be nn.Dropout in distribution: independent Bernoulli(p) drops, survivors scaled by 1/(1-p)."""
import math

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from rora.recovery.dropout import SparseDropout, dropped_positions, use_sparse_dropout


def test_positions_are_sorted_unique_in_range_and_at_rate_p():
    torch.manual_seed(0)
    n, p = 2_000_000, 0.05
    pos = dropped_positions(n, p)
    assert pos.dtype == torch.int64
    assert int(pos[0]) >= 0 and int(pos[-1]) < n
    assert bool((pos[1:] > pos[:-1]).all())
    sigma = math.sqrt(n * p * (1 - p))
    assert abs(len(pos) - n * p) < 5 * sigma
    # Independence: the share of dropped elements whose right neighbour is dropped too is p, not more or less.
    pairs = int(((pos[1:] - pos[:-1]) == 1).sum())
    assert abs(pairs / len(pos) - p) < 5 * math.sqrt(p * (1 - p) / len(pos))


@pytest.mark.parametrize("n", [1, 2, 7])
def test_every_position_is_dropped_with_probability_p_even_for_tiny_tensors(n):
    # Tiny n exercises the draw-more loop; every position (first and last included) must see rate p.
    torch.manual_seed(1)
    p, trials = 0.3, 4000
    counts = torch.zeros(n)
    for _ in range(trials):
        counts[dropped_positions(n, p)] += 1
    assert torch.allclose(counts / trials, torch.full((n,), p), atol=5 * math.sqrt(p * (1 - p) / trials))


def test_forward_and_backward_agree_with_dropout_semantics():
    torch.manual_seed(2)
    p = 0.05
    x = torch.randn(64, 96, requires_grad=True)
    drop = SparseDropout(p).train()
    y = drop(x)
    zeroed = y == 0
    assert 0 < int(zeroed.sum()) < x.numel()
    assert torch.equal(y[~zeroed], x[~zeroed] * (1 / (1 - p)))  # as F.dropout scales: times 1/(1-p)
    g = torch.randn_like(y)
    y.backward(g)
    assert torch.equal(x.grad[zeroed], torch.zeros(int(zeroed.sum())))
    assert torch.equal(x.grad[~zeroed], g[~zeroed] * (1 / (1 - p)))


def test_same_seed_same_mask_and_eval_is_identity():
    x = torch.randn(32, 48)
    drop = SparseDropout(0.1).train()
    torch.manual_seed(3)
    a = drop(x)
    torch.manual_seed(3)
    assert torch.equal(a, drop(x))
    assert torch.equal(drop.eval()(x), x)


def test_non_contiguous_input_is_dropped_elementwise():
    torch.manual_seed(4)
    x = torch.randn(40, 30).t()
    y = SparseDropout(0.5).train()(x)
    kept = y != 0
    assert torch.equal(y[kept], x[kept] * 2)


def test_swaps_every_adapter_dropout_and_nothing_else(tiny_llama):
    model = tiny_llama
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.05,
                                            target_modules=["q_proj", "v_proj", "down_proj"]))
    n_layers = model.config.num_hidden_layers
    assert use_sparse_dropout(peft) == 3 * n_layers
    swapped = [m for m in peft.modules() if isinstance(m, SparseDropout)]
    assert len(swapped) == 3 * n_layers and all(m.p == 0.05 for m in swapped)
    assert use_sparse_dropout(peft) == 0  # idempotent
    assert not any(type(m) is nn.Dropout for m in peft.modules())
