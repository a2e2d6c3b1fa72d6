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
