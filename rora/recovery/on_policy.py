"""On-policy distillation: the student writes, the teacher grades (GKD, Agarwal et al., ICLR 2024).

Distilling on fixed text teaches the student the teacher's next token in the states that text visits. Writing takes
the student to states of its own, where a small error compounds: the demo's recovered model, distilled on records
and prose alone, loops ("She was a woman who was a woman. She was a woman who ...") on 61% of its greedy 4-grams,
the unpruned model on 22%. Here the student continues prompts drawn from its own training data, greedily (the
decoding rora's quality figure and most deployments use), and every training step adds one micro-batch of those
continuations with the KL to the teacher on each written token (the prompt's tokens are trained on as usual).

The continuations come in rounds: a pool of `RecoverConfig.on_policy` continuations is written by the student as it
is at the round's first step and trained on over the next on_policy / micro_batch_size steps, a micro-batch a step;
then the next round writes a new pool. The pool is part of the training state (checkpoints and --lr auto's
snapshots hold it), so a resumed run trains on the same continuations. With several processes each writes its own
pool from its own prompts.
"""
from __future__ import annotations

import random
from typing import Sequence

from .data import IGNORE_INDEX, Example

PREFIX_TOKENS = 16  # a text sequence (or a record trained on its prompt too) is continued after its first tokens


def prompt_of(example: Example, room: int) -> list[int]:
    """The prompt to continue from a training example: a record's prompt (its tokens without labels), else its first
    PREFIX_TOKENS tokens; the last `room` of them when longer."""
    labelled = next((i for i, t in enumerate(example.labels) if t != IGNORE_INDEX), 0)
    ids = example.input_ids[:labelled] if labelled > 0 else example.input_ids[:PREFIX_TOKENS]
    return ids[-room:]


def pool_prompts(train: Sequence[Example], count: int, seed: int, round_: int, process: int, room: int) -> list[list[int]]:
    """`count` prompts for one process's pool in round `round_`: training examples drawn without replacement
    (cycled when there are fewer), seeded by (seed, round, process)."""
    order = list(range(len(train)))
    random.Random(seed * 1_000_003 + round_ * 1_009 + process).shuffle(order)
    return [prompt_of(train[order[k % len(order)]], room) for k in range(count)]


def write_pool(model, prompts: list[list[int]], settings, stops: list[int], batch_size: int) -> list[list[int]]:
    """The model's greedy continuations of `prompts` as rows [prompt length, prompt ids..., written ids...]."""
    from ..evaluation.text import continue_ids

    written = continue_ids(model, prompts, settings, stops, batch_size)
    return [[len(p), *p, *new] for p, (new, _) in zip(prompts, written)]


def as_example(row: list[int]) -> Example:
    """A pool row as a training example whose labels are the written tokens only (the positions that predict them
    are the ones the KL covers)."""
    n, ids = row[0], row[1:]
    return Example(input_ids=list(ids), labels=[IGNORE_INDEX] * n + list(ids[n:]))


def repeat_bans(input_ids, keep, n: int):
    """[K, 2] (row, token) pairs: at each row of the kept positions (`keep`, [batch, width - 1], row-major order:
    the rows the KL walks), the tokens that would complete an n-gram already written earlier in the same
    continuation (the kept positions of a batch row are its continuation). What the teacher then predicts is what
    it would write under transformers' no_repeat_ngram_size=n, within the continuation."""
    import torch

    ids, found = input_ids.tolist(), []
    rows = keep.reshape(-1).cumsum(0).sub(1).view_as(keep).tolist()
    for b, positions in enumerate(keep.tolist()):
        js = [j for j, k in enumerate(positions) if k]
        if not js:
            continue
        start = js[0] + 1  # the first written token
        seen: dict[tuple, set] = {}
        for j in js:
            # position j predicts token j + 1, after the written tokens start..j
            if j + 1 - start >= n - 1:
                context = tuple(ids[b][j - n + 2 : j + 1])
                found += [(rows[b][j], t) for t in sorted(seen.get(context, ()))]
                seen.setdefault(context, set()).add(ids[b][j + 1])
    return torch.tensor(found, dtype=torch.long, device=input_ids.device).reshape(-1, 2)
