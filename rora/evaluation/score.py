"""Constrained log-likelihood scoring: sum of log-probs of each candidate continuation after a context; argmax.

Tokenization follows lm-eval-harness (`_encode_pair`: trailing spaces of the context move to the continuation, the
pair is encoded whole, and the continuation is what follows the context's own encoding), so `score` numbers equal
lm-eval's HF backend on the same (context, continuation) pairs.

The engine is loglik.py's, shared with the `rora-hf` lm-eval backend: each example is one packed row (its context
once, the candidates' shared leading tokens such as " answer" once), rows are batched by length, the instruction
header that opens every prompt is encoded once per batch, and the vocabulary projection runs only where a log-prob
is read.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from .loglik import encode_pair, pack, score_rows  # noqa: F401  (encode_pair: part of this module's API)


@dataclass
class _Gather:
    """log p(token | row[:pos+1]) contributes to candidate `cand` of example `example`."""

    example: int
    cand: int
    row: int
    pos: int
    token: int


def _rows(tokenizer, requests: Sequence[tuple[str, Sequence[str]]]):
    """One packed row (loglik.Row) per example."""
    rows = []
    for e, (context, candidates) in enumerate(requests):
        pairs = [encode_pair(tokenizer, context, c) for c in candidates]
        if any(not cont for _, cont in pairs):
            raise ValueError(f"empty continuation for example {e}: {candidates!r}")
        rows.append(pack(pairs))
    return rows


def _plan(tokenizer, requests: Sequence[tuple[str, Sequence[str]]]):
    """The rows' tokens and, flattened, where each candidate's log-probs are read (a view for inspection)."""
    rows = _rows(tokenizer, requests)
    gathers = [_Gather(e, k, e, node, tok) for e, row in enumerate(rows) for k, s in enumerate(row.scored)
               for node, tok in s]
    return [r.tokens for r in rows], gathers


def loglikelihoods(model, tokenizer, requests: Sequence[tuple[str, Sequence[str]]], *, batch_size: int = 16,
                   progress: bool = False, precision: str = "auto") -> list[list[float]]:
    """For each (context, candidates): the summed log-prob of each candidate's tokens after the context.
    batch_size caps the rows (examples) per forward pass; a token budget caps their padded tokens; `precision`:
    numerics.matmul_precision."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    found = score_rows(model, _rows(tokenizer, requests), pad_id=pad, max_rows=batch_size, progress=progress,
                       desc="score", precision=precision)
    return [[ll for ll, _ in r] for r in found]


def argmax(values: Sequence[float]) -> int:
    """Index of the largest value; the first on ties (like numpy, like lm-eval)."""
    return max(range(len(values)), key=lambda i: (values[i], -i))
