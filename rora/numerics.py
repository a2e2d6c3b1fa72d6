"""Numerics every stage's verification shares: dtype names, fixed probe inputs, float64 logits, weight casts."""
from __future__ import annotations

import contextlib
import hashlib

import torch

from .errors import ModelLoadError

DTYPES = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def bfloat16_autocast(precision: str, gpu: bool) -> bool:
    """Whether a PRECISIONS name means bfloat16 autocast: 'bfloat16' always, 'auto' on a GPU; float32 otherwise."""
    return precision == "bfloat16" or (precision == "auto" and gpu)


def matmul_precision(device, precision: str = "auto"):
    """The context a stage's forward passes run in: bfloat16 autocast for 'bfloat16', and for 'auto' on a GPU;
    otherwise the model's own dtype. On a CPU, float32 is what makes the scoring engine's numbers lm-eval's to ~1e-5;
    bfloat16 trades that for speed on CPUs with bfloat16 instructions (benchmarks/bench_precision.py). Enter a fresh
    one around each forward pass whose weights may have changed since the last: autocast keeps its bfloat16 copies
    of the weights until its outermost context exits."""
    device = torch.device(device)
    if bfloat16_autocast(precision, device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def probe_inputs(vocab_size: int, *, batch: int = 4, length: int = 32, seed: int = 0) -> torch.Tensor:
    """Fixed, deterministic token ids (same on every machine) used to compare two models' logits."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, length), generator=gen)


@torch.no_grad()
def logits_on(model, ids: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """float64 copy of the logits of `model` on `ids` (eval mode, on the model's device).

    With `dtype`, the parameters are cast to it for this forward pass and cast back afterwards (exact when
    `dtype` is wider), so a comparison can run in float64 without keeping a second copy of the model.
    """
    model.eval()
    device = next(model.parameters()).device
    original = {p: p.dtype for p in model.parameters()} if dtype is not None else {}
    try:
        for p in original:
            p.data = p.data.to(dtype)
        return model(input_ids=ids.to(device)).logits.double().cpu()
    finally:
        for p, dt in original.items():
            p.data = p.data.to(dt)



def cast_parameters(model, dtype: torch.dtype):
    """Cast the weights only: `model.to(bf16)` would also round RoPE's fp32 inv_freq buffer, which a model
    loaded from disk in bf16 keeps in fp32, so the in-memory model would differ from the saved one."""
    for p in model.parameters():
        p.data = p.data.to(dtype)
    return model


def model_signature(model) -> str:
    """A cheap, exact fingerprint of a model's weights: names, shapes, dtypes and a strided sample of every tensor's
    values (plus its last 256), for resume checks and cache keys; hashing every byte of a 7B model would take a
    minute. Only values are hashed, never a float sum, whose last digits vary with memory alignment between
    processes (a summed signature missed the teacher-written text cache from one run to the next)."""
    digest = hashlib.sha256()
    state = (model.get_base_model() if hasattr(model, "get_base_model") else model).state_dict()
    for name, p in state.items():
        flat = p.detach().reshape(-1)
        sample = torch.cat([flat[:: max(1, flat.numel() // 256)], flat[-256:]]).float().cpu()
        digest.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]
