"""The `generate` protocol's engine: LLM-Adapters beam search, batched.

The reference runs one prompt at a time with no attention mask. Here a task's prompts are sorted by token length
(so a batch pads little) and laid out as [common prefix | left pads | rest] with an attention mask; `generate`
derives position ids from the mask, so each row sees exactly the positions and context it would see alone. The
common prefix is encoded once per batch and each prompt once (generate alone would encode it once per beam), and
the beams' KV cache grows and reorders in place (_BeamLayer). `generate_reference` is the one-at-a-time loop of
the reference script, kept as the baseline that tests and the benchmark compare against.
"""
from __future__ import annotations

from typing import Sequence

import torch
from transformers.cache_utils import DynamicLayer

from ..architecture import cache_argument
from ..writing import layout_rows, quiet_generate
from .loglik import progress_bar, shared_prefix_length
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
    bar = progress_bar(len(prompts), progress, "generate")
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        input_ids, mask, cache = _prefill(model, [encoded[i] for i in chunk], config.pad_token_id, num_beams,
                                          max_new_tokens)
        with quiet_generate():
            out = model.generate(input_ids=input_ids, attention_mask=mask, **cache_argument(cache),
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
        with quiet_generate():
            out = model.generate(input_ids=input_ids, generation_config=config)
        responses.append(response_of(tokenizer.decode(out[0], skip_special_tokens=True)))
    return responses


TOKENS_PER_PASS = 512  # prefill rows x width per forward pass: CPU matmuls ran fastest near 512 rows (measured)


def _prefill(model, rows: list[list[int]], pad_id: int, num_beams: int, max_new_tokens: int):
    """(input_ids, attention_mask, cache) for `generate`: the prompts' KV cache (all but each last token), computed
    once per prompt and laid out for its beams.

    `generate` expands every prompt to `num_beams` rows before its first forward pass, so it would encode each
    prompt num_beams times; prompts are ~85% of the tokens processed. Here the batch's common prefix (a task's
    prompts share their first ~35 of ~100 tokens) is encoded once, then the rest of the prompts in sub-batches of
    similar length (`rows` come longest first) of about TOKENS_PER_PASS tokens, which pad little and keep the
    matmuls in cache; each row's keys and values are copied into the beams' buffers (_BeamLayer). Given this cache,
    generate runs only the last prompt token and then decodes as usual.
    """
    from transformers import DynamicCache

    shared = shared_prefix_length(rows, limit=min(len(r) for r in rows) - 1)
    input_ids, mask = layout_rows(rows, shared, pad_id, model.device)
    length = input_ids.shape[1] - 1  # the cache holds every position but the last
    cache = DynamicCache(config=model.config)
    if length == 0 or any(type(layer) is not DynamicLayer for layer in cache.layers):
        return input_ids, mask, None  # nothing to cache, or sliding-window layers: generate encodes the prompts

    def forward(ids, attention_mask, positions, prefix):
        cache = DynamicCache(config=model.config)
        for i, (k, v) in enumerate(prefix):
            cache.update(k.expand(len(ids), -1, -1, -1), v.expand(len(ids), -1, -1, -1), i)
        model(input_ids=ids, attention_mask=attention_mask, position_ids=positions, **cache_argument(cache),
              use_cache=True, logits_to_keep=1)
        return [(layer.keys, layer.values) for layer in cache.layers]

    layers: list[_BeamLayer] = []

    def put(kv, row, end):  # kv: [heads, n, dim] per layer, for positions [end - n, end) of `row`'s beams
        if not layers:
            layers.extend(_BeamLayer(k, len(rows), num_beams, length, max_new_tokens + 1) for k, _ in kv)
        for layer, (k, v) in zip(layers, kv):
            layer.put(row, k, v, end)

    prefix = []
    if shared:
        ids = torch.tensor([rows[0][:shared]], device=model.device)
        prefix = forward(ids, torch.ones_like(ids), torch.arange(shared, device=model.device)[None], [])
        put([(k[0], v[0]) for k, v in prefix], slice(None), shared)  # every row starts with it
    tails = [r[shared:-1] for r in rows]
    for group in _groups([len(t) for t in tails], TOKENS_PER_PASS):
        ids, tail_mask = layout_rows([tails[j] for j in group], 0, pad_id, model.device)
        if ids.shape[1] == 0:
            continue
        positions = shared + (tail_mask.cumsum(-1) - 1).clamp(min=0)
        full_mask = torch.cat([tail_mask.new_ones(len(group), shared), tail_mask], dim=1)
        kv = forward(ids, full_mask, positions, prefix)
        for g, j in enumerate(group):  # left-padded: a row's own positions are the group cache's last ones
            if tails[j]:
                n = len(tails[j])
                put([(k[g, :, -n:], v[g, :, -n:]) for k, v in kv], j, length)
    cache.layers = layers
    return input_ids, mask, cache


def _groups(lengths: list[int], budget: int) -> list[list[int]]:
    """Consecutive indices (lengths non-increasing) in groups of at most `budget` padded tokens (at least one)."""
    groups: list[list[int]] = []
    for i in range(len(lengths)):
        if groups and (len(groups[-1]) + 1) * max(lengths[groups[-1][0]], 1) <= budget:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


class _BeamLayer(DynamicLayer):
    """One layer's KV cache for beam search over a shared prompt, without the copies DynamicLayer makes.

    DynamicLayer grows by torch.cat (a copy of the whole cache per step) and reorders beams with index_select over
    every position (another); on a CPU the two cost ~23% of batched generation. Here the cache lives in one buffer
    sized for prompt + new tokens, written in place; and since beam search only permutes beams within one prompt's
    group, whose prompt positions are identical, a reorder moves only the generated positions.
    """

    def __init__(self, like: torch.Tensor, rows: int, num_beams: int, length: int, room: int):
        super().__init__()
        heads, dim = like.shape[-3], like.shape[-1]
        # zeros, not empty: pad positions are masked out, but a NaN there would still poison the attention output
        self._buf = [like.new_zeros(rows * num_beams, heads, length + room, dim) for _ in range(2)]
        self.rows, self.group, self.prompt, self.length = rows, num_beams, length, length
        self.is_initialized, self.dtype, self.device = True, like.dtype, like.device
        self._views()

    def put(self, row, keys: torch.Tensor, values: torch.Tensor, end: int) -> None:
        """Keys/values [heads, n, dim] at positions [end - n, end) of one prompt's beams (row=slice(None): all)."""
        for buf, t in zip(self._buf, (keys, values)):
            beams = buf.view(self.rows, self.group, *buf.shape[1:])[row]
            beams[..., end - t.shape[-2]:end, :] = t

    def _views(self):
        self.keys, self.values = (buf[:, :, : self.length] for buf in self._buf)

    def update(self, key_states, value_states, *args, **kwargs):
        new = key_states.shape[-2]
        if self.length + new > self._buf[0].shape[-2]:
            self._buf = [torch.cat([b, b.new_empty(*b.shape[:2], new, b.shape[-1])], dim=-2) for b in self._buf]
        for buf, t in zip(self._buf, (key_states, value_states)):
            buf[:, :, self.length : self.length + new] = t
        self.length += new
        self._views()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        rows = torch.arange(len(beam_idx), device=beam_idx.device)
        within = bool((beam_idx // self.group == rows // self.group).all())
        start = self.prompt if within else 0  # prompt positions are equal within a group: nothing to move
        for buf in self._buf:
            buf[:, :, start : self.length] = buf[:, :, start : self.length].index_select(0, beam_idx)
        self._views()
