"""Stage outputs: atomic directories, safetensors weights, and self-describing JSON manifests.

Every stage output holds one manifest of one shape (`Manifest`, in `rora.json`; a GGUF file's sits beside it as
NAME.rora.json): the stage, what it read (`source` pointers), its resolved config, its report and provenance. So
the next stage needs nothing else: `resolve_input` turns a stage output into what to load, and `lineage` follows
the pointers back to every stage upstream. A manifest is untrusted input: read with a size limit, checked against
its schema, and the fingerprints it records of the inputs its stage read are compared when a later command follows
its pointers. Outputs are built in a marked temporary sibling and renamed into place, so an interrupted write never
leaves a directory that looks complete, and rora deletes only what it marked (see MARKER).
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import errno
import glob
import hashlib
import json
import os
import platform
import re
import secrets
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

from .errors import (ConfigError, DataError, ManifestError, ModelLoadError, OutputError, OutputExistsError, RoraError,
                     detail)

PACKAGES = ("rora", "torch", "transformers", "peft", "accelerate", "datasets", "lm_eval", "gguf")


def check_output(path: str | Path, overwrite: bool = False, inputs=()) -> Path:
    """Refuse, before any work is done, an output that exists (unless `overwrite`), that is the working directory
    or holds it, that overlaps one of `inputs` (see check_apart), or whose location cannot be written."""
    path = Path(path)
    if os.path.lexists(path) and not overwrite:
        raise OutputExistsError(f"{path} already exists; pass --overwrite to replace it (or choose another --out)")
    cwd = Path.cwd()
    if _resolved(path) in (cwd, *cwd.parents):
        raise OutputError(f"--out {path} is the working directory or holds it: replacing it would delete what is in "
                          "it; choose a new path")
    check_apart(path, inputs)
    check_writable(path)
    return path


def check_apart(path: str | Path, inputs=()) -> None:
    """OutputError when the output `path` is one of `inputs` (model directories and files, data, adapters: what
    the command reads), holds one, or lies inside one. Links are followed, so no name for an input is spared."""
    out = _resolved(path)
    for source in inputs:
        if source is None or not os.path.lexists(Path(str(source)).expanduser()):
            continue  # a hub id or alias, or nothing there: no file of it can be overwritten
        source = Path(str(source)).expanduser()
        real = _resolved(source)
        if out == real or real in out.parents:
            how = "replace" if out == real else "write inside"
            raise OutputError(f"--out {path} would {how} the input {source}; choose another --out")
        if out in real.parents:
            raise OutputError(f"--out {path} holds the input {source}, which replacing it would delete; choose "
                              "another --out")


def _resolved(path: str | Path) -> Path:
    """`path` absolute, links followed; a link loop is an OutputError instead of RuntimeError/OSError."""
    try:
        return Path(path).expanduser().resolve()
    except (RuntimeError, OSError) as exc:
        raise OutputError(f"cannot follow {path}: {detail(exc)} (a symbolic link loop?); choose another path") from None


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


# ---- what rora may delete ---------------------------------------------------------------------------------------
# rora deletes only what it can prove it made. Every directory it creates to build an output in (.NAME.tmp-*), to
# hold a replaced output until its successor is in place (.NAME.old-*) or to train a recovery in (.NAME.partial)
# first receives MARKER: the creating process's identity (pid, its start time, the boot) and a random token. A
# later run into NAME removes such a leftover once that process is gone (a pid reused by another process has
# another start time); a directory without the marker is never deleted, whatever its name.
MARKER = ".rora-owner.json"


def process_identity(pid: int | None = None) -> dict:
    """{pid, start, boot}: the start time (clock ticks after boot, Linux) tells a process from a later one that
    reuses its pid; None where the system does not say."""
    pid = os.getpid() if pid is None else pid
    try:
        start = int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[19])
    except (OSError, ValueError, IndexError):
        start = None
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = None
    return {"pid": pid, "start": start, "boot": boot}


def claim(directory: Path) -> None:
    """Mark `directory`, which this process created, as rora's (see MARKER); a marker already there is replaced,
    so a resumed run takes over an interrupted one's directory."""
    (directory / MARKER).write_text(json.dumps({**process_identity(), "token": secrets.token_hex(16)}))


