"""On-policy distillation: the student writes, the teacher grades (GKD, Agarwal et al., ICLR 2024).

Distilling on fixed text teaches the student the teacher's next token in the states that text visits. Writing takes
the student to states of its own, where a small error compounds: the demo's recovered model, distilled on records
and prose alone, loops ("She was a woman who was a woman. She was a woman who ...") on 61% of its greedy 4-grams,
the unpruned model on 22%. Here the student continues prompts drawn from its own training data, greedily (the
decoding rora's quality figure and most deployments use): at every training step it writes
`RecoverConfig.on_policy` continuations, as it is at that step, and the step trains on them as one more micro-batch,
with the KL to the teacher on each written token (the prompts' own tokens are trained on as usual). The prompts are
drawn from the training data by (seed, step, process), so a resumed run writes what the uninterrupted one wrote; with
several processes each writes its own.

A teacher still follows a loop once it is in one: in-context copying makes "No. No. No." likely to go on for the
unpruned model too. With `on_policy_no_repeat` = n the teacher grades as it would write under transformers'
no_repeat_ngram_size=n: at each written token its distribution leaves out the tokens that would repeat an n-gram of
the continuation (repeat_bans), so the student learns to leave a loop where it starts.
"""
from __future__ import annotations

import random
from typing import Sequence

import torch

from .data import IGNORE_INDEX, Example

PREFIX_TOKENS = 16  # a text sequence (or a record trained on its prompt too) is continued after its first tokens


def prompt_of(example: Example, room: int) -> list[int]:
    """The prompt to continue from a training example: a record's prompt (its tokens without labels), else its first
    PREFIX_TOKENS tokens; the last `room` of them when longer."""
    labelled = next((i for i, t in enumerate(example.labels) if t != IGNORE_INDEX), 0)
    ids = example.input_ids[:labelled] if labelled > 0 else example.input_ids[:PREFIX_TOKENS]
    return ids[-room:]


def step_prompts(train: Sequence[Example], count: int, seed: int, step: int, process: int, room: int) -> list[list[int]]:
    """`count` prompts for one process at one step: training examples drawn without replacement (cycled when there
    are fewer), seeded by (seed, step, process)."""
    order = list(range(len(train)))
    random.Random(seed * 1_000_003 + step * 1_009 + process).shuffle(order)
    return [prompt_of(train[order[k % len(order)]], room) for k in range(count)]


def write_examples(model, prompts: list[list[int]], settings, stops: list[int]) -> list[Example]:
    """The model's greedy continuations of `prompts` (one batch), as training examples whose labels are the written
    tokens only: the positions that predict them are the ones the KL covers."""
    from ..writing import continue_ids

    written = continue_ids(model, prompts, settings, stops, len(prompts))
    return [Example(input_ids=p + new, labels=[IGNORE_INDEX] * len(p) + new) for p, (new, _) in zip(prompts, written)]


def describe(figures: dict) -> str:
    """One line on a run's on-policy distillation (RecoverResult.on_policy), for the CLI report and the summary."""
    graded = f", graded by the teacher without repeating a {figures['no_repeat']}-gram" if figures.get("no_repeat") else ""
    return (f"the student wrote {figures['continuations']} greedy continuations of {figures['new_tokens']} tokens at "
            f"every step{graded}; KL to the teacher on its own writing {figures['written_kl_first']:.3f} -> "
            f"{figures['written_kl_last']:.3f} nats/token (first and last step)")


def repeat_bans(input_ids, keep, n: int):
    """[K, 2] (row, token) pairs: at each row of the kept positions (`keep`, [batch, width - 1], row-major order:
    the rows the KL walks), the tokens that would complete an n-gram already written earlier in the same
    continuation (the kept positions of a batch row are its continuation). What the teacher then predicts is what
    it would write under transformers' no_repeat_ngram_size=n, within the continuation."""
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
