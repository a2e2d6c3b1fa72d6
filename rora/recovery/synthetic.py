"""Data-free distillation: the teacher writes its own training text (LLM-QAT, arXiv 2305.17888).

The teacher samples continuations of prompts: the training records' instructions (their prompt part, so the texts
stay in the domain of the task) or general openings (general text; also without records). Sampling and its cache (keyed by the
teacher's weights, prompts, count, length, temperature, seed, dtype, device type) live in rora.sources.text, which
the reconstruction stage's calibration text shares; a rerun or a resumed run reuses the texts.
"""
from __future__ import annotations

import random
from pathlib import Path

from ..sources.text import general_prompts, teacher_written
from .prompts import training_prompt


def synthetic_prompts(records: list[dict] | None, n: int, seed: int) -> list[str]:
    """`n` prompts: the records' training prompts (seeded order, cycled), or general openings cycled."""
    if not records:
        return general_prompts(n, seed)
    pool = [training_prompt(r["instruction"], r["input"]) for r in records]
    random.Random(seed).shuffle(pool)
    return [pool[i % len(pool)] for i in range(n)]


def synthetic_texts(teacher, tokenizer, records: list[dict] | None, config, progress: bool = False) -> Path:
    """The cached teacher-written texts for `config` (generated first when not cached); returns the .jsonl path."""
    from_records = records if config.synthetic_prompts == "records" else None
    prompts = synthetic_prompts(from_records, config.synthetic, config.seed)
    # General text runs its full length (a general opening has no natural end), as the reconstruction's calibration
    # text does: with the same count, length, temperature and seed, the two share one cached file.
    return teacher_written(teacher, tokenizer, prompts, config.synthetic_tokens, config.synthetic_temperature,
                           config.seed, progress, full_length=not from_records)