def read_marker(directory: Path) -> dict | None:
    """The process identity in `directory`'s marker; None when there is no marker rora wrote."""
    try:
        found = read_json(directory / MARKER, limit=4096)
    except (RoraError, OSError):
        return None
    ok = isinstance(found, dict) and type(found.get("pid")) is int and 0 < found["pid"] < 2**31 and isinstance(
        found.get("token"), str)
    return found if ok else None


def alive(identity: dict) -> bool:
    """Whether the process `identity` names still runs: the same process, not another that reuses its pid."""
    now = process_identity(identity["pid"])
    if identity.get("boot") and now["boot"] and identity["boot"] != now["boot"]:
        return False  # written before a reboot
    if not process_alive(identity["pid"]):
        return False
    return identity.get("start") is None or now["start"] is None or identity["start"] == now["start"]


def is_mine(identity: dict) -> bool:
    return {k: identity.get(k) for k in ("pid", "start", "boot")} == process_identity()


def remove_owned(directory: Path) -> bool:
    """Delete `directory` when it holds rora's marker, the marker last (an interrupted removal stays marked);
    anything else is left alone. Returns whether it was removed."""
    if directory.is_symlink() or not directory.is_dir() or read_marker(directory) is None:
        return False
    for child in directory.iterdir():
        if child.name != MARKER:
            _remove(child)
    (directory / MARKER).unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        directory.rmdir()
    return True


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_temporaries(path: str | Path) -> list[Path]:
    """Remove the marked leftovers of killed runs into `path` (see MARKER); returns what was removed. An older
    output that a kill left in its holder goes back to `path` when nothing took its place."""
    path = Path(path)
    removed = []
    if not path.parent.is_dir():
        return removed
    for kind in ("tmp", "old"):
        for leftover in path.parent.glob(f".{glob.escape(path.name)}.{kind}-*"):
            found = read_marker(leftover)
            if found is None or alive(found):
                continue
            kept = leftover / path.name
            if kind == "old" and os.path.lexists(kept) and not os.path.lexists(path):
                kept.rename(path)
            if remove_owned(leftover):
                removed.append(leftover)
    return removed


@contextlib.contextmanager
def _staging(path: Path, kind: str = "tmp") -> Iterator[Path]:
    """A marked hidden sibling of `path` (.NAME.KIND-XXXXXXXX) for building or holding it; removed at the end,
    whatever happened."""
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.{kind}-", dir=path.parent))
    try:
        claim(staging)
    except BaseException:
        staging.rmdir()  # empty: the marker was never written
        raise
    try:
        yield staging
    finally:
        remove_owned(staging)


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


def publish_modes(path: Path) -> None:
    """Give an output (a file, or a directory and everything in it) the modes any other tool would create under
    the umask (0644 files, 0755 directories by default): mkdtemp makes 0700 and safetensors writes 0600."""
    mask = _umask()
    for item in [path, *path.rglob("*")] if path.is_dir() else [path]:
        if not item.is_symlink():
            os.chmod(item, (0o777 if item.is_dir() else 0o666) & ~mask)


# Storage errors (a full disk, a quota, a read-only file system) while an output is written: errors only a write
# raises, so they are the output's. safetensors reports them as its own error type, with the OS error's number.
STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}


@contextlib.contextmanager
def _storage_errors(path: Path) -> Iterator[None]:
    """Any writer's storage error inside the block: one OutputError naming `path` and the cause."""
    try:
        yield
    except Exception as exc:
        code = _storage_errno(exc)
        if code is None:
            raise
        raise OutputError(f"cannot write {path}: {os.strerror(code)}; nothing of it was written (an older "
                          "output is kept)") from None


def _storage_errno(exc: Exception) -> int | None:
    if isinstance(exc, OSError):
        code = exc.errno
    else:
        found = re.search(r"os error (\d+)", str(exc))
        code = int(found.group(1)) if found else None
    return code if code in STORAGE_ERRNOS else None


