"""Plain text for the stages that need no labels: documents from files, `datasets` sources and the hub, text the
teacher writes, held-out prose.

* `TextSource(spec, split, field, config)`: where documents come from, one of
    - a .txt file (one document) or a .jsonl file with a text field per line (read here, as always);
    - a directory written by `datasets`' save_to_disk (a Dataset, or a DatasetDict and a split);
    - parquet/arrow/jsonl shards: one file or a glob (`data/train-*.parquet`), read in sorted order;
    - a local dataset directory or a hub dataset id, with a split, a field and a config, loaded by `datasets`' own
      loaders.
  Everything but the .txt/.jsonl files is streamed (`datasets` streaming): documents are read one after the other
  and reading stops at the token budget, so a corpus larger than memory or disk is never held whole. A spec may
  carry its options as a query, `SPEC?split=validation&field=body&config=en` (how the calibration settings of
  pruning and reconstruction name them; recovery has flags for them too).
* `pack_source(source, tokenizer, length, max_tokens)`: documents tokenized in order, each ended with EOS, cut at
  exactly `max_tokens` tokens and packed into sequences of `length`; with a record of what was read (source,
  revision or content fingerprint, documents and tokens), so that a run can be repeated on the same tokens.
* `pack(docs, tokenizer, length)`: the same for documents in memory.
* `teacher_written(...)`: sampled continuations of prompts by a model (the unpruned teacher), cached as a .jsonl
  file (the --text format) under RORA_CACHE_DIR/synthetic/, keyed by everything that determines them.
* `prose_documents(source)`: held-out general prose for every report's perplexity and KL: WikiText-2's test split
  (the field's convention) when the hub answers, offline the BoolQ validation passages in RORA_DATA_DIR
  (Wikipedia paragraphs), or any .txt/.jsonl file. Measured only: nothing trains, calibrates or tunes on it.
"""
from __future__ import annotations

import glob
import hashlib
import itertools
import json
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from ..artifacts import DATA_LIMIT, fingerprint, read_json, read_text
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
FILE_SUFFIXES = (".txt", ".jsonl")  # read here, whole
SHARD_BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".jsonl": "json", ".json": "json"}  # datasets' loaders
SOURCE_OPTIONS = ("split", "field", "config")
TOKENIZE_BATCH = 64  # documents tokenized at once: fast tokenizers batch, and little is read past the budget


