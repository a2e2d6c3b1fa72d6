"""Training data: load records (file, task directory, hub id, list), split off the validation set, tokenize
with the LLM-Adapters prompt, and plan length-grouped micro-batches.

Records follow the LLM-Adapters / Alpaca format: `instruction` and `output` (strings, required) and `input`
(optional, default ""). Examples longer than the cutoff are dropped and counted, never silently truncated.
"""
from __future__ import annotations

import array
import hashlib
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ..artifacts import DATA_LIMIT, read_json, read_text
from ..config import MAX_STEPS
from ..errors import ConfigError, DataError, detail
from ..sources.text import TextSource, pack, pack_source
from .prompts import split_prompt

IGNORE_INDEX = -100
REQUIRED_FIELDS = ("instruction", "output")
MEGA_BATCH_MULT = 50  # length grouping sorts within windows of 50 micro-batches (HF's LengthGroupedSampler value)


@dataclass
class Example:
    """One tokenized training example: ids and labels (IGNORE_INDEX on positions without loss)."""

    input_ids: list[int]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class TokenizedData:
    train: list[Example]
    val: list[Example]
    dropped_too_long: int  # train + val examples longer than the cutoff
    fingerprint: str  # hash of the train/val records, so --resume can refuse different data
    text: dict | None = None  # plain text: what was read (rora.sources.text.PackedText.record)


def load_records(data: str | Path | Sequence[dict]) -> list[dict]:
    """Records from a list, a .json/.jsonl file, a directory of <task>/train.json, or a hub dataset id."""
    if isinstance(data, (list, tuple)):
        records = list(data)
    elif not isinstance(data, (str, os.PathLike)):
        raise DataError(f"training data is a path, a hub id or a list of records, got {type(data).__name__}")
    else:
        path = Path(data).expanduser()
        if path.is_file():
            records = _read_file(path)
        elif path.is_dir():
            files = sorted(path.glob("*/train.json")) or sorted(path.glob("train.json"))
            if not files:
                raise DataError(f"{path} holds no <task>/train.json files; pass a JSON/JSONL file or such a directory")
            records = [r for f in files for r in _read_file(f)]
        elif path.suffix in (".json", ".jsonl") or str(data).startswith((".", "/", "~")):
            raise DataError(f"data file not found: {path}")
        else:
            records = _load_hub(str(data))
    if not records:
        raise DataError(f"the dataset {data if not isinstance(data, (list, tuple)) else '(list)'} is empty")
    return [normalize_record(r, i) for i, r in enumerate(records)]


def _read_file(path: Path) -> list[Any]:
    if path.suffix == ".jsonl":
        records = []
        for number, line in enumerate(read_text(path, DataError, DATA_LIMIT).splitlines(), 1):  # the file's line
            try:
                records += [json.loads(line)] if line.strip() else []
            except (json.JSONDecodeError, RecursionError) as exc:
                raise DataError(f"{path} is not valid JSONL: line {number}: {detail(exc)}") from None
        return records
    records = read_json(path, DataError, DATA_LIMIT)
    if not isinstance(records, list):
        raise DataError(f"{path} must hold a JSON list of records, not {type(records).__name__}")
    return records


def _load_hub(name: str) -> list[dict]:
    import datasets

    try:
        ds = datasets.load_dataset(name, split="train")
    except Exception as exc:  # datasets raises many types (ConnectionError, FileNotFoundError, DatasetNotFound...)
        raise DataError(
            f"cannot load dataset {name!r} from the hub ({type(exc).__name__}: {detail(exc)}); "
            "offline, pass a local JSON/JSONL file or a directory of <task>/train.json"
        ) from None
    return [dict(r) for r in ds]


def normalize_record(record: Any, index: int) -> dict:
    """{'instruction', 'input', 'output'} as strings, or DataError naming the record and field."""
    if not isinstance(record, dict):
        raise DataError(f"record {index} is a {type(record).__name__}, expected an object with instruction/output")
    for key in REQUIRED_FIELDS:
        if key not in record or record[key] is None:
            raise DataError(f"record {index} has no {key!r} field (fields: {', '.join(map(str, record)) or 'none'})")
    out = {"instruction": record["instruction"], "input": record.get("input") or "", "output": record["output"]}
    for key, value in out.items():
        if not isinstance(value, str):
            raise DataError(f"record {index} field {key!r} must be a string, got {type(value).__name__}")
    return out