def replace_dir(src: Path, dst: Path) -> None:
    """Move the complete directory `src` to `dst`, with published modes; an existing `dst` is kept, in a marked
    holder, until `src` is in its place (a kill in between leaves it there, and the next run puts it back)."""
    publish_modes(src)
    remove_stale_temporaries(dst)
    if not os.path.lexists(dst):
        src.rename(dst)
        return
    with _staging(dst, "old") as holder:
        dst.rename(holder / dst.name)
        try:
            src.rename(dst)
        except BaseException:
            (holder / dst.name).rename(dst)
            raise


@contextlib.contextmanager
def atomic_dir(path: str | Path, overwrite: bool = False, inputs=()) -> Iterator[Path]:
    """Yield a new directory that becomes `path` only when the block finishes without error."""
    path = check_output(path, overwrite, inputs)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    with _storage_errors(path), _staging(path) as staging:
        tmp = staging / path.name
        tmp.mkdir()
        yield tmp
        replace_dir(tmp, path)


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a path (in a marked staging directory beside `path`, which may hold work files too) whose file
    replaces `path` when the block finishes without error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    with _storage_errors(path), _staging(path) as staging:
        tmp = staging / path.name
        yield tmp
        publish_modes(tmp)
        os.replace(tmp, path)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def write_json(path: str | Path, data: Any) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(to_json(data))


def to_json(data: Any) -> str:
    return json.dumps(data, indent=2, default=_jsonable) + "\n"


# Size limits of what rora reads whole: a manifest, config or checkpoint state is kilobytes, a training or
# evaluation file tens of megabytes; the limits only stop a bomb (a multi-GB rora.json) before it is allocated.
JSON_LIMIT = 64 * 2**20
DATA_LIMIT = 2**30


def read_text(path: str | Path, error: type[Exception] = DataError, limit: int = JSON_LIMIT) -> str:
    """`path`'s UTF-8 text; `error` naming it when it is larger than `limit` bytes or not UTF-8. At most limit + 1
    bytes are read, so neither a huge file nor a device can make it allocate more."""
    with open(path, "rb") as f:
        raw = f.read(limit + 1)
    if len(raw) > limit:
        raise error(f"{path} is larger than {limit / 2**20:g} MiB, more than any such file rora reads; is it the "
                    "right file?")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{path} is not UTF-8 text (invalid byte 0x{raw[exc.start]:02x} at offset {exc.start})") from None


def read_json(path: str | Path, error: type[Exception] = DataError, limit: int = JSON_LIMIT) -> Any:
    """The JSON in `path`; a file that is not JSON (or not UTF-8, or too large, or nested too deeply) raises
    `error` naming it."""
    text = read_text(path, error, limit)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise error(f"{path} is corrupt (not valid JSON: {exc}); restore or remove it") from None
    except RecursionError:
        raise error(f"{path} is corrupt (JSON nested too deeply); restore or remove it") from None


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
STAGES = ("prune", "reconstruct", "recover", "merge", "export")
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
    # source key -> fingerprint() of what the pointer named when the stage read it; a command that follows the
    # pointer compares it (changed_inputs), so a model re-pruned in place is not silently taken for the old one.
    fingerprints: dict = dataclasses.field(default_factory=dict)


def manifest_path(output: str | Path) -> Path:
    """Where the manifest of the stage output `output` (a directory, or a file such as a .gguf) lives."""
    output = Path(output)
    return output.with_suffix(FILE_MANIFEST_SUFFIX) if output.is_file() else output / MANIFEST


def is_stage_output(path: str | Path) -> bool:
    return manifest_path(Path(str(path)).expanduser()).is_file()


def write_stage_manifest(output: str | Path, stage: str, source: dict, config: dict, report: dict) -> Path:
    """Write the manifest of the stage output `output` (see Manifest), with the fingerprint of every local input it
    points at; returns its path."""
    pointers = {k: _pointer(v) for k, v in source.items()}
    prints = {k: fingerprint(v) for k, v in pointers.items() if fingerprint(v) is not None}
    path = manifest_path(output)
    write_json(path, dataclasses.asdict(Manifest(stage, pointers, config, report, provenance(), fingerprints=prints)))
    return path


