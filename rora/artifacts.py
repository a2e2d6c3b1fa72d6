"""Stage outputs: atomic directories, safetensors weights, and self-describing JSON manifests.

Every stage output holds one manifest of one shape (`Manifest`, in `rora.json`; a GGUF file's sits beside it as
NAME.rora.json): the stage, what it read (`source` pointers), its resolved config, its report and provenance. So
the next stage needs nothing else: `resolve_input` turns a stage output into what to load, and `lineage` follows
the pointers back to every stage upstream. Outputs are built in a temporary sibling and renamed into place, so an
interrupted write never leaves a directory that looks complete.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import glob
import json
import os
import platform
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

from .errors import ConfigError, DataError, ManifestError, ModelLoadError, OutputError, OutputExistsError

PACKAGES = ("rora", "torch", "transformers", "peft", "accelerate", "datasets", "lm_eval", "gguf")


def check_output(path: str | Path, overwrite: bool = False, inputs=()) -> Path:
    """Refuse, before any work is done, an output that exists (unless `overwrite`), that is one of `inputs` or
    holds one, or whose location cannot be written."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path} already exists; pass --overwrite to replace it (or choose another --out)")
    for source in inputs:
        source = Path(source).expanduser()
        if source.exists() and (path.resolve() == source.resolve() or path.resolve() in source.resolve().parents):
            raise OutputError(f"--out {path} would replace the input {source}; choose another --out")
    check_writable(path)
    return path


def check_writable(path: str | Path) -> None:
    """OutputError unless `path` can be created (or replaced): its nearest existing ancestor must be a writable
    directory. Checked up front so that a bad --out fails in a second, not after the work."""
    path = Path(path).absolute()
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"cannot write {path}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write {path}: {parent} is not writable (permissions or a read-only file system)")


# Temporaries are named .NAME.tmp-PID-XXXX and .NAME.old-PID: a later run into the same location removes those
# whose process is gone (a SIGKILL leaves them behind) and never those of a run still going.
STALE_AFTER_S = 24 * 3600  # for names without a readable pid (older rora versions)


def _temp_prefix(path: Path, kind: str) -> str:
    return f".{path.name}.{kind}-{os.getpid()}-"


def remove_stale_temporaries(path: str | Path) -> list[Path]:
    """Remove rora's own leftover temporaries of `path` (see above); returns what was removed."""
    path = Path(path)
    removed = []
    if not path.parent.is_dir():
        return removed
    for kind in ("tmp", "old"):
        for leftover in path.parent.glob(f".{glob.escape(path.name)}.{kind}-*"):
            pid = leftover.name[len(f".{path.name}.{kind}-"):].split("-")[0]
            if pid.isdigit():
                stale = not process_alive(int(pid))
            else:
                stale = time.time() - leftover.lstat().st_mtime > STALE_AFTER_S
            if stale:
                _remove(leftover)
                removed.append(leftover)
    return removed


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _umask() -> int:
    # Linux reports it without changing it (os.umask sets it, a race with other threads creating files).
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _honour_umask(path: Path, mode: int) -> None:
    """mkdtemp/mkstemp create 0700/0600; outputs get what any other tool would make (0755/0644 by default)."""
    os.chmod(path, mode & ~_umask())


def replace_dir(src: Path, dst: Path) -> None:
    """Move the complete directory `src` to `dst`; an existing `dst` is kept until `src` is in its place."""
    remove_stale_temporaries(dst)
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        dst.rename(old)
        src.rename(dst)
        _remove(old)
    else:
        src.rename(dst)


@contextlib.contextmanager
def atomic_dir(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes `path` only when the block finishes without error."""
    path = check_output(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(path, "tmp"), dir=path.parent))
    try:
        _honour_umask(tmp, 0o777)
        yield tmp
        replace_dir(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary file path in the same directory that replaces `path` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    fd, name = tempfile.mkstemp(prefix=_temp_prefix(path, "tmp"), dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        _honour_umask(tmp, 0o666)
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def write_json(path: str | Path, data: Any) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=_jsonable) + "\n")


def read_json(path: str | Path, error: type[Exception] = DataError) -> Any:
    """The JSON in `path`; a file that is not JSON (or not UTF-8) raises `error` naming it."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{path} is corrupt (not valid JSON: {exc}); restore or remove it") from None


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


MANIFEST = "rora.json"
FILE_MANIFEST_SUFFIX = ".rora.json"  # a stage output that is one file (NAME.gguf) has NAME.rora.json beside it
SCHEMA_VERSION = 1
STAGES = ("prune", "recover", "merge", "export")
ADAPTER_DIR = "adapter"  # a recovery directory's best adapter


@dataclass
class Manifest:
    """What a stage output is and what made it: the one record every stage writes.

    source: the inputs it read, as pointers the next stage follows (a local path is recorded absolute, so the
            pointer holds from any working directory): "model" (a spec or directory; every stage), "adapter"
            (merge: the adapter directory), "data" (recover: the training data, when it is a path or hub id).
    config: the stage's resolved config. report: what it did (PruneReport, the recovery's figures, MergeReport,
            ExportReport). provenance: who made it (provenance())."""

    stage: str  # one of STAGES
    source: dict
    config: dict
    report: dict
    provenance: dict
    schema: int = SCHEMA_VERSION


def manifest_path(output: str | Path) -> Path:
    """Where the manifest of the stage output `output` (a directory, or a file such as a .gguf) lives."""
    output = Path(output)
    return output.with_suffix(FILE_MANIFEST_SUFFIX) if output.is_file() else output / MANIFEST


