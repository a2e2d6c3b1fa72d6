"""The log-likelihood engine that the `score` protocol and the `rora-hf` lm-eval backend share.

Input: groups of (context ids, continuation ids) pairs, one group per example (its choices). Output: for every
pair, the summed log-prob of the continuation's tokens after the context, and whether each of them is the argmax
(lm-eval's `is_greedy`).

Why it is fast, and exact:
- One row per example, not one per choice: the example's sequences (context + continuation[:-1]) are merged into a
  prefix tree, laid out as one packed row whose attention mask lets each token see exactly its ancestors and whose
  position ids are the tokens' depths. Every token thus computes what it would compute alone in `context +
  continuation`, but a context (and any leading tokens its choices share) runs once. A packed row beat a KV cache
  of the context reused by per-choice rows on this CPU, 31.6 and 35.3 s vs 59.7 and 60.5 s on the same 80
  examples in two runs (benchmarks/bench_loglik.py measures both): one forward pass instead of two, no cache
  copied per choice, and the extra attention over a ~200-token row is a few % of the linear layers' work.
- Rows are sorted by length and batched up to a token budget, so a batch pads little and its matmuls are large.
- A batch's common opening (the instruction header of the score prompts) is encoded once and reused through its
  KV cache.
- The LM head and log-softmax run only at scored positions (SmolLM2's LM head is 28M parameters beside a 75M
  decoder after pruning; lm-eval's HF backend runs it at every position of every row).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from ..architecture import cache_argument
from ..numerics import matmul_precision

MIN_SHARED = 8  # below this a shared cache saves less than it costs to copy
# Padded tokens per forward pass. On this CPU SmolLM2's MLP matmuls ran at the same FLOP rate from 256 to 2048 rows
# (measured), so 1024 is large enough and keeps a batch's attention masks small; a GPU wants far more.
CPU_TOKENS, GPU_TOKENS = 1024, 32768


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's split of a (context, continuation) pair into token ids (TemplateLM._encode_pair): trailing spaces
    of the context move to the continuation, the pair is encoded whole, and the continuation is what follows the
    context's own encoding."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tokenizer(context + continuation).input_ids
    ctx = tokenizer(context).input_ids
    return ctx, whole[len(ctx):]


def left_truncate(context: list[int], continuation: list[int], window: int) -> list[int]:
    """The context lm-eval's HF backend keeps when context + continuation exceed `window` + 1 tokens: it scores
    (context + continuation)[-(window + 1):], i.e. drops the context's first tokens."""
    keep = window + 1 - len(continuation)
    return context[-keep:] if len(context) > keep else context


@dataclass
class Row:
    """One example as a prefix tree of its sequences, in insertion order (a parent precedes its children).

    scored[k]: for pair k, the (node, token) pairs whose log-probs sum to its log-likelihood; node is the position
    whose output predicts token. chain: how many leading nodes every sequence passes through.
    """

    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)
    depths: list[int] = field(default_factory=list)
    scored: list[list[tuple[int, int]]] = field(default_factory=list)
    chain: int = 0


def pack(pairs: Sequence[tuple[Sequence[int], Sequence[int]]]) -> Row:
    """The row for one example's (context, continuation) pairs."""
    row, children = Row(), {}
    paths = []
    for ctx, cont in pairs:
        if not ctx or not cont:
            raise ValueError(f"empty context or continuation: {ctx!r}, {cont!r}")
        seq = list(ctx) + list(cont)
        node, path = -1, []
        for depth, tok in enumerate(seq[:-1]):  # the last token is only predicted, never input
            key = (node, tok)
            if key not in children:
                children[key] = len(row.tokens)
                row.tokens.append(tok)
                row.parents.append(node)
                row.depths.append(depth)
            node = children[key]
            path.append(node)
        row.scored.append([(path[len(ctx) + j - 1], tok) for j, tok in enumerate(cont)])
        paths.append(path)
    row.chain = _common_prefix(paths, min(len(p) for p in paths))
    return row


def _common_prefix(seqs: Sequence[Sequence[int]], limit: int) -> int:
    n = 0
    while n < limit and all(s[n] == seqs[0][n] for s in seqs):
        n += 1
    return n


def shared_prefix_length(rows: list[list[int]], limit: int) -> int:
    """How many leading tokens (at most `limit`) all rows share, or 0 when that is too few to be worth caching."""
    shared = _common_prefix(rows, limit)
    return shared if shared >= MIN_SHARED else 0


def _shared_prefix(decoder, rows: list[list[int]], first_scored: int, device):
    """Encode the rows' common prefix once (the score prompts all open with the same ~25-token instruction header)
    and return (length, KV cache), or (0, None) when rows share too little. Never caches a scored position, and
    leaves every row at least one token to run."""
    from transformers import DynamicCache

    shared = shared_prefix_length(rows, limit=min(min(len(r) for r in rows) - 1, first_scored))
    if not shared:
        return 0, None
    cache = DynamicCache(config=decoder.config)
    decoder(input_ids=torch.tensor([rows[0][:shared]], device=device), **cache_argument(cache), use_cache=True)
    return shared, cache