def _pointer(value) -> str | None:
    if value is None:
        return None
    path = Path(str(value)).expanduser()
    return os.path.abspath(path) if path.exists() else str(value)  # a hub id or alias stays as it is


MANIFEST_LIMIT = 16 * 2**20
POINTER_LIMIT = 4096  # characters of a source pointer (PATH_MAX)


def read_manifest(output: str | Path) -> Manifest:
    """The manifest of the stage output `output`; ManifestError when it has none or it is not one rora reads."""
    path = manifest_path(Path(str(output)).expanduser())
    if not path.is_file():
        raise ManifestError(f"{output} is not a rora stage output: it has no {path.name} (the manifest rora prune, "
                            "recover, merge and export write)")
    data = read_json(path, ManifestError, MANIFEST_LIMIT)
    if isinstance(data, dict) and type(data.get("schema")) is int and data["schema"] > SCHEMA_VERSION:
        raise ManifestError(f"{path} has schema {data['schema']}; this rora reads schema {SCHEMA_VERSION} and "
                            "older: upgrade rora")
    problem = _manifest_problem(data)
    if problem:
        raise ManifestError(f"{path} is corrupt (not a rora manifest: {problem}); restore it or rerun the stage")
    return Manifest(**{f.name: data[f.name] for f in dataclasses.fields(Manifest) if f.name in data})


