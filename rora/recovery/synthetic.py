"""Data-free distillation: the teacher writes its own training text (LLM-QAT, arXiv 2305.17888).

The teacher samples continuations of prompts: the training records' instructions (their prompt part, so the texts
stay in the domain of the task) or, without records, a few short generic openings. The texts are cached as a
.jsonl file with a "text" field (the `--text` format) under RORA_CACHE_DIR/synthetic/, keyed by everything that
determines them (the teacher's weights, prompts, count, length, temperature, seed, dtype, device type), so a rerun
or a resumed run reuses them instead of sampling again.
"""
from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import torch

from ..artifacts import atomic_file, write_json
from .distill import model_signature
from .prompts import training_prompt

# Short, generic openings for the mode without records (LLM-QAT starts from single tokens; a few words give the
# small teachers used here a more natural start).
SEED_PROMPTS = (
    "The", "In", "A", "Once upon a time", "Question:", "Scientists have", "The history of", "How to", "My favourite",
    "When", "It is", "There are", "Today", "If you", "Many people", "One of the",
)
GENERATE_BATCH = 16


def synthetic_prompts(records: list[dict] | None, n: int, seed: int) -> list[str]:
    """`n` prompts: the records' training prompts (seeded order, cycled), or the seed openings cycled."""
    pool = [training_prompt(r["instruction"], r["input"]) for r in records] if records else list(SEED_PROMPTS)
    random.Random(seed).shuffle(pool)
    return [pool[i % len(pool)] for i in range(n)]


def cache_path(teacher, prompts: list[str], config) -> tuple[Path, dict]:
    from ..models import cache_dir

    dtype = next(teacher.parameters()).dtype
    settings = {
        "teacher": model_signature(teacher),
        "prompts": hashlib.sha256(json.dumps(prompts).encode()).hexdigest()[:16],
        "texts": config.synthetic,
        "new_tokens": config.synthetic_tokens,
        "temperature": config.synthetic_temperature,
        "seed": config.seed,
        "dtype": str(dtype).replace("torch.", ""),
        "device": next(teacher.parameters()).device.type,
    }
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir() / "synthetic" / f"{key}.jsonl", settings


def synthetic_texts(teacher, tokenizer, records: list[dict] | None, config, progress: bool = False) -> Path:
    """The cached teacher-written texts for `config` (generated first when not cached); returns the .jsonl path."""
    prompts = synthetic_prompts(records, config.synthetic, config.seed)
    path, settings = cache_path(teacher, prompts, config)
    if path.is_file():
        return path
    texts = generate(teacher, tokenizer, prompts, config.synthetic_tokens, config.synthetic_temperature, config.seed,
                     progress)
    with atomic_file(path) as tmp:
        tmp.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    write_json(path.with_suffix(".json"), settings)  # what made the texts, for a reader of the cache
    return path


@torch.inference_mode()
def generate(model, tokenizer, prompts: list[str], new_tokens: int, temperature: float, seed: int,
             progress: bool = False) -> list[str]:
    """Sampled continuations (pure sampling: no top-k/top-p cut), prompt included, in batches, left-padded."""
    from tqdm.auto import tqdm

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    torch.manual_seed(seed)
    texts = []
    try:
        for s in tqdm(range(0, len(prompts), GENERATE_BATCH), desc="teacher writes", unit="batch", disable=not progress):
            enc = tokenizer(prompts[s : s + GENERATE_BATCH], return_tensors="pt", padding=True).to(device)
            out = model.generate(**enc, do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                                 max_new_tokens=new_tokens, pad_token_id=pad)
            texts += tokenizer.batch_decode(out, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return texts