def split_train_val(records: list[dict], val_set_size: int, seed: int, max_train_examples: int | None = None):
    """Seeded shuffle; the first `val_set_size` are validation, the rest training (first N of them if capped)."""
    if val_set_size >= len(records):
        raise DataError(
            f"val_set_size {val_set_size} leaves no training examples out of {len(records)}; lower --val-set-size"
        )
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    val = [records[i] for i in order[:val_set_size]]
    train = [records[i] for i in order[val_set_size:]]
    if max_train_examples is not None:
        train = train[:max_train_examples]
    return train, val


def tokenize_record(record: dict, tokenizer, cutoff_len: int, train_on_inputs: bool) -> Example | None:
    """The LLM-Adapters encoding: prompt + response, EOS appended when shorter than the cutoff; None if too long.

    Prompt tokens get IGNORE_INDEX unless `train_on_inputs`. A token is part of the prompt when it ends inside
    the prompt text (character offsets), so a token straddling the boundary counts as response.
    """
    prompt, text = split_prompt(record["instruction"], record["input"], record["output"])
    enc = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    if len(ids) > cutoff_len:
        return None
    if len(ids) < cutoff_len and tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
        ids.append(tokenizer.eos_token_id)
    if train_on_inputs:
        labels = list(ids)
    else:
        # Special tokens have empty offsets (0, 0): a leading BOS is prompt, a tokenizer-added EOS is response.
        in_prompt = [end <= len(prompt) and not (i and start == end == 0) for i, (start, end) in enumerate(enc["offset_mapping"])]
        labels = [IGNORE_INDEX if p else t for t, p in zip(enc["input_ids"], in_prompt)] + ids[len(in_prompt):]
    return Example(ids, labels)


def tokenize(records: list[dict], tokenizer, cutoff_len: int, train_on_inputs: bool) -> tuple[list[Example], int]:
    """Tokenized examples and the number dropped for exceeding `cutoff_len`."""
    examples = [tokenize_record(r, tokenizer, cutoff_len, train_on_inputs) for r in records]
    kept = [e for e in examples if e is not None]
    return kept, len(examples) - len(kept)


def prepare(data, tokenizer, config) -> TokenizedData:
    """Load, split and tokenize `data` as `config` (a RecoverConfig) says."""
    records = load_records(data)
    train_r, val_r = split_train_val(records, config.val_set_size, config.seed, config.max_train_examples)
    train, dropped_train = tokenize(train_r, tokenizer, config.cutoff_len, config.train_on_inputs)
    val, dropped_val = tokenize(val_r, tokenizer, config.cutoff_len, config.train_on_inputs)
    if not train:
        raise DataError(
            f"all {len(train_r)} training examples are longer than cutoff_len={config.cutoff_len} tokens; "
            "raise --cutoff-len"
        )
    digest = hashlib.sha256(json.dumps([train_r, val_r], sort_keys=True).encode()).hexdigest()[:16]
    return TokenizedData(train, val, dropped_train + dropped_val, digest)


def epoch_micro_batches(lengths: list[int], micro_batch_size: int, seed: int, epoch: int, group_by_length: bool) -> list[list[int]]:
    """One epoch's micro-batches (lists of example indices), a pure function of (seed, epoch).

    With `group_by_length`, examples are sorted by length inside windows of MEGA_BATCH_MULT micro-batches, so each
    micro-batch holds similar lengths (little padding); the micro-batch order is then shuffled again.
    """
    rng = random.Random(f"{seed}-{epoch}")
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if group_by_length:
        window = micro_batch_size * MEGA_BATCH_MULT
        order = [i for s in range(0, len(order), window) for i in sorted(order[s:s + window], key=lambda j: -lengths[j])]
    batches = [order[s:s + micro_batch_size] for s in range(0, len(order), micro_batch_size)]
    if group_by_length:
        rng.shuffle(batches)
    return batches


def step_plan(lengths: list[int], micro_batch_size: int, accumulation: int, total_steps: int, seed: int,
              group_by_length: bool) -> list[list[list[int]]]:
    """`total_steps` optimizer steps, each `accumulation` micro-batches; epochs follow one another as needed."""
    steps, pending, epoch = [], [], 0
    while len(steps) < total_steps:
        pending += epoch_micro_batches(lengths, micro_batch_size, seed, epoch, group_by_length)
        epoch += 1
        while len(pending) >= accumulation and len(steps) < total_steps:
            steps.append(pending[:accumulation])
            pending = pending[accumulation:]
    return steps


