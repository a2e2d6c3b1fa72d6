"""The `generate` protocol's engine: LLM-Adapters beam search, batched.

The reference runs one prompt at a time with no attention mask. Here prompts are sorted by token length (so a batch
pads little), left-padded, and given an attention mask; `generate` derives position ids from the mask, so each row
sees exactly the positions and context it would see alone. Each prompt is encoded once and its cache shared by its
beams (generate alone would encode it once per beam). `generate_reference` is the one-at-a-time loop of the
reference script, kept as the baseline that tests and the benchmark compare against.
"""
from __future__ import annotations

import logging
from typing import Sequence

import torch

from .tasks import response_of


def generation_config(tokenizer, num_beams: int = 4, max_new_tokens: int = 32):
    """Beam search without sampling (the reference's temperature/top_p/top_k have no effect without sampling)."""
    from transformers import GenerationConfig

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return GenerationConfig(
        num_beams=num_beams, do_sample=False, max_new_tokens=max_new_tokens,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=pad, bos_token_id=tokenizer.bos_token_id,
    )


@torch.inference_mode()
def generate_responses(model, tokenizer, prompts: Sequence[str], *, num_beams: int = 4, max_new_tokens: int = 32,
                       batch_size: int = 16, progress: bool = False) -> list[str]:
    """The reference's response for every prompt (text after "### Response:", stripped), computed in batches."""
    config = generation_config(tokenizer, num_beams, max_new_tokens)
    encoded = [tokenizer(p).input_ids for p in prompts]  # special tokens as the reference's tokenizer(prompt)
    # Longest first: similar lengths share a batch (little padding) and memory peaks at the start, not the end.
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    responses: list[str] = [""] * len(prompts)
    bar = _progress(len(prompts), progress, "generate")
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        input_ids, mask = _left_pad([encoded[i] for i in chunk], config.pad_token_id, model.device)
        cache = _prefill(model, input_ids, mask, num_beams)
        with _quiet_generate():
            out = model.generate(input_ids=input_ids, attention_mask=mask, past_key_values=cache,
                                 generation_config=config)
        # Decode the whole row like the reference (pads are special tokens and vanish), then split.
        for i, text in zip(chunk, tokenizer.batch_decode(out, skip_special_tokens=True)):
            responses[i] = response_of(text)
        bar.update(len(chunk))
    bar.close()
    return responses


@torch.inference_mode()
def generate_reference(model, tokenizer, prompts: Sequence[str], *, num_beams: int = 4,
                       max_new_tokens: int = 32) -> list[str]:
    """The reference script's loop: batch 1, no attention mask, decode, split. The slow baseline."""
    config = generation_config(tokenizer, num_beams, max_new_tokens)
    responses = []
    for prompt in prompts:
        input_ids = tokenizer(prompt, return_tensors="pt").input_ids.to(model.device)
        with _quiet_generate():
            out = model.generate(input_ids=input_ids, generation_config=config)
        responses.append(response_of(tokenizer.decode(out[0], skip_special_tokens=True)))
    return responses


def _prefill(model, input_ids: torch.Tensor, mask: torch.Tensor, num_beams: int):
    """The prompts' KV cache (all but the last token), computed once per prompt and copied to its beams.

    `generate` expands every prompt to `num_beams` rows before its first forward pass, so it would encode each
    prompt num_beams times; prompts are ~85% of the tokens processed. Given this cache, generate runs only the
    last prompt token and then decodes as usual.
    """
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # what generate derives from the mask: pads do not count
    model(input_ids=input_ids[:, :-1], attention_mask=mask[:, :-1], position_ids=positions[:, :-1],
          past_key_values=cache, use_cache=True, logits_to_keep=1)
    cache.batch_repeat_interleave(num_beams)
    return cache


def _left_pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for j, r in enumerate(rows):
        ids[j, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[j, width - len(r):] = 1
    return ids.to(device), mask.to(device)


class _quiet_generate:
    """transformers warns on every call without a mask (the reference's way) and on generation flags; hush it."""

    def __enter__(self):
        self.logger = logging.getLogger("transformers.generation.utils")
        self.level = self.logger.level
        self.logger.setLevel(logging.ERROR)

    def __exit__(self, *exc):
        self.logger.setLevel(self.level)


def _progress(total: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, desc=desc, leave=False)
