"""tools/device_carry.py: what a GPU machine lacks, packed into parts that each fit one call, and put back together
there, one call at a time."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, subprocess_env

sys.path.insert(0, str(REPO / "tools"))
import device_carry  # noqa: E402


def _inputs(tmp_path: Path) -> tuple[Path, Path, Path]:
    data = tmp_path / "data"
    for task, text in (("boolq", '{"question": "q"}\n'), ("piqa", '{"goal": "g"}\n')):
        (data / task).mkdir(parents=True)
        (data / task / "lmeval_validation.jsonl").write_text(text * 200)
    (data / "boolq" / "train.json").write_text("[]")
    (data / "boolq" / "test.json").write_text("[] not carried")
    (data / "README.md").write_text("the data")
    model = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"  # the embedded model's name, which rora looks for
    model.write_bytes(bytes(range(256)) * 900 + b"end")  # 230,403 bytes
    archive = device_carry.data_archive(data, tmp_path / device_carry.DATA)
    return data, model, archive


def _unpack(part: Path, tmp_path: Path) -> str:
    """One device call: only this part is in the working tree's .carry; /tmp survives from the calls before."""
    carried = tmp_path / f"call-{part.name}" / ".carry"
    carried.mkdir(parents=True)
    (carried / part.name).symlink_to(part)
    return device_carry.unpack(carried, tmp_path / "store", tmp_path / "site", tmp_path / "rora-data",
                               tmp_path / "tree" / "runs" / "prose")


def test_parts_fit_the_budget_and_the_model_is_whole_only_after_the_last_call(tmp_path):
    data, model, archive = _inputs(tmp_path)
    (tmp_path / "prose").mkdir()
    (tmp_path / "prose" / "train-00000.parquet").write_bytes(b"PAR1 shard")
    corpus = device_carry.prose_archive(tmp_path / "prose", tmp_path / device_carry.PROSE)
    assert device_carry.prose_archive(tmp_path / "no-corpus", tmp_path / "none.tar") is None
    budget = 100_000
    parts = device_carry.pack(tmp_path / "carry", [archive, corpus], model, budget)
    room = budget - 4096  # each part keeps room for the manifest
    assert len(parts) == -(-sum(f.stat().st_size for f in (model, archive, corpus)) // room) == 3
    for d in parts:
        assert sum(f.stat().st_size for f in d.iterdir()) <= budget
    joined = tmp_path / "site" / device_carry.MODEL_PACKAGE / model.name
    for i, d in enumerate(parts):
        said = _unpack(d, tmp_path)
        if i < len(parts) - 1:
            assert not joined.exists() and "the rest come with the next call" in said, said
    assert joined.read_bytes() == model.read_bytes()
    assert (joined.parent / "__init__.py").is_file()
    for f in ("boolq/lmeval_validation.jsonl", "piqa/lmeval_validation.jsonl", "boolq/train.json", "README.md"):
        assert (tmp_path / "rora-data" / f).read_bytes() == (data / f).read_bytes()
    assert not (tmp_path / "rora-data" / "boolq" / "test.json").exists()
    assert (tmp_path / "tree" / "runs" / "prose" / "train-00000.parquet").read_bytes() == b"PAR1 shard"


def test_rora_finds_the_joined_model_as_its_embedded_one(tmp_path):
    _, model, archive = _inputs(tmp_path)
    for d in device_carry.pack(tmp_path / "carry", [archive], model, 150_000):
        _unpack(d, tmp_path)
    found = subprocess.run([sys.executable, "-c", "from rora.models import smollm2_gguf_path as p; print(p().parent)"],
                           env=subprocess_env(PYTHONPATH=f"{tmp_path / 'site'}:{REPO}"), capture_output=True,
                           text=True, check=True).stdout.strip()
    assert Path(found) == tmp_path / "site" / device_carry.MODEL_PACKAGE


def test_a_damaged_piece_is_refused_in_one_line_and_nothing_is_joined(tmp_path, capsys):
    _, model, archive = _inputs(tmp_path)
    parts = device_carry.pack(tmp_path / "carry", [archive], model, 150_000)
    manifest = json.loads((parts[-1] / device_carry.MANIFEST).read_text())
    piece = next(d / p for d in parts for p in manifest["pieces"] if (d / p).is_file())
    piece.write_bytes(b"x" + piece.read_bytes()[1:])
    for d in parts[:-1]:
        _unpack(d, tmp_path)
    carried = tmp_path / "last" / ".carry"
    carried.mkdir(parents=True)
    (carried / parts[-1].name).symlink_to(parts[-1])
    code = device_carry.main(["unpack", str(carried), str(tmp_path / "store"), str(tmp_path / "site"),
                              str(tmp_path / "rora-data")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "sha256 differs" in err
    assert not list((tmp_path / "site" / device_carry.MODEL_PACKAGE).glob("*.gguf*"))


def test_a_file_larger_than_a_call_is_refused(tmp_path):
    _, model, archive = _inputs(tmp_path)
    with pytest.raises(device_carry.CarryError, match="does not fit one call"):
        device_carry.pack(tmp_path / "carry", [archive], model, archive.stat().st_size // 2)


def test_the_setup_script_exports_what_rora_needs_there(tmp_path):
    """tools/device_setup.sh, sourced in a copy of the tree whose .carry holds one part: the model lands under the
    site it puts first on PYTHONPATH, and RORA_DATA_DIR points at the unpacked data."""
    _, model, archive = _inputs(tmp_path)
    (part,) = device_carry.pack(tmp_path / "carry", [archive], model, 10**6)
    tree = tmp_path / "tree"
    (tree / "tools").mkdir(parents=True)
    for f in ("device_carry.py", "device_setup.sh"):
        (tree / "tools" / f).write_bytes((REPO / "tools" / f).read_bytes())
    (tree / ".carry").mkdir()
    (tree / ".carry" / "1").symlink_to(part)
    script = ". tools/device_setup.sh && echo \"$PYTHONPATH\" && echo \"$RORA_DATA_DIR\""
    # the script's /tmp paths, moved under tmp_path so that the test leaves nothing behind
    text = (tree / "tools" / "device_setup.sh").read_text().replace("/tmp/", f"{tmp_path}/")
    (tree / "tools" / "device_setup.sh").write_text(text)
    out = subprocess.run(["bash", "-c", script], cwd=tree, env=subprocess_env(), capture_output=True, text=True,
                         check=True).stdout.splitlines()
    assert out[-2].split(":")[0] == f"{tmp_path}/rora-site" and out[-1] == f"{tmp_path}/rora-data"
    assert (tmp_path / "rora-site" / device_carry.MODEL_PACKAGE / model.name).read_bytes() == model.read_bytes()

