"""Calibration text for reconstruction: what the refits see decides what they restore.

Measured on the demo's prune (BENCHMARKS.md, "Reconstruction"): calibrated on general text, the refit restores the
language model on prose and on the tasks; calibrated on the task records alone, it restores text like the records
and leaves prose almost where pruning left it. So the default is general text, and offline, with no corpus to
download, the unpruned model writes it (`teacher`): sampled continuations of general openings.
Sources: `teacher`, `records` (the recovery's training records as plain text), or a .txt/.jsonl file of text or a
.json file / directory of records. Documents are packed into sequences of `seq_len` tokens, EOS between them.
"""
from __future__ import annotations

import random
from pathlib import Path

import torch

from ..errors import DataError
from ..sources.text import general_prompts, pack, read_documents, record_text, teacher_written



def calibration_sequences(config, tokenizer, teacher=None, records: list[dict] | None = None,
                          progress: bool = False) -> tuple[torch.Tensor, str]:
    """([num_samples + holdout_samples, seq_len] token ids, a description of the source) for `config` (a
    ReconstructConfig). `records`: the training records, for calibration `records`."""
    need = config.num_samples + config.holdout_samples
    source = config.calibration
    if source == "teacher":
        seqs = _teacher_sequences(config, tokenizer, teacher, need, progress)
        what = f"teacher-written text ({len(GENERAL)} general openings, temperature {config.temperature})"
    elif source == "records":
        if not records:
            raise DataError("calibration 'records' needs training records: pass --data (or use --calibration teacher)")
        seqs = _full(pack(_shuffled([record_text(r) for r in records], config.seed), tokenizer, config.seq_len),
                     config.seq_len)
        what = "training records"
    else:
        seqs = _full(pack(_shuffled(_file_documents(source), config.seed), tokenizer, config.seq_len), config.seq_len)
        what = str(Path(source).expanduser().resolve())
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


def _file_documents(source: str) -> list[str]:
    path = Path(source).expanduser()
    if path.suffix in (".txt", ".jsonl"):
        return read_documents(path)
    from ..sources.text import read_records

    return [record_text(r) for r in read_records(path)]


def _full(seqs: list[list[int]], length: int) -> list[list[int]]:
    return [q for q in seqs if len(q) == length]


def _shuffled(docs: list[str], seed: int) -> list[str]:
    docs = list(docs)
    random.Random(seed).shuffle(docs)
    return docs
