"""Evaluation data: `<data_dir>/<task>/test.json` in the LLM-Adapters format, from --data-dir, else RORA_DATA_DIR,
else downloaded (through `datasets`) from the LLM-Adapters repository the files come from.

`limit` keeps the first N records of a task, in file order, so a limited run is deterministic and a prefix of the
full run. `sample` keeps a seeded random N instead (sample_indices), so a small run still represents the whole task.
"""
from __future__ import annotations

import os
import random
from pathlib import Path

from ..artifacts import DATA_LIMIT, read_json
from ..errors import ConfigError, DataError
from .tasks import Task

DATA_ENV = "RORA_DATA_DIR"
# Where the offline copy's test.json files come from (byte-identical; see ../shared/data/commonsense/README.md).
REMOTE_URL = "https://raw.githubusercontent.com/AGI-Edgerunners/LLM-Adapters/main/dataset/{task}/test.json"
LAYOUT = "expected layout: <dir>/<task>/test.json for each task (e.g. <dir>/boolq/test.json), a JSON list of " \
         '{"instruction", "input", "output", "answer"} records'


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path | None:
    """The data directory to use: the argument, else $RORA_DATA_DIR, else None (download). A directory that was
    named but does not exist is an error that shows the expected layout."""
    chosen = data_dir if data_dir not in (None, "") else os.environ.get(DATA_ENV) or None
    if chosen is None:
        return None
    path = Path(chosen).expanduser()
    if not path.is_dir():
        origin = "--data-dir" if data_dir not in (None, "") else f"${DATA_ENV}"
        raise DataError(f"data directory {path} (from {origin}) does not exist; {LAYOUT}")
    return path


def sample_indices(size: int, n: int, seed: int, task: str) -> list[int]:
    """A seeded random n of a task's `size` examples, in file order. The seed is combined with the task name, so
    tasks of equal size get different subsets; the same (n, seed) always gives the same examples."""
    if n > size:
        raise DataError(f"--sample {n} is larger than {task}, which has {size} examples")
    return sorted(random.Random(f"{seed}:{task}").sample(range(size), n))


def load_examples(task: Task, data_dir: Path | None, limit: int | None = None, *, sample: int | None = None,
                  seed: int = 0) -> list[dict]:
    """The task's evaluation records (the first `limit`, or a seeded random `sample`, when given), each checked for
    `instruction` and `answer`. Each record's `index` is its position in the task's file."""
    if limit is not None and limit <= 0:
        raise ConfigError(f"limit must be > 0, got {limit}")
    if data_dir is None:
        records, source = _download(task), REMOTE_URL.format(task=task.name)
    else:
        source = data_dir / task.name / task.file
        if not source.is_file():
            raise DataError(f"{source} not found; {LAYOUT}")
        records = read_json(source, DataError, DATA_LIMIT)
    if not isinstance(records, list):
        raise DataError(f"{source} must hold a JSON list of records, not {type(records).__name__}")
    keep = sample_indices(len(records), sample, seed, task.name) if sample is not None else \
        range(min(limit, len(records)) if limit is not None else len(records))
    for i in keep:
        check_record(records[i], source, i)
    return [{**records[i], "index": i} for i in keep]


def check_record(rec, source, index: int) -> None:
    """A record needs string `instruction` and `answer` (and `input`, when present, must be a string)."""
    problem = None
    if not isinstance(rec, dict):
        problem = f"is a {type(rec).__name__}, not an object"
    else:
        bad = [k for k in ("instruction", "answer") if not isinstance(rec.get(k), str)]
        if bad:
            problem = f"lacks string field(s) {', '.join(bad)}"
        elif not isinstance(rec.get("input", ""), str):
            problem = "has a non-string 'input'"
    if problem:
        raise DataError(f"malformed record in {source} at index {index}: {problem}")


def _download(task: Task) -> list:
    url = REMOTE_URL.format(task=task.name)
    try:
        import datasets

        ds = datasets.load_dataset("json", data_files={"test": url}, split="test")
    except Exception as exc:  # offline, DNS, HTTP: all mean the same to the user
        raise DataError(
            f"no data directory given (--data-dir or ${DATA_ENV}) and downloading {url} failed "
            f"({type(exc).__name__}); {LAYOUT}"
        ) from None
    return ds.to_list()