def decoder_and_head(model):
    """The transformer body and the output projection (through a PeftModel, whose adapters sit inside both)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.get_decoder(), inner.get_output_embeddings()


def batches(lengths: Sequence[int], max_tokens: int, max_rows: int | None = None) -> list[list[int]]:
    """Row indices, longest first, in batches of at most `max_tokens` padded tokens (and `max_rows` rows), at least
    one row each."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    out: list[list[int]] = []
    for i in order:
        if out and (len(out[-1]) + 1) * lengths[out[-1][0]] <= max_tokens and \
                (max_rows is None or len(out[-1]) < max_rows):
            out[-1].append(i)
        else:
            out.append([i])
    return out


def default_tokens(device) -> int:
    return GPU_TOKENS if torch.device(device).type == "cuda" else CPU_TOKENS


@torch.inference_mode()
def score_rows(model, rows: Sequence[Row], *, pad_id: int = 0, max_tokens: int | None = None,
               max_rows: int | None = None, progress: bool = False, desc: str = "loglikelihood",
               precision: str = "auto") -> list[list[tuple[float, bool]]]:
    """For each row and each of its pairs: (summed log-prob of the continuation, every token the argmax).
    `precision`: the matmuls' (EvalConfig.precision; see matmul_precision)."""

    decoder, head = decoder_and_head(model)
    device = next(model.parameters()).device
    max_tokens = max_tokens or default_tokens(device)
    autocast = matmul_precision(device, precision)
    eager = getattr(decoder.config, "_attn_implementation", "sdpa") == "eager"
    out: list[list[tuple[float, bool]]] = [[(0.0, True)] * len(r.scored) for r in rows]
    bar = progress_bar(len(rows), progress, desc)
    for chunk in batches([len(r.tokens) for r in rows], max_tokens, max_rows):
        group = [rows[i] for i in chunk]
        first_scored = min(node for r in group for s in r.scored for node, _ in s)
        limit = min(first_scored, min(r.chain for r in group))
        shared, prefix = _shared_prefix(decoder, [r.tokens for r in group], limit, device)
        width = max(len(r.tokens) for r in group) - shared
        ids = torch.full((len(group), width), pad_id, dtype=torch.long)
        positions = torch.zeros((len(group), width), dtype=torch.long)
        allowed = np.zeros((len(group), width, shared + width), dtype=bool)
        allowed[:, :, :shared] = True  # the shared prefix is every node's ancestor
        for b, r in enumerate(group):
            n = len(r.tokens) - shared
            ids[b, :n] = torch.tensor(r.tokens[shared:])
            positions[b, :n] = torch.tensor(r.depths[shared:])
            allowed[b, :, shared:] = _ancestors(r.parents, shared, width)
        mask = torch.from_numpy(allowed)[:, None].to(device)
        if eager:  # eager attention adds the mask; sdpa takes a boolean one
            mask = torch.zeros(mask.shape, dtype=model.dtype, device=device).masked_fill(
                ~mask, torch.finfo(model.dtype).min)
        kwargs = {}
        if prefix is not None:
            cache = copy.deepcopy(prefix)
            cache.batch_repeat_interleave(len(group))
            kwargs = {**cache_argument(cache), "use_cache": True}
        with autocast:
            hidden = decoder(input_ids=ids.to(device), attention_mask=mask, position_ids=positions.to(device),
                             **kwargs).last_hidden_state
            # The vocabulary projection only where a log-prob is read (each distinct position once).
            where = sorted({(b, node - shared) for b, r in enumerate(group) for s in r.scored for node, _ in s})
            index = {p: i for i, p in enumerate(where)}
            logits = head(hidden[[p[0] for p in where], [p[1] for p in where]]).float()
        logprobs = torch.log_softmax(logits, dim=-1)
        greedy = logprobs.argmax(-1).tolist()
        for b, (i, r) in enumerate(zip(chunk, group)):
            for k, s in enumerate(r.scored):
                at = [index[(b, node - shared)] for node, _ in s]
                toks = [t for _, t in s]
                lp = logprobs[at, toks]
                out[i][k] = (float(lp.sum()), all(greedy[a] == t for a, t in zip(at, toks)))
        bar.update(len(chunk))
    bar.close()
    return out


def _ancestors(parents: list[int], start: int, width: int) -> np.ndarray:
    """[width, width] mask over nodes start.. of a tree: node i sees node k iff k is i itself or an ancestor.
    Padding (beyond the row) sees only itself: a query that sees nothing would turn into NaN, which then reaches
    real tokens through the keys and values of later layers even though they are masked."""
    n = len(parents) - start
    anc = np.zeros((width, width), dtype=bool)
    for i in range(n):
        p = parents[start + i] - start
        if p >= 0:
            anc[i] = anc[p]
        anc[i, i] = True
    idx = np.arange(n, width)
    anc[idx, idx] = True
    return anc


def progress_bar(total: int, enabled: bool, desc: str):
    """A tqdm bar that leaves no line behind (disabled: a no-op bar)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, desc=desc, leave=False)
