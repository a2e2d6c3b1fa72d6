"""Plain text for the stages that need no labels: documents from files, text the teacher writes, held-out prose.

* `read_documents(path)`: a .txt file (one document) or a .jsonl file with a "text" field per line.
* `pack(docs, tokenizer, length)`: documents tokenized, each ended with EOS, concatenated and cut into sequences.
* `teacher_written(...)`: sampled continuations of prompts by a model (the unpruned teacher), cached as a .jsonl
  file (the --text format) under RORA_CACHE_DIR/synthetic/, keyed by everything that determines them.
* `prose_documents(source)`: held-out general prose for every report's perplexity and KL: WikiText-2's test split
  (the field's convention) when the hub answers, offline the BoolQ validation passages in RORA_DATA_DIR
  (Wikipedia paragraphs), or any .txt/.jsonl file. Measured only: nothing trains, calibrates or tunes on it.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path

import torch

from ..artifacts import DATA_LIMIT, read_json, read_text
from ..errors import DataError, detail

# General openings for teacher-written text when no task prompts are given (LLM-QAT starts from single tokens; a few
# words give small teachers a more natural start).
GENERAL_OPENINGS = (
    "The", "In", "A", "Once upon a time", "Question:", "Scientists have", "The history of", "How to", "My favourite",
    "When", "It is", "There are", "Today", "If you", "Many people", "One of the",
)
GENERATE_BATCH = 16
WIKITEXT = ("wikitext", "wikitext-2-raw-v1", "test")
BOOLQ_PASSAGES = Path("boolq") / "lmeval_validation.jsonl"


def read_documents(path: str | Path) -> list[str]:
    """The documents of a text file: a .txt file is one document; a .jsonl file holds one {"text": ...} per line."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"text file not found: {path}")
    if path.suffix not in (".txt", ".jsonl"):
        raise DataError(f"{path}: plain text must be a .txt file or a .jsonl file with a 'text' field")
    text = read_text(path, DataError, DATA_LIMIT)
    if path.suffix == ".txt":
        docs = [text]
    else:
        docs = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, RecursionError) as exc:
                raise DataError(f"{path} line {n} is not valid JSON: {detail(exc)}") from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise DataError(f"{path} line {n} has no string 'text' field")
            docs.append(row["text"])
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise DataError(f"{path} holds no text")
    return docs


def pack(docs: list[str], tokenizer, length: int) -> list[list[int]]:
    """Documents tokenized, each ended with EOS, concatenated and cut into sequences of `length` tokens (the last
    may be shorter; a one-token remainder predicts nothing and is dropped)."""
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for doc in docs:
        ids = list(tokenizer(doc, add_special_tokens=True)["input_ids"])
        stream += ids + ([eos] if eos is not None and (not ids or ids[-1] != eos) else [])
    seqs = [stream[s : s + length] for s in range(0, len(stream), length)]
    return [q for q in seqs if len(q) >= 2]


def read_records(source: str | Path) -> list[dict]:
    """Training records (JSON objects) from a JSON file holding a list of them, or a directory of
    <task>/train.json files of that format."""
    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(path.glob("*/train.json"))
        if not files:
            raise DataError(f"{path} has no <task>/train.json files; give a training JSON file or such a directory")
    elif path.is_file():
        files = [path]
    else:
        raise DataError(f"calibration data not found: {path} (give a JSON file of records or a dir of <task>/train.json)")
    records = []
    for f in files:
        found = read_json(f, DataError, DATA_LIMIT)
        if not isinstance(found, list) or not all(isinstance(r, dict) for r in found):
            raise DataError(f"{f} must hold a JSON list of {{instruction, input, output}} records")
        records += found
    return records


def record_text(record: dict) -> str:
    """A training record as plain text: instruction, input (when present) and output on separate lines."""
    parts = (record.get("instruction"), record.get("input"), record.get("output"))
    return "\n".join(str(p) for p in parts if p)


