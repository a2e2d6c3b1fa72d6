"""Calibration text for reconstruction: what the refits see decides what they restore.

Measured on the demo's prune (BENCHMARKS.md, "Reconstruction"; pruned: prose perplexity 854, validation KL on
teacher text / records 2.88 / 3.26): calibrated on general text the refit restores prose most (152; 1.25 / 1.55),
calibrated on the task records it restores text like the records most and prose nearly as well (160; 1.56 / 1.27),
and only the records-calibrated refit raised task accuracy (39.5 against 35.4 pruned and 35.8, 100 per task). The
default is general text, which serves any model and any use; offline, with no corpus to download, the unpruned
model writes it (`teacher`): sampled continuations of general openings. Calibrate on records when the tasks are
the point.
Sources: `teacher`, `records` (the recovery's training records as plain text), a .json file / directory of records,
or any text source (rora.sources.text.TextSource: a .txt/.jsonl file, a save_to_disk directory, parquet/arrow/jsonl
shards, a dataset directory or hub id, options as `SPEC?split=..&field=..&config=..`), of which only the first
(num_samples + holdout_samples) * seq_len tokens are read. Documents are packed into sequences of `seq_len` tokens,
EOS between them.
"""
from __future__ import annotations

import random
from pathlib import Path

import torch

from ..errors import DataError
from ..sources.text import (TextSource, general_prompts, names_records, pack, read_documents, read_records, record_text,
                            teacher_written, text_sequences)


def calibration_sequences(config, tokenizer, teacher=None, records: list[dict] | None = None,
                          progress: bool = False) -> tuple[torch.Tensor, str]:
    """([num_samples + holdout_samples, seq_len] token ids, a description of the source) for `config` (a
    ReconstructConfig). `records`: the training records, for calibration `records`."""
    need = config.num_samples + config.holdout_samples
    source = config.calibration
    if source == "teacher":
        seqs = _teacher_sequences(config, tokenizer, teacher, need, progress)
        what = f"teacher-written text ({len(GENERAL)} general openings, temperature {config.temperature})"
    elif source == "records" or names_records(source):
        if source == "records" and not records:
            raise DataError("calibration 'records' needs training records: pass --data (or use --calibration teacher)")
        texts = [record_text(r) for r in (records if source == "records" else read_records(source))]
        seqs = _full(pack(_shuffled(texts, config.seed), tokenizer, config.seq_len), config.seq_len)
        what = "training records" if source == "records" else str(Path(source).expanduser().resolve())
    else:
        seqs, what = text_sequences(TextSource.parse(source), tokenizer, config.seq_len, need, config.seed)
    if len(seqs) < need:
        raise DataError(f"the calibration text ({what}) fills {len(seqs)} sequences of {config.seq_len} tokens, "
                        f"but num_samples + holdout_samples = {need} are needed; give more text or lower them")
    return torch.tensor(seqs[:need], dtype=torch.long), what


GENERAL = general_prompts(16, 0)


def _teacher_sequences(config, tokenizer, teacher, need: int, progress: bool) -> list[list[int]]:
    if teacher is None:
        raise DataError("calibration 'teacher' needs the unpruned model to write the text: pass --teacher")
    # A text is its opening plus seq_len new tokens (no EOS), so `need` texts fill `need` sequences and a little more.
    path = teacher_written(teacher, tokenizer, general_prompts(need, config.seed), config.seq_len, config.temperature,
                           config.seed, progress, full_length=True)
    return _full(pack(read_documents(path), tokenizer, config.seq_len), config.seq_len)


def _full(seqs: list[list[int]], length: int) -> list[list[int]]:
    return [q for q in seqs if len(q) == length]


def _shuffled(docs: list[str], seed: int) -> list[str]:
    docs = list(docs)
    random.Random(seed).shuffle(docs)
    return docs
