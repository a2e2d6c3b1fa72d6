"""Text sources through `datasets`: a save_to_disk directory, parquet/arrow shards and a dataset directory (loaded by
`datasets`' own loaders, as a hub id is) give the same packed sequences as the same documents in a .jsonl file; the
token budget is exact and stops the reading; the manifest records what was read; calibration reads them too; bad
sources are one clear line, before anything is written."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import even_odd_records, make_model, tiny_recover_config
from click.testing import CliRunner

from rora.errors import DataError
from rora.recovery.data import prepare_text, step_plan, text_source
from rora.sources.text import TextSource, pack, pack_source, token_stream

pytestmark = pytest.mark.usefixtures("one_thread")

WORDS = "the cat sat on the mat and the answer is true false Paris France capital of a".split()


def documents(n: int = 40) -> list[str]:
    """Documents of different lengths (a few words to a few dozen)."""
    return [f"Document {i}: " + " ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(3 + (i * 5) % 31))
            for i in range(n)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The same documents as a .jsonl file, a save_to_disk directory (and DatasetDict), parquet and arrow shards,
    and a dataset directory with two configs (the column named 'body', a validation split)."""
    from datasets import Dataset, DatasetDict

    root = tmp_path_factory.mktemp("corpus")
    docs = documents()
    (root / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    ds = Dataset.from_list([{"id": i, "text": d} for i, d in enumerate(docs)])
    ds.save_to_disk(str(root / "saved"))
    DatasetDict({"train": Dataset.from_list([{"text": "other"}] * 3), "validation": ds}).save_to_disk(str(root / "dict"))
    (root / "shards").mkdir()
    for k, (a, b) in enumerate(((0, 13), (13, 27), (27, 40))):
        ds.select(range(a, b)).to_parquet(str(root / "shards" / f"train-{k:05d}.parquet"))
    body = Dataset.from_list([{"body": d} for d in docs])
    (root / "hub" / "en").mkdir(parents=True)
    body.select(range(5)).to_parquet(str(root / "hub" / "en" / "train-0.parquet"))
    body.to_parquet(str(root / "hub" / "en" / "validation-0.parquet"))
    (root / "hub" / "README.md").write_text(
        "---\nconfigs:\n- config_name: en\n  data_files:\n  - split: train\n    path: en/train-*.parquet\n"
        "  - split: validation\n    path: en/validation-*.parquet\n- config_name: fr\n  data_files: en/train-*.parquet\n---\n")
    return root


SOURCES = {
    "saved": lambda r: {"text": str(r / "saved")},
    "saved DatasetDict, split": lambda r: {"text": str(r / "dict"), "text_split": "validation"},
    "parquet shards": lambda r: {"text": str(r / "shards" / "train-*.parquet")},
    "arrow shard": lambda r: {"text": str(r / "saved" / "*.arrow")},
    "dataset dir, config/split/field flags": lambda r: {"text": str(r / "hub"), "text_config": "en",
                                                        "text_split": "validation", "text_field": "body"},
    "dataset dir, query": lambda r: {"text": f"{r / 'hub'}?config=en&split=validation&field=body"},
}


@pytest.mark.parametrize("name", SOURCES)
def test_datasets_sources_pack_to_the_same_batches_as_a_jsonl_file(corpus, tokenizer, name):
    base = dict(cutoff_len=24, val_set_size=3, max_text_tokens=900)
    jsonl = tiny_recover_config(text=str(corpus / "docs.jsonl"), **base)
    want = prepare_text(text_source(jsonl), tokenizer, jsonl)
    cfg = tiny_recover_config(**SOURCES[name](corpus), **base)
    got = prepare_text(text_source(cfg), tokenizer, cfg)
    assert got.train == want.train and got.val == want.val and got.fingerprint == want.fingerprint
    plan = [step_plan([len(e) for e in d.train], 2, 2, 6, 7, True) for d in (want, got)]
    assert plan[0] == plan[1]  # the same micro-batches of the same sequences, step by step
    assert got.text["tokens"] == want.text["tokens"] == 900 and got.text["documents"] == want.text["documents"]
    assert got.text["kind"] in ("saved", "shards", "dataset") and (got.text.get("fingerprint") or got.text["kind"])


def test_the_token_budget_is_exact_and_stops_the_reading(corpus, tokenizer):
    docs = documents()
    ids = [tokenizer(d)["input_ids"] + [tokenizer.eos_token_id] for d in docs]
    total = sum(map(len, ids))
    for budget in (37, 100, 401, total - 5):
        packed = pack_source(TextSource(str(corpus / "shards" / "*.parquet")), tokenizer, 16, budget)
        stream = [t for q in packed.sequences for t in q]
        assert len(stream) == budget - (budget % 16 == 1)  # a one-token remainder predicts nothing
        assert stream == [t for d in ids for t in d][: len(stream)]  # documents in order, EOS between them
        used = next(k for k in range(1, len(ids) + 1) if sum(map(len, ids[:k])) >= budget)
        assert packed.record["documents"] == used and packed.record["exhausted"] is False
    whole = pack_source(TextSource(str(corpus / "saved")), tokenizer, 16, total + 100)
    assert whole.record["tokens"] == total and whole.record["exhausted"] is True and whole.record["documents"] == 40
    assert pack_source(TextSource(str(corpus / "docs.jsonl")), tokenizer, 16).sequences == pack(docs, tokenizer, 16)

    read = []

    def streamed():
        for d in docs * 1000:  # a corpus far larger than the budget
            read.append(d)
            yield d

    stream, used, exhausted = token_stream(streamed(), tokenizer, 50)
    assert len(stream) == 50 and not exhausted and len(read) <= 64  # one tokenizer batch, not the corpus


def test_recover_records_the_text_read_and_mixes_it_with_records(corpus, tokenizer, tmp_path):
    teacher = make_model(seed=4)
    cfg = tiny_recover_config(objective="kd", text=str(corpus / "shards" / "*.parquet"), max_text_tokens=500,
                              cutoff_len=24, val_set_size=2, max_steps=2)
    run = recover_(make_model(seed=4), tokenizer, None, cfg, tmp_path / "text", teacher)
    text = json.loads((tmp_path / "text" / "rora.json").read_text())["report"]["text"]
    assert run.text == text and text["tokens"] == 500 and text["kind"] == "shards" and text["files"] == 3
    assert text["source"] == str(corpus / "shards" / "*.parquet") and len(text["fingerprint"]) == 16
    mixed = tiny_recover_config(**{**cfg.to_dict(), "text_ratio": 0.5, "cutoff_len": 256,
                                   "max_text_tokens": 3000})
    run = recover_(make_model(seed=4), tokenizer, even_odd_records(40), mixed, tmp_path / "mixed", teacher)
    assert run.text["text_ratio"] == 0.5 and 0 < run.text["mixed_text_tokens"] < 3000 and run.steps == 2


def recover_(model, tokenizer, data, cfg, out, teacher):
    from rora.recovery.trainer import recover

    return recover(model, tokenizer, data, cfg, out, progress=False, teacher=teacher)


def test_calibration_of_pruning_and_reconstruction_reads_text_sources(corpus, tokenizer):
    from rora.config import PruneConfig, ReconstructConfig
    from rora.pruning.calibration import calibration_samples
    from rora.reconstruction.calibration import calibration_sequences

    docs = pack(documents(), tokenizer, 16)
    full = [q for q in docs if len(q) == 16]
    spec = f"{corpus / 'hub'}?config=en&split=validation&field=body"
    ids, what = calibration_sequences(ReconstructConfig(calibration=spec, num_samples=6, holdout_samples=2, seq_len=16),
                                      tokenizer)
    assert ids.shape == (8, 16) and sorted(ids.tolist()) == sorted(full[:8]) and "hub" in what
    calib, held, what = calibration_samples(tokenizer, PruneConfig(calibration=str(corpus / "saved"), num_samples=3,
                                                                   holdout_samples=2, seq_len=16))
    assert [t.shape for t in calib + held] == [torch.Size([1, 16])] * 5
    assert sorted(t[0].tolist() for t in calib + held) == sorted(full[:5])
    with pytest.raises(DataError, match=r"fills \d+ sequences of 16 tokens, but 80 are needed"):
        calibration_samples(tokenizer, PruneConfig(calibration=f"{corpus / 'hub'}?config=fr&field=body",
                                                   num_samples=70, holdout_samples=10, seq_len=16))


@pytest.mark.parametrize("args, message", [
    (["--text", "{root}/missing.jsonl"], "text source not found"),
    (["--text", "{root}/shards/*.csv"], "no files match"),
    (["--text", "someorg/some-corpus", "--max-text-tokens", "1000"], "the hub is offline (HF_HUB_OFFLINE=1)"),
    (["--text", "{root}/shards/*.parquet", "--text-field", "body"], "row 0 has no 'body' field (fields: id, text)"),
    (["--text", "{root}/dict", "--text-split", "test"], "has no split 'test' (splits: train, validation)"),
    (["--text", "{root}/hub", "--text-config", "de"], "BuilderConfig 'de' not found"),
    (["--text", "{root}/shards/*.parquet", "--lr", "fast"], "recover.lr must be a number > 0 or 'auto'"),
])
def test_bad_text_sources_are_one_line_and_write_nothing(corpus, tmp_path, tokenizer, args, message):
    from rora.artifacts import save_model_dir
    from rora.cli import main

    save_model_dir(make_model(), tokenizer, tmp_path / "m")
    out = tmp_path / "out"
    argv = ["recover", str(tmp_path / "m"), "--out", str(out), "--max-steps", "1", "--val-set-size", "1",
            *[a.format(root=corpus) for a in args]]
    done = CliRunner().invoke(main, argv)
    last = done.stderr.strip().splitlines()[-1]
    assert done.exit_code == 2 and last.startswith("rora: error:") and message in last, done.output
    assert "Traceback" not in done.stderr and not out.exists() and not (tmp_path / ".out.partial").exists()


def test_a_hub_id_needs_a_token_budget(monkeypatch):
    from rora.recovery.data import check_text

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # nothing is fetched: the check stops before any request
    with pytest.raises(DataError, match="is streamed: give a token budget"):
        check_text(tiny_recover_config(text="someorg/some-corpus"))
    assert TextSource.parse("someorg/c?split=validation&field=body").check() == "hub"
    assert TextSource.parse("odd?name.txt") == TextSource("odd?name.txt")  # no query: a '?' in a file name


def test_calibration_typos_are_config_errors():
    from rora.config import PruneConfig, ReconstructConfig
    from rora.errors import ConfigError

    with pytest.raises(ConfigError, match="reconstruct.calibration 'teachr' is neither .* \\(did you mean 'teacher'"):
        ReconstructConfig(calibration="teachr")
    with pytest.raises(ConfigError, match="prune.calibration 'builtn' .* \\(did you mean 'builtin'"):
        PruneConfig(calibration="builtn")
    assert ReconstructConfig(calibration="someorg/teacher-corpus").calibration == "someorg/teacher-corpus"


@pytest.mark.parametrize("section, setting", [("recover", {"text": "{root}/none-*.parquet", "max_text_tokens": 100}),
                                              ("prune", {"calibration": "{root}/none.parquet"}),
                                              ("reconstruct", {"calibration": "someorg/corpus"})])
def test_rora_run_checks_its_text_sources_before_the_first_stage(corpus, tmp_path, section, setting):
    from rora.config import PipelineConfig
    from rora.pipelines.run import run_pipeline

    (tmp_path / "train.json").write_text(json.dumps(even_odd_records(8)))
    cfg = PipelineConfig.from_dict({"model": str(tmp_path / "no-model"), "out": str(tmp_path / "run"),
                                    "data": str(tmp_path / "train.json"), "skip": ["eval_base", "eval_pruned",
                                    "eval_reconstructed", "eval_recovered"],
                                    section: {k: v.format(root=corpus) if isinstance(v, str) else v
                                              for k, v in setting.items()}})
    with pytest.raises(DataError, match="no files match|not found|the hub is offline"):
        run_pipeline(cfg, progress=False)
    assert not (tmp_path / "run").exists()


def test_rora_run_takes_the_text_flags_and_defaults_to_lr_auto():
    import yaml

    from rora.cli import main

    def resolved(*args):
        done = CliRunner().invoke(main, ["run", *args, "--print-config"])
        assert done.exit_code == 0, done.output
        return yaml.safe_load(done.stdout)["recover"]

    assert resolved()["lr"] == "auto" and resolved("--preset", "quickstart")["lr"] == 0.001  # the preset's measured lr
    # the preset never validates (eval_steps 0), which lr auto's probes need: refused in one line, then given
    refused = CliRunner().invoke(main, ["run", "--preset", "quickstart", "--lr", "auto", "--print-config"])
    assert refused.exit_code == 2 and "eval_steps > 0" in refused.output
    found = resolved("--preset", "quickstart", "--lr", "auto", "--text", "c/*.parquet", "--max-text-tokens", "5000",
                     "--text-ratio", "0.25", "--set", "recover.text_field=body", "--set", "recover.eval_steps=100")
    assert (found["lr"], found["text"], found["max_text_tokens"], found["text_ratio"], found["text_field"]) == (
        "auto", "c/*.parquet", 5000, 0.25, "body")
    assert resolved("--lr", "3e-4")["lr"] == 3e-4 and resolved("--set", "recover.lr=2e-4")["lr"] == 2e-4
