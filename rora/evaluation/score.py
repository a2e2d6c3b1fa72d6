"""Constrained log-likelihood scoring: sum of log-probs of each candidate continuation after a context; argmax.

Tokenization follows lm-eval-harness (`_encode_pair`): trailing spaces of the context move to the continuation, the
pair is encoded whole, and the continuation is what follows the context's own encoding. So `score` numbers equal
lm-eval's HF backend on the same (context, continuation) pairs.

Why it is fast: the suite's candidates share their leading tokens (" answer" + "1".."5"), so each example needs ONE
forward pass over context + shared tokens, whose last position scores every candidate's final token. Only when
candidates differ before their last token does an example take one row per candidate. Rows are sorted by length and
batched across examples with right padding (causal attention: padding after a token cannot change it), the
instruction header that opens every prompt is encoded once per batch and reused through its KV cache, and the vocabulary
projection runs only at the positions that are scored, not at every position of every row.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass
class _Gather:
    """log p(token | row[:pos+1]) contributes to candidate `cand` of example `example`."""

    example: int
    cand: int
    row: int
    pos: int
    token: int


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's split of a (context, continuation) pair into token ids."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tokenizer(context + continuation).input_ids
    ctx = tokenizer(context).input_ids
    return ctx, whole[len(ctx):]


def _plan(tokenizer, requests: Sequence[tuple[str, Sequence[str]]]):
    """Rows to run and where each candidate's log-probs are read from them."""
    rows: list[list[int]] = []
    gathers: list[_Gather] = []
    for e, (context, candidates) in enumerate(requests):
        pairs = [encode_pair(tokenizer, context, c) for c in candidates]
        ctx = pairs[0][0]  # the same context for every candidate
        conts = [p[1] for p in pairs]
        if any(not c for c in conts):
            raise ValueError(f"empty continuation for example {e}: {candidates!r}")
        shared = _common_prefix(conts, limit=min(len(c) for c in conts) - 1)
        if all(len(c) == shared + 1 for c in conts):
            # One row: context + shared tokens; its last position scores every candidate's last token.
            row = ctx + conts[0][:shared]
            rows.append(row)
            for k, cont in enumerate(conts):
                for j, tok in enumerate(cont):
                    gathers.append(_Gather(e, k, len(rows) - 1, len(ctx) + j - 1, tok))
        else:
            for k, cont in enumerate(conts):
                rows.append(ctx + cont[:-1])
                for j, tok in enumerate(cont):
                    gathers.append(_Gather(e, k, len(rows) - 1, len(ctx) + j - 1, tok))
    return rows, gathers


def _common_prefix(seqs: list[list[int]], limit: int) -> int:
    n = 0
    while n < limit and all(s[n] == seqs[0][n] for s in seqs):
        n += 1
    return n


@torch.inference_mode()
def loglikelihoods(model, tokenizer, requests: Sequence[tuple[str, Sequence[str]]], *, batch_size: int = 16,
                   progress: bool = False) -> list[list[float]]:
    """For each (context, candidates): the summed log-prob of each candidate's tokens after the context."""
    rows, gathers = _plan(tokenizer, requests)
    by_row: dict[int, list[_Gather]] = {}
    for g in gathers:
        by_row.setdefault(g.row, []).append(g)
    out = [[0.0] * len(c) for _, c in requests]
    decoder, head = _decoder_and_head(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    # Longest first: similar lengths share a batch, so little padding. Each batch encodes its rows' common opening
    # (the instruction header, and the task's question template when one task fills the batch) once.
    order = sorted(range(len(rows)), key=lambda r: -len(rows[r]))
    from .generate import _progress

    bar = _progress(len(rows), progress, "score")
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        first_scored = min(g.pos for r in chunk for g in by_row[r])
        shared, prefix_cache = _shared_prefix(decoder, [rows[r] for r in chunk], first_scored, model.device)
        tails = [rows[r][shared:] for r in chunk]
        width = max(len(t) for t in tails)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), shared + width), dtype=torch.long)
        mask[:, :shared] = 1
        for j, tail in enumerate(tails):
            ids[j, :len(tail)] = torch.tensor(tail)
            mask[j, shared:shared + len(tail)] = 1
        kwargs = {}
        if prefix_cache is not None:
            cache = copy.deepcopy(prefix_cache)
            cache.batch_repeat_interleave(len(chunk))
            kwargs = {"past_key_values": cache, "use_cache": True,
                      "position_ids": (shared + torch.arange(width)).expand(len(chunk), -1).to(model.device)}
        hidden = decoder(input_ids=ids.to(model.device), attention_mask=mask.to(model.device),
                         **kwargs).last_hidden_state
        wanted = [(j, g) for j, r in enumerate(chunk) for g in by_row[r]]
        # The vocabulary projection only where a log-prob is read (each distinct position once).
        positions = sorted({(j, g.pos - shared) for j, g in wanted})
        index = {p: i for i, p in enumerate(positions)}
        sel = hidden[[p[0] for p in positions], [p[1] for p in positions]]
        logprobs = torch.log_softmax(head(sel).float(), dim=-1)
        picked = logprobs[[index[(j, g.pos - shared)] for j, g in wanted], [g.token for _, g in wanted]].tolist()
        for (_, g), lp in zip(wanted, picked):
            out[g.example][g.cand] += lp
        bar.update(len(chunk))
    bar.close()
    return out


MIN_SHARED = 8  # below this a shared cache saves less than it costs to copy


def shared_prefix_length(rows: list[list[int]], limit: int) -> int:
    """How many leading tokens (at most `limit`) all rows share, or 0 when that is too few to be worth caching."""
    shared = _common_prefix(rows, limit)
    return shared if shared >= MIN_SHARED else 0


def _shared_prefix(decoder, rows: list[list[int]], first_scored: int, device):
    """The suite's prompts all open with the same instruction header (~25 tokens): encode the rows' common prefix
    once and start every row from its KV cache. Returns (length, cache), or (0, None) when rows share too little."""
    from transformers import DynamicCache

    # Keep >= 1 token per row to run, and never cache a position whose output is scored.
    shared = shared_prefix_length(rows, limit=min(min(len(r) for r in rows) - 1, first_scored))
    if not shared:
        return 0, None
    cache = DynamicCache(config=decoder.config)
    decoder(input_ids=torch.tensor([rows[0][:shared]], device=device), past_key_values=cache, use_cache=True)
    return shared, cache


def _decoder_and_head(model):
    """The transformer body and the output projection (through a PeftModel, whose adapters sit inside both)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.get_decoder(), inner.get_output_embeddings()


def argmax(values: Sequence[float]) -> int:
    """Index of the largest value; the first on ties (like numpy, like lm-eval)."""
    return max(range(len(values)), key=lambda i: (values[i], -i))