def general_prompts(n: int, seed: int) -> list[str]:
    """`n` general openings in a seeded order, cycled."""
    pool = list(GENERAL_OPENINGS)
    random.Random(seed).shuffle(pool)
    return [pool[i % len(pool)] for i in range(n)]


def teacher_written(teacher, tokenizer, prompts: list[str], new_tokens: int, temperature: float, seed: int,
                    progress: bool = False, full_length: bool = False) -> Path:
    """The cached .jsonl of the teacher's sampled continuations of `prompts` (generated first when not cached).
    `full_length`: every continuation has exactly `new_tokens` tokens (EOS is never sampled), so that texts fill
    sequences of a fixed length; otherwise a text ends where the teacher ends it."""
    from ..artifacts import atomic_file, write_json
    from ..numerics import model_signature
    from ..models import cache_dir

    params = next(teacher.parameters())
    settings = {"teacher": model_signature(teacher),
                "prompts": hashlib.sha256(json.dumps(prompts).encode()).hexdigest()[:16], "texts": len(prompts),
                "new_tokens": new_tokens, "temperature": temperature, "seed": seed,
                **({"full_length": True} if full_length else {}),
                "dtype": str(params.dtype).replace("torch.", ""), "device": params.device.type}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir() / "synthetic" / f"{key}.jsonl"
    if path.is_file():
        return path
    texts = sample(teacher, tokenizer, prompts, new_tokens, temperature, seed, progress, full_length)
    with atomic_file(path) as tmp:
        tmp.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    write_json(path.with_suffix(".json"), settings)  # what made the texts, for a reader of the cache
    return path


@torch.inference_mode()
def sample(model, tokenizer, prompts: list[str], new_tokens: int, temperature: float, seed: int,
           progress: bool = False, full_length: bool = False) -> list[str]:
    """Sampled continuations (pure sampling: no top-k/top-p cut), prompt included, in batches, left-padded;
    `full_length`: exactly `new_tokens` new tokens each."""
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
                                 max_new_tokens=new_tokens, pad_token_id=pad,
                                 **({"min_new_tokens": new_tokens} if full_length else {}))
            texts += tokenizer.batch_decode(out, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return texts


def prose_documents(source: str = "auto", data_dir: str | Path | None = None, count: int = 64,
                    seed: int = 0) -> tuple[list[str], str]:
    """(documents, what they are): `count` seeded documents of held-out prose from `source` (see the module
    docstring: auto, a .txt/.jsonl file)."""
    if source != "auto":
        docs = read_documents(source)
        return _seeded(docs, count, seed), str(Path(source).expanduser().resolve())
    if os.environ.get("HF_HUB_OFFLINE") != "1":
        docs = _wikitext()
        if docs:
            return _seeded(docs, count, seed), "WikiText-2 (wikitext-2-raw-v1, test split)"
    data_dir = data_dir or os.environ.get("RORA_DATA_DIR")
    path = Path(data_dir).expanduser() / BOOLQ_PASSAGES if data_dir else None
    if path is None or not path.is_file():
        raise DataError("no held-out prose: WikiText-2 is out of reach (offline) and RORA_DATA_DIR has no "
                        f"{BOOLQ_PASSAGES}; name a .txt/.jsonl file of prose (--prose FILE) or pass --prose none")
    passages = []
    for line in path.read_text(encoding="utf-8").splitlines():
        passage = json.loads(line).get("passage") if line.strip() else None
        if passage and passage not in passages:
            passages.append(passage)
    return _seeded(passages, count, seed), "BoolQ validation passages (Wikipedia paragraphs)"


def _wikitext() -> list[str] | None:
    """WikiText-2's test split as paragraphs (headings dropped), or None when the hub does not answer."""
    try:
        import datasets

        rows = datasets.load_dataset(WIKITEXT[0], WIKITEXT[1], split=WIKITEXT[2])["text"]
    except Exception:  # offline or unreachable: the caller falls back to local prose
        return None
    return [r.strip() for r in rows if len(r.split()) > 20 and not r.strip().startswith("=")]


def _seeded(docs: list[str], count: int, seed: int) -> list[str]:
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    return [docs[i] for i in order[:count]]