def count_steps(num_examples: int, config) -> int:
    """max_steps, else ceil(epochs * micro-batches per epoch / accumulation) (at least 1)."""
    if config.max_steps is not None:
        return config.max_steps
    micro_per_epoch = -(-num_examples // config.micro_batch_size)
    accumulation = config.batch_size // config.micro_batch_size
    steps = max(1, -(-int(round(config.epochs * micro_per_epoch)) // accumulation))
    if steps > MAX_STEPS:  # the step plan holds one entry per step: refused before it is built
        raise ConfigError(f"recover.epochs {config.epochs:g} over {num_examples} examples is {steps} optimizer steps, "
                          f"more than {MAX_STEPS}; lower --epochs or set --max-steps")
    return steps


def collate(examples: list[Example], pad_id: int):
    """Right-padded (input_ids, labels) tensors; pads get IGNORE_INDEX.

    No attention mask is needed: with right padding and a causal mask, real tokens never attend to the pads after
    them, and the positions of real tokens are unchanged; so SDPA can take its is_causal fast path.
    """
    import torch

    width = max(len(e) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for row, e in enumerate(examples):
        ids[row, : len(e)] = torch.tensor(e.input_ids)
        labels[row, : len(e)] = torch.tensor(e.labels)
    return ids, labels


# ---- plain text (distillation needs no labels) --------------------------------------------------------------------
def pack_texts(docs: list[str], tokenizer, cutoff_len: int) -> list[Example]:
    """Documents packed into sequences of `cutoff_len` tokens (rora.sources.text.pack), every token labelled: on
    plain text, SFT is language modelling."""
    return [Example(q, q) for q in pack(docs, tokenizer, cutoff_len)]


def text_source(config) -> TextSource | None:
    """The --text source of `config` (a RecoverConfig) with its split, field and dataset config; None without one."""
    if config.text is None:
        return None
    return TextSource.parse(config.text, config.text_split, config.text_field, config.text_config)


def check_text(config) -> None:
    """Fail on a --text source that cannot be read before anything is loaded: a missing path, a glob matching
    nothing, a hub id while offline or without a token budget."""
    source = text_source(config)
    if source is not None and source.check() == "hub" and config.max_text_tokens is None:
        raise DataError(f"the hub dataset {source.spec!r} is streamed: give a token budget (--max-text-tokens) so "
                        "that rora knows where to stop reading")


def prepare_text(source: TextSource | str | Path, tokenizer, config) -> TokenizedData:
    """Read and pack a text source (at most config.max_text_tokens tokens, in the source's order); the validation
    set is `val_set_size` packed sequences (seeded), as for records. Every token is labelled (the ids are the labels:
    one list serves both)."""
    source = source if isinstance(source, TextSource) else TextSource.parse(str(source))
    packed = pack_source(source, tokenizer, config.cutoff_len, config.max_text_tokens)
    if not packed.sequences:
        raise DataError(f"{source.spec} holds fewer than two tokens of text")
    sequences = [Example(q, q) for q in packed.sequences]
    train, val = split_train_val(sequences, config.val_set_size, config.seed, config.max_train_examples)
    return TokenizedData(train, val, 0, _token_digest(train, val), text=packed.record)


def _token_digest(*parts: list[Example]) -> str:
    """A hash of the token ids of each part, in order (cheap on millions of tokens: no JSON)."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(b"|")
        for e in part:
            digest.update(len(e).to_bytes(4, "little") + array.array("q", e.input_ids).tobytes())
    return digest.hexdigest()[:16]


def mix(text: TokenizedData, records: TokenizedData, ratio: float) -> TokenizedData:
    """Text sequences and records together, `ratio` of the training tokens from the text: as many of both as the
    scarcer one allows (each side in its own seeded order). Validation keeps both sides' held-out examples, so the
    best checkpoint is chosen on text and records alike."""
    text_tokens = sum(len(e) for e in text.train)
    record_tokens = sum(len(e) for e in records.train)
    want_text = min(text_tokens, ratio / (1 - ratio) * record_tokens)
    want_records = want_text * (1 - ratio) / ratio
    from_text = _first_tokens(text.train, want_text)
    train = from_text + _first_tokens(records.train, want_records)
    digest = hashlib.sha256(f"{text.fingerprint}-{records.fingerprint}-{ratio}".encode()).hexdigest()[:16]
    record = {**(text.text or {}), "text_ratio": ratio, "mixed_text_tokens": sum(map(len, from_text))}
    return TokenizedData(train, text.val + records.val, records.dropped_too_long, digest, text=record)


def _first_tokens(examples: list[Example], tokens: float) -> list[Example]:
    """The first examples holding about `tokens` tokens (at least one)."""
    out, total = [], 0
    for e in examples:
        if out and total + len(e) / 2 > tokens:
            break
        out.append(e)
        total += len(e)
    return out
