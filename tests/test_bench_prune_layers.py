"""benchmarks/bench_prune_layers.py --report: one table of any finished rows, each with the importance it was pruned
with (recorded, or for older rows the preset's Taylor changed by the row's settings)."""
from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO, subprocess_env


def _row(name, layers, kl, prune=None, changes=None):
    row = {"name": name, "layers": layers, "ratio": 0.4, "weights": 75_000_000, "weights_base": 106_000_000,
           "pruned": {"kl": 2 * kl, "perplexity": 100.0, "tokens": 600},
           "reconstructed": {"kl": kl, "perplexity": 40.0 + kl, "tokens": 600}}
    return {**row, **({"prune": prune} if prune else {}), **({"changes": changes} if changes else {})}


def _report(tmp_path, names):
    return subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_prune_layers.py"), "--work", str(tmp_path),
                           "--report", names, "--out", str(tmp_path / "out")],
                          env=subprocess_env(), capture_output=True, text=True, timeout=300)


def test_the_report_names_each_rows_importance(tmp_path):
    rows = [_row("3:27@0.4", "3:27", 1.1),
            _row("3:27@0.4 importance=obs num_samples=64", "3:27", 0.75,
                 changes={"importance": "obs", "num_samples": 64, "calibration": "prose.parquet"}),
            _row("uniform@0.3 x", "uniform", 0.9,
                 prune={"importance": "obs", "num_samples": 256, "calibration": "prose.parquet"})]
    (tmp_path / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    done = _report(tmp_path, "uniform@0.3 x,3:27@0.4")
    assert done.returncode == 0, done.stderr[-3000:]
    table = (tmp_path / "out" / "prune_layers.md").read_text()
    obs = "| uniform | 0.4 | obs, 256 prose sequences of 128 tokens | 31.00M (29.2%) | 1.800 | 0.900 | 40.9 |"
    taylor = "| 3:27 | 0.4 | taylor, 8 built-in paragraphs | 31.00M (29.2%) | 2.200 | 1.100 | 41.1 |"
    assert obs in table and taylor in table and table.index(obs) < table.index(taylor)
    done = _report(tmp_path, "3:27@0.4 importance=obs num_samples=64")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| obs, 64 prose sequences of 128 tokens |" in (tmp_path / "out" / "prune_layers.md").read_text()
    assert (tmp_path / "out" / "prune_layers.png").stat().st_size > 0
    assert _report(tmp_path, "3:27@0.4,nope").returncode != 0  # a name with no row is an error, not a blank


def test_the_report_adds_validation_accuracy_paired_against_the_first_scored_row(tmp_path):
    """--accuracy rows: pruned and reconstructed validation accuracy, the paired difference against the first scored
    row (a row scored without it gets '-'), the unpruned model's in a note; mlp_ratio shows beside the ratio."""
    right, wrong = {"ARC-Easy": [1, 1, 0, 0], "openbookqa": [1, 0]}, {"ARC-Easy": [0, 0, 0, 0], "openbookqa": [0, 0]}
    rows = [_row("a", "3:27", 0.9, prune={"importance": "obs-mlp", "num_samples": 64, "calibration": "p.parquet"}),
            _row("b", "3:27", 0.8, prune={"importance": "obs-mlp", "num_samples": 64, "calibration": "p.parquet",
                                          "mlp_ratio": 0.3164}),
            _row("c", "3:27", 0.7, changes={"attention": False})]
    rows[0]["accuracy"] = {"pruned": wrong, "reconstructed": wrong}
    rows[1]["accuracy"] = {"pruned": wrong, "reconstructed": right}
    base = {"name": "unpruned", "accuracy": {"base": {"ARC-Easy": [1, 1, 1, 1], "openbookqa": [1, 1]}}}
    (tmp_path / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [*rows, base]))
    done = _report(tmp_path, "a,b,c")
    assert done.returncode == 0, done.stderr[-3000:]
    table = (tmp_path / "out" / "prune_layers.md").read_text()
    # b: ARC-Easy 2 of 4, OBQA 1 of 2: 50.0, se sqrt(0.289^2 + 0.5^2) / 2 = 28.9; paired against a, the same.
    assert "| 3:27 | 0.4, MLP 0.3164 | obs-mlp, 64 prose sequences of 128 tokens |" in table
    assert "| 3:27 | MLP 0.4, heads kept | taylor, 8 built-in paragraphs |" in table
    assert "| 0.0 ± 0.0 | 50.0 ± 28.9 | +50.0 ± 28.9 |" in table
    assert "| 0.0 ± 0.0 | 0.0 ± 0.0 |  |" in table and "| 40.7 | - | - | - |" in table
    assert "The unpruned model's validation accuracy: 100.0 ± 0.0." in table


def test_validation_tasks_read_the_llm_adapters_records_back_as_the_offline_test_files_were(tmp_path, data_dir):
    """validation_tasks parses train.json records; on the test records it must give the shipped lmeval files back."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from _common import VALIDATION_TASKS, validation_tasks

    for task in VALIDATION_TASKS:
        (tmp_path / "in" / task).mkdir(parents=True)
        (tmp_path / "in" / task / "train.json").write_bytes((data_dir / task / "test.json").read_bytes())
    out = validation_tasks(tmp_path / "in", tmp_path / "out", count=10**6)
    keys = {"question", "question_stem", "choices", "answerKey"}
    for task in VALIDATION_TASKS:
        got = [json.loads(line) for line in (out / task / "lmeval_test.jsonl").read_text().splitlines()]
        want = [json.loads(line) for line in (data_dir / task / "lmeval_test.jsonl").read_text().splitlines()]
        assert got == [{k: v for k, v in r.items() if k in keys} for r in want] and len(got) > 400
    last = validation_tasks(tmp_path / "in", tmp_path / "last", count=5)
    assert (last / "openbookqa" / "lmeval_test.jsonl").read_text().splitlines() == \
        (out / "openbookqa" / "lmeval_test.jsonl").read_text().splitlines()[-5:]