def is_stage_output(path: str | Path) -> bool:
    return manifest_path(Path(str(path)).expanduser()).is_file()


def write_stage_manifest(output: str | Path, stage: str, source: dict, config: dict, report: dict) -> Path:
    """Write the manifest of the stage output `output` (see Manifest); returns its path."""
    pointers = {k: _pointer(v) for k, v in source.items()}
    path = manifest_path(output)
    write_json(path, dataclasses.asdict(Manifest(stage, pointers, config, report, provenance())))
    return path


def _pointer(value) -> str | None:
    if value is None:
        return None
    path = Path(str(value)).expanduser()
    return os.path.abspath(path) if path.exists() else str(value)  # a hub id or alias stays as it is


def read_manifest(output: str | Path) -> Manifest:
    """The manifest of the stage output `output`; ManifestError when it has none or it is not one rora reads."""
    path = manifest_path(Path(str(output)).expanduser())
    if not path.is_file():
        raise ManifestError(f"{output} is not a rora stage output: it has no {path.name} (the manifest rora prune, "
                            "recover, merge and export write)")
    data = read_json(path, ManifestError)
    names = [f.name for f in dataclasses.fields(Manifest)]
    if not isinstance(data, dict) or any(k not in data for k in names):
        raise ManifestError(f"{path} is corrupt (not a rora manifest: it needs the keys {', '.join(names)}); "
                            "restore it or rerun the stage")
    if not isinstance(data["schema"], int) or data["schema"] > SCHEMA_VERSION:
        raise ManifestError(f"{path} has schema {data['schema']!r}; this rora reads schema {SCHEMA_VERSION} and "
                            "older: upgrade rora")
    if data["stage"] not in STAGES or not all(isinstance(data[k], dict) for k in ("source", "config", "report")):
        raise ManifestError(f"{path} is corrupt (stage {data['stage']!r}, or source/config/report not objects); "
                            "restore it or rerun the stage")
    return Manifest(**{k: data[k] for k in names})


def is_recovery(path: str | Path) -> bool:
    """Whether `path` is a recovery directory (an adapter, not a model)."""
    return is_stage_output(path) and read_manifest(path).stage == "recover"


@dataclass
class StageInput:
    """What a command given MODEL (and --adapter) loads: a model spec, and the adapter to attach to it."""

    model: str
    adapter: Path | None = None


def resolve_input(model: str | Path, adapter: str | Path | None = None, need_adapter: bool = False) -> StageInput:
    """MODEL is any model spec or a stage output. A recovery directory stands for its base model (the recovery's
    source) plus the adapter in it; an `adapter` that is a recovery directory stands for the adapter in it.
    `need_adapter`: no adapter either way is a ConfigError (before the model is loaded)."""
    if is_recovery(model):
        if adapter is not None:
            raise ConfigError(f"{model} is a recovery run and brings its own adapter; pass --adapter only with a base model")
        base = read_manifest(model).source.get("model")
        if not base:
            raise ModelLoadError(f"the recovery run {model} does not record its base model; name it: "
                                 f"BASE --adapter {model}")
        return StageInput(base, Path(model) / ADAPTER_DIR)
    if adapter is not None and is_recovery(adapter):
        adapter = Path(adapter) / ADAPTER_DIR
    if adapter is None and need_adapter:
        raise ConfigError(f"no adapter: {model} is not a recovery directory; pass --adapter DIR (an adapter or a "
                          "recovery directory)")
    return StageInput(str(model), Path(adapter) if adapter is not None else None)


def lineage(output: str | Path) -> list[Manifest]:
    """The manifests of `output` and of every stage output upstream of it, found by following `source` pointers,
    nearest first; empty when `output` is not a stage output. An adapter directory inside a recovery directory
    counts as that recovery."""
    found, seen, todo = [], set(), [output]
    while todo:
        path = _owner(todo.pop(0))
        if path is None or path in seen:
            continue
        seen.add(path)
        manifest = read_manifest(path)
        found.append(manifest)
        todo += [v for v in manifest.source.values() if v]
    return found


def root_model(spec: str | Path) -> str:
    """The model the stage output `spec` was made from, following `source` pointers upstream past every stage
    output (a pruned, recovered, merged or exported model's unpruned model); `spec` itself when it is none."""
    for manifest in reversed(lineage(spec)):  # farthest upstream first
        model = manifest.source.get("model")
        if model and _owner(model) is None:
            return model
    return str(spec)


def _owner(pointer) -> Path | None:
    path = Path(str(pointer)).expanduser()
    if is_stage_output(path):
        return path.resolve()
    if path.name == ADAPTER_DIR and is_recovery(path.parent):
        return path.parent.resolve()
    return None


def provenance() -> dict:
    """Who made an output: package versions, git commit, machine, time (lm-eval EvalResults style)."""
    versions = {}
    for pkg in PACKAGES:
        try:
            versions[pkg] = metadata.version(pkg.replace("_", "-"))
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": versions,
        "git_commit": _git_commit(),
        "python": platform.python_version(),
        "machine": platform.machine(),
    }


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def save_model_dir(model, tokenizer, directory: str | Path) -> None:
    """Weights as safetensors, config (per-layer shapes included), tokenizer."""
    model.save_pretrained(directory, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


def dir_size(path: str | Path) -> int:
    """Bytes on disk of a file or directory tree."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def count_parameters(model) -> int:
    """Distinct parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
