"""Writing: a model continues prompts of token ids (greedy or sampled, batched, left-padded), for the evaluation's
generate protocol and `rora generate` (rora.evaluation) and for the recovery's on-policy distillation, which trains
on what the student writes (rora.recovery.on_policy)."""
from __future__ import annotations

import logging
from typing import Callable, Sequence

import torch

from .config import GenerateConfig


def layout_rows(rows: list[list[int]], shared: int, pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) laid out as [common prefix | left pads | rest of the prompt].

    The rows' first `shared` tokens are equal, so their cache is computed once and sits in front; the pads sit
    between it and each row's own tokens, masked out. Positions come from the mask (pads do not count), so every
    token has the position and context it has alone. shared=0 is plain left padding.
    """
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    ids[:, :shared] = torch.tensor(rows[0][:shared], dtype=torch.long)
    mask[:, :shared] = 1
    for j, r in enumerate(rows):
        ids[j, width - len(r) + shared:] = torch.tensor(r[shared:], dtype=torch.long)
        mask[j, width - len(r) + shared:] = 1
    return ids.to(device), mask.to(device)


class quiet_generate:
    """transformers warns on every call without a mask (the reference's way) and on generation flags; hush it."""

    def __enter__(self):
        self.logger = logging.getLogger("transformers.generation.utils")
        self.level = self.logger.level
        self.logger.setLevel(logging.ERROR)

    def __exit__(self, *exc):
        self.logger.setLevel(self.level)


def stop_ids(model, tokenizer) -> list[int]:
    """The tokens that end a text: the tokenizer's end-of-text and the model's own (a chat model's end of turn)."""
    own = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [tokenizer.eos_token_id] + (own if isinstance(own, list) else [own])
    return list(dict.fromkeys(i for i in ids if i is not None))


def writing_settings(model, tokenizer, config: GenerateConfig | dict):
    """(transformers GenerationConfig, stop ids) for `model` writing as `config` says."""
    stops = stop_ids(model, tokenizer)
    return _generation_config(tokenizer, GenerateConfig.coerce(config), stops), stops


def _generation_config(tokenizer, config: GenerateConfig, stops: list[int]):
    from transformers import GenerationConfig

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    sampling = {"do_sample": True, "temperature": config.temperature, "top_p": config.top_p, "top_k": 0} \
        if config.temperature > 0 else {"do_sample": False}
    return GenerationConfig(max_new_tokens=config.max_new_tokens, eos_token_id=stops, pad_token_id=pad,
                            bos_token_id=tokenizer.bos_token_id, num_beams=1, **sampling)


def _until_stop(row: list[int], stops: list[int]) -> tuple[list[int], bool]:
    """A written row up to its first end-of-text token (kept), without the padding after it."""
    for k, token in enumerate(row):
        if token in stops:
            return row[:k + 1], True
    return row, False


@torch.inference_mode()
def continue_ids(model, encoded: Sequence[list[int]], settings, stops: list[int], batch_size: int, *,
                 streamer: Callable | None = None, done: Callable[[int], object] | None = None) -> list[tuple[list[int], bool]]:
    """What `model` writes after each prompt of token ids under `settings` (a transformers GenerationConfig), as
    (new ids up to and including the first of `stops`, stopped on one), in the prompts' order. Prompts run longest
    first in left-padded batches of `batch_size` (similar lengths share a batch); `streamer` makes each batch's
    streamer, `done` hears how many prompts each batch finished. The model is left in eval mode."""
    device = next(model.parameters()).device
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    found: list[tuple[list[int], bool] | None] = [None] * len(encoded)
    model.eval()
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        ids, mask = layout_rows([encoded[i] for i in chunk], 0, settings.pad_token_id, device)
        with quiet_generate():
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=settings,
                                 streamer=streamer() if streamer else None)
        for i, row in zip(chunk, out[:, ids.shape[1]:].tolist()):
            found[i] = _until_stop(row, stops)
        if done is not None:
            done(len(chunk))
    return found