def _manifest_problem(data) -> str | None:
    """What makes `data` not a manifest of this schema (every key, type and pointer checked), or None."""
    if not isinstance(data, dict):
        return f"a JSON {type(data).__name__}, not an object"
    required = [f.name for f in dataclasses.fields(Manifest)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [k for k in required if k not in data]
    if missing:
        return f"no {', '.join(missing)}"
    if type(data["schema"]) is not int:
        return f"schema {data['schema']!r:.40} is not a number"
    if not isinstance(data["stage"], str) or data["stage"] not in STAGES:
        return f"stage {data['stage']!r:.40} is none of {', '.join(STAGES)}"
    wrong = [k for k in ("source", "config", "report", "provenance", "fingerprints") if not isinstance(data.get(k, {}), dict)]
    if wrong:
        return f"{wrong[0]} is not an object"
    bad = [k for k, v in data["source"].items()
           if v is not None and not (isinstance(v, str) and "\0" not in v and len(v) <= POINTER_LIMIT)]
    bad += [k for k, v in data.get("fingerprints", {}).items() if not isinstance(v, str)]
    return f"source {bad[0]!r:.40} is not a path or a name" if bad else None


# ---- fingerprints of inputs ---------------------------------------------------------------------------------------
FINGERPRINTED = (".safetensors", ".gguf", ".bin", ".pt", ".pth", ".ckpt", ".json", ".jsonl", ".txt", ".model", ".parquet",
                 ".arrow")
SAMPLE_BLOCKS, BLOCK = 64, 16 * 2**10
MAX_ENTRIES = 100_000  # a directory larger than any model or data set has no fingerprint (a pointer to "/")


def fingerprint(spec) -> str | None:
    """A cheap identity of a local input's content; None for what is no local path (a hub id, an alias).

    A file counts by itself, a directory by the files that make it (weights, configs, tokenizer, data: the
    FINGERPRINTED suffixes; hidden files and rora's manifests left out), each by its name, size and a sample of its
    bytes (all of a small file, SAMPLE_BLOCKS evenly spaced blocks of a large one). So a model re-pruned or data
    rewritten in place no longer matches, and a 10 GB model is fingerprinted in milliseconds, not read whole."""
    if spec is None:
        return None
    path = Path(str(spec)).expanduser()
    if not path.exists():
        return None
    files = [path] if path.is_file() else _content_files(path)
    if files is None:
        return None
    digest = hashlib.sha256()
    for f in files:
        size = f.stat().st_size
        digest.update(f"{f.relative_to(path) if f != path else ''}\0{size}\0".encode())
        with open(f, "rb") as handle:
            if size <= SAMPLE_BLOCKS * BLOCK:
                digest.update(handle.read())
                continue
            for i in range(SAMPLE_BLOCKS):
                handle.seek(i * (size - BLOCK) // (SAMPLE_BLOCKS - 1))
                digest.update(handle.read(BLOCK))
    return digest.hexdigest()[:16]


def _content_files(directory: Path) -> list[Path] | None:
    """The files fingerprint() reads in `directory`; None past MAX_ENTRIES entries."""
    found, seen = [], 0
    for root, dirs, files in os.walk(directory):
        seen += len(dirs) + len(files)
        if seen > MAX_ENTRIES:
            return None
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [Path(root) / f for f in sorted(files) if not f.startswith(".") and f != MANIFEST
                  and not f.endswith(FILE_MANIFEST_SUFFIX) and f.endswith(FINGERPRINTED)]
    return found


def changed_inputs(manifest: Manifest) -> list[str]:
    """The source keys of `manifest` whose pointer no longer names what its stage read (by the fingerprints)."""
    return [key for key, value in manifest.fingerprints.items() if fingerprint(manifest.source.get(key)) != value]


def is_recovery(path: str | Path) -> bool:
    """Whether `path` is a recovery directory (an adapter, not a model)."""
    return is_stage_output(path) and read_manifest(path).stage == "recover"


@dataclass
class StageInput:
    """What a command given MODEL (and --adapter) loads: a model spec, and the adapter to attach to it.
    `model_named`: the user named the model (a recovery's base comes from its manifest instead); an opt-in such as
    --allow-pickle extends only to what the user named (see `trusts`)."""

    model: str
    adapter: Path | None = None
    model_named: bool = True

    def trusts(self, allow_pickle: bool) -> bool:
        """--allow-pickle for the model: only when the user named it."""
        return allow_pickle and self.model_named


def resolve_input(model: str | Path, adapter: str | Path | None = None, need_adapter: bool = False) -> StageInput:
    """MODEL is any model spec or a stage output. A recovery directory stands for its base model (the recovery's
    source, refused when it changed since the recovery read it) plus the adapter in it; an `adapter` that is a
    recovery directory stands for the adapter in it.
    `need_adapter`: no adapter either way is a ConfigError (before the model is loaded)."""
    if is_recovery(model):
        if adapter is not None:
            raise ConfigError(f"{model} is a recovery run and brings its own adapter; pass --adapter only with a base model")
        manifest = read_manifest(model)
        base = manifest.source.get("model")
        if not base:
            raise ModelLoadError(f"the recovery run {model} does not record its base model; name it: "
                                 f"BASE --adapter {model}")
        if "model" in changed_inputs(manifest):
            raise ManifestError(f"{model} was trained on {base}, which has changed since (re-pruned or replaced: its "
                                f"fingerprint differs); retrain on it, or name the model it was trained on: BASE "
                                f"--adapter {model}")
        return StageInput(base, Path(model) / ADAPTER_DIR, model_named=False)
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
    """Who made an output: package versions, git commit, machine and GPU (when it has one), time (lm-eval
    EvalResults style)."""
    import torch

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
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
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


def save_stage_model(model, tokenizer, out: str | Path, stage: str, source: dict, report: dict,
                     overwrite: bool = False, inputs=()) -> Path:
    """Write a stage's model as one atomic directory: safetensors, config, tokenizer and the stage's manifest
    (`report` without its "config" entry, which becomes the manifest's own section). `inputs`: what the stage
    read, which the output may not replace."""
    record = dict(report)
    config = record.pop("config")
    with atomic_dir(out, overwrite, inputs) as tmp:
        save_model_dir(model, tokenizer, tmp)
        write_stage_manifest(tmp, stage, source, config, record)
    return Path(out)


def dir_size(path: str | Path) -> int:
    """Bytes on disk of a file or directory tree."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def count_parameters(model) -> int:
    """Distinct parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
