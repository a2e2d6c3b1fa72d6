"""benchmarks/bench_demo_text.py --report: the table reads each variant's latest reconstructed and recovered rows."""
from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO, subprocess_env


def _row(name, stage, kl, fit, precision, extra):
    return {"name": name, "stage": stage, "val_prose_ppl": 40 + 10 * kl, "val_prose_kl": kl, "val_prose_tokens": 1000,
            "val_records_kl": kl / 2, "val_records_tokens": 500, "test_prose_ppl": 50 + kl, "test_prose_tokens": 700,
            "extra": extra, "reconstruction": {"fit": fit, "hold": 32, "calib": "prose.parquet", "precision": precision},
            "set": ["rank=32"] if name == "b" else []}


def _report(tmp_path, names):
    return subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_demo_text.py"), "--work", str(tmp_path),
                           "--report", names, "--out", str(tmp_path / "out")],
                          env=subprocess_env(), capture_output=True, text=True, timeout=300)


def test_the_report_tabulates_each_variants_latest_rows(tmp_path):
    rows = [_row("a", "reconstructed", 0.95, 256, "float32", "150 s"), _row("a", "recovered", 0.9, 256, "float32", "x"),
            _row("b", "reconstructed", 0.93, 448, "bfloat16", "170 s"), _row("b", "recovered", 0.85, 448, "bfloat16", "x"),
            _row("b", "recovered", 0.8, 448, "bfloat16", "rerun")]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    done = _report(tmp_path, "b,a")
    assert done.returncode == 0, done.stderr[-3000:]
    table = (tmp_path / "out" / "demo_text.md").read_text()
    b = "| b rank=32 | 448 x 128, bfloat16 | 170 | 49.3 (0.930) | 48.0 (0.800) | 0.400 | 50.8 |"
    a = "| a | 256 x 128, float32 | 150 | 49.5 (0.950) | 49.0 (0.900) | 0.450 | 50.9 |"
    assert b in table and a in table and table.index(b) < table.index(a)
    assert (tmp_path / "out" / "demo_text.png").stat().st_size > 0
    assert _report(tmp_path, "a,c").returncode != 0  # a variant with no recovered row is an error, not a blank