@dataclass(frozen=True)
class TextSource:
    """Where plain-text documents come from (see the module docstring): `spec` (a path, a glob or a dataset id),
    the `split` and `field` to read and the dataset `config` (for a hub id or a local dataset directory)."""

    spec: str
    split: str = "train"
    field: str = "text"
    config: str | None = None

    @classmethod
    def parse(cls, spec: str, split: str | None = None, field: str | None = None,
              config: str | None = None) -> "TextSource":
        """`spec`, whose `?split=..&field=..&config=..` query (if any) sets those options; the keyword arguments,
        when given, win."""
        base, options = _split_query(str(spec))
        given = {"split": split, "field": field, "config": config}
        return cls(base, **{**options, **{k: v for k, v in given.items() if v is not None}})

    @property
    def kind(self) -> str:
        """file (.txt/.jsonl, read here), saved (a save_to_disk directory), shards (parquet/arrow/jsonl files, a
        glob), dataset (a local dataset directory) or hub (a dataset id); DataError for a missing local path."""
        path = self.path
        if glob.has_magic(self.spec):
            return "shards"
        if path.is_file():
            if path.suffix in FILE_SUFFIXES:
                return "file"
            if path.suffix in SHARD_BUILDERS:
                return "shards"
            raise DataError(f"{path}: a text file must be .txt, .jsonl, .parquet, .arrow or .json")
        if path.is_dir():
            saved = (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()
            return "saved" if saved else "dataset"
        if path.suffix in (*FILE_SUFFIXES, *SHARD_BUILDERS) or self.spec.startswith((".", "/", "~")):
            raise DataError(f"text source not found: {path}")
        return "hub"

    @property
    def path(self) -> Path:
        return Path(self.spec).expanduser()

    def check(self) -> str:
        """The kind, after the checks that need no reading: the local path exists, a glob matches, a hub id is
        not asked for while the hub is offline (HF_HUB_OFFLINE=1)."""
        kind = self.kind
        if kind == "shards":
            self.shards()
        if kind == "hub" and _offline():
            raise DataError(f"text source {self.spec!r} is no local file, directory or glob, and the hub is offline "
                            "(HF_HUB_OFFLINE=1): give a local .txt/.jsonl file, a save_to_disk directory or "
                            "parquet/arrow/jsonl shards")
        return kind

    def shards(self) -> list[Path]:
        """The files of a shards source, sorted; DataError when none match or their formats differ."""
        files = sorted(Path(f) for f in glob.glob(str(self.path))) if glob.has_magic(self.spec) else [self.path]
        files = [f for f in files if f.is_file()]
        if not files:
            raise DataError(f"no files match {self.spec}")
        formats = {SHARD_BUILDERS.get(f.suffix) for f in files}
        if None in formats or len(formats) > 1:
            raise DataError(f"{self.spec} must match files of one format (.parquet, .arrow or .jsonl/.json), got "
                            f"{', '.join(sorted({f.suffix or f.name for f in files}))}")
        return files

    def describe(self) -> dict:
        """What the source is, for a manifest: the spec, its kind and options, and the hub revision or the local
        content fingerprint."""
        kind = self.kind
        where = self.spec if kind == "hub" else os.path.abspath(self.path)
        found = {"source": where, "kind": kind, "field": self.field}
        if kind in ("saved", "dataset", "hub"):
            found["split"] = self.split
        if kind in ("dataset", "hub"):
            found["config"] = self.config
        if kind == "shards":
            prints = [f"{f.name}:{fingerprint(f)}" for f in self.shards()]
            found.update(files=len(prints), fingerprint=hashlib.sha256("|".join(prints).encode()).hexdigest()[:16])
        elif kind != "hub":
            found["fingerprint"] = fingerprint(self.path)
        return found

    def documents(self, record: dict | None = None) -> Iterator[str]:
        """The non-empty documents, in the source's order, streamed; `record` (a dict) gets the hub revision."""
        kind = self.check()
        if kind == "file":
            yield from read_documents(self.path, self.field)
            return
        rows = self._rows(kind, record if record is not None else {})
        where = self.spec
        try:
            for n, row in enumerate(rows):
                if self.field not in row:
                    fields = ", ".join(map(str, row)) or "none"
                    raise DataError(f"{where}: row {n} has no {self.field!r} field (fields: {fields}); name the text "
                                    "column (--text-field, or ?field= in a calibration source)")
                value = row[self.field]
                if value is not None and not isinstance(value, str):
                    raise DataError(f"{where}: row {n} field {self.field!r} is a {type(value).__name__}, not text")
                if value and value.strip():
                    yield value
        except DataError:
            raise
        except Exception as exc:  # datasets and pyarrow raise many types while reading (bad shard, lost connection)
            raise DataError(f"cannot read text source {where} ({type(exc).__name__}: {detail(exc)})") from None

    def _rows(self, kind: str, record: dict):
        try:
            import datasets

            if kind == "saved":
                ds = datasets.load_from_disk(str(self.path))
                if isinstance(ds, datasets.DatasetDict):
                    if self.split not in ds:
                        raise DataError(f"{self.spec} has no split {self.split!r} (splits: {', '.join(ds)}); "
                                        "choose one with --text-split")
                    ds = ds[self.split]
                return iter(ds)
            if kind == "shards":
                files = self.shards()
                builder = datasets.load_dataset_builder(SHARD_BUILDERS[files[0].suffix],
                                                        data_files=[str(f) for f in files])
                return iter(builder.as_streaming_dataset(split="train"))
            builder = datasets.load_dataset_builder(str(self.path) if kind == "dataset" else self.spec, name=self.config)
            found = re.search(r"@([0-9a-f]{40})", str(builder.config.data_files))
            record["revision"] = found.group(1) if found else None
            return iter(builder.as_streaming_dataset(split=self.split))
        except DataError:
            raise
        except Exception as exc:  # datasets raises many types (ValueError for a bad split/config, ConnectionError...)
            raise DataError(f"cannot open text source {self.spec!r} ({type(exc).__name__}: {detail(exc)})") from None


def _split_query(spec: str) -> tuple[str, dict]:
    """'SPEC?split=a&field=b' -> ('SPEC', {'split': 'a', 'field': 'b'}); a spec whose '?' starts no such query is
    left whole (a file name may hold a '?')."""
    base, sep, query = spec.rpartition("?")
    if not sep:
        return spec, {}
    pairs = [p.partition("=") for p in query.split("&")]
    if not all(k in SOURCE_OPTIONS and eq for k, eq, _ in pairs):
        return spec, {}
    return base, {k: v for k, _, v in pairs}


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


@dataclass
class PackedText:
    """Documents packed into sequences, and what was read: `record` holds the source (TextSource.describe), the
    token budget, the documents and tokens used and whether the source ran out before the budget."""

    sequences: list[list[int]]
    record: dict = field(default_factory=dict)


def pack_source(source: TextSource, tokenizer, length: int, max_tokens: int | None = None) -> PackedText:
    """The documents of `source` in order, tokenized, each ended with EOS, the stream cut at exactly `max_tokens`
    tokens (None: all of it) and packed into sequences of `length` tokens (see `pack`)."""
    record = source.describe()
    stream, documents, exhausted = token_stream(source.documents(record), tokenizer, max_tokens)
    sequences = cut(stream, length)
    record.update(max_tokens=max_tokens, documents=documents, tokens=sum(map(len, sequences)),
                  exhausted=exhausted if max_tokens is not None else None)
    return PackedText(sequences, record)


def describe_read(record: dict) -> str:
    """One line of what a run read of its text source (a PackedText.record): tokens, documents, the source and its
    revision or content fingerprint."""
    where = record["source"] + "".join(f" {k} {record[k]}" for k in ("config", "split") if record.get(k))
    ident = (f"revision {record['revision']}" if record.get("revision") else
             f"fingerprint {record['fingerprint']}" if record.get("fingerprint") else "no revision known")
    ran_out = ", the source ran out before the budget" if record.get("exhausted") else ""
    return f"{record['tokens']:,} tokens of {record['documents']:,} documents of {where} ({record['kind']}, {ident}{ran_out})"


def text_sequences(source: TextSource, tokenizer, length: int, count: int, seed: int) -> tuple[list[list[int]], str]:
    """(`count` sequences of exactly `length` tokens, in a seeded order; what they are) from the first
    count * length tokens of `source`: calibration text for pruning and reconstruction."""
    packed = pack_source(source, tokenizer, length, count * length)
    seqs = [q for q in packed.sequences if len(q) == length]
    r = packed.record
    what = f"{r['source']} ({r['tokens']:,} tokens of {r['documents']:,} documents)"
    if len(seqs) < count:
        raise DataError(f"the calibration text ({what}) fills {len(seqs)} sequences of {length} tokens, but {count} "
                        "are needed; give more text or ask for fewer samples")
    random.Random(seed).shuffle(seqs)
    return seqs, what


def check_calibration(spec: str, words: tuple[str, ...] = ()) -> None:
    """A calibration setting that names a text source (not one of `words`, not training records) can be read:
    checked without reading it (TextSource.check)."""
    if spec not in words and not names_records(spec):
        TextSource.parse(spec).check()


def names_records(spec: str) -> bool:
    """Whether a calibration source names training records (a .json file, or a directory of <task>/train.json or of
    train.json) rather than plain text."""
    path = Path(spec).expanduser()
    if glob.has_magic(spec):
        return False
    return path.suffix == ".json" or (path.is_dir() and (any(path.glob("*/train.json")) or (path / "train.json").is_file()))


def token_stream(docs, tokenizer, max_tokens: int | None = None) -> tuple[list[int], int, bool]:
    """(the documents' tokens, each document ended with EOS, cut at exactly `max_tokens`; how many documents
    contributed; whether the documents ran out first). Documents are read only as far as the budget needs."""
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    documents = 0
    docs = iter(docs)
    while max_tokens is None or len(stream) < max_tokens:
        batch = list(itertools.islice(docs, TOKENIZE_BATCH))
        if not batch:
            return stream, documents, True
        for ids in tokenizer(batch, add_special_tokens=True)["input_ids"]:
            if max_tokens is not None and len(stream) >= max_tokens:
                break
            documents += 1
            stream += list(ids) + ([eos] if eos is not None and (not ids or ids[-1] != eos) else [])
    del stream[max_tokens:]
    return stream, documents, False


def cut(stream: list[int], length: int) -> list[list[int]]:
    """A token stream cut into sequences of `length` (the last may be shorter; a one-token remainder predicts
    nothing and is dropped)."""
    seqs = [stream[s : s + length] for s in range(0, len(stream), length)]
    return [q for q in seqs if len(q) >= 2]


def read_documents(path: str | Path, field: str = "text") -> list[str]:
    """The documents of a text file: a .txt file is one document; a .jsonl file holds one {"text": ...} per line
    (or another `field`)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"text file not found: {path}")
    if path.suffix not in FILE_SUFFIXES:
        raise DataError(f"{path}: plain text must be a .txt file or a .jsonl file with a {field!r} field")
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
            if not isinstance(row, dict) or not isinstance(row.get(field), str):
                raise DataError(f"{path} line {n} has no string {field!r} field")
            docs.append(row[field])
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise DataError(f"{path} holds no text")
    return docs


def pack(docs: list[str], tokenizer, length: int) -> list[list[int]]:
    """Documents tokenized, each ended with EOS, concatenated and cut into sequences of `length` tokens (the last
    may be shorter; a one-token remainder predicts nothing and is dropped)."""
    return cut(token_stream(docs, tokenizer)[0], length)


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
    passages = boolq_passages(data_dir or os.environ.get("RORA_DATA_DIR"))
    if passages is None:
        raise DataError("no held-out prose: WikiText-2 is out of reach (offline) and RORA_DATA_DIR has no "
                        f"{BOOLQ_PASSAGES}; name a .txt/.jsonl file of prose (--prose FILE) or pass --prose none")
    return _seeded(passages, count, seed), "BoolQ validation passages (Wikipedia paragraphs)"


def boolq_passages(data_dir: str | Path | None) -> list[str] | None:
    """The distinct BoolQ validation passages under `data_dir`, in file order: the offline held-out prose (never to
    be trained or calibrated on). None when `data_dir` has no BOOLQ_PASSAGES file."""
    path = Path(data_dir).expanduser() / BOOLQ_PASSAGES if data_dir else None
    if path is None or not path.is_file():
        return None
    rows = (json.loads(line).get("passage") for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    return list(dict.fromkeys(p for p in rows if p))


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
