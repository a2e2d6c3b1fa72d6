"""benchmarks/bench_writing.py --report-only: the table from finished rows, written where --out says (a run on
another prune must not replace the published section)."""
from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO, subprocess_env


def _row(name, wide, each, **extra):
    return {"name": name, "repetition": wide, "se": {"text": 0.02, "task": 0.03}, "by_set": {"text": wide, "task": 0.0},
            "wide": wide, "wide_se": 0.01, "wide_each": each, "distinct_2": 0.5, "reference_ppl": 3.0,
            "val_prose_kl": 0.6, "test_prose_ppl": 40.0, **extra}


def test_report_only_writes_to_out_and_pairs_rows_over_the_same_openings(tmp_path):
    base = _row("base", 0.125, [[1, 4], [0, 4], [1, 4], [0, 4]])
    ref = _row("kd+sft-0.6-ul1", 0.5, [[2, 4], [2, 4], [2, 4], [2, 4]], val_kl=0.55, seconds=140.0)
    (tmp_path / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (base, ref)))
    published = (REPO / "benchmarks" / "results" / "writing.md").read_bytes()
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_writing.py"), "--report-only", "--work",
                           str(tmp_path), "--reference", "kd+sft-0.6-ul1", "--out", str(tmp_path / "out")],
                          env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    table = (tmp_path / "out" / "writing.md").read_text()
    # base - reference on the same four openings: 2/16 - 8/16 = -37.5 points. Linearised per opening,
    # (a - 0.125 * 4) / 4 - (b - 0.5 * 4) / 4 = +-0.125, so the paired se is 0.144 / sqrt(4) = 7.2 points.
    assert "| base | 12.5 | 12.5 ± 2.0 (1.00x) / 0.0 ± 3.0 | 12.5 ± 1.0 (1.00x) | -37.5 ± 7.2 * |" in table
    assert "| kd+sft-0.6-ul1 | 50.0 | 50.0 ± 2.0 (4.00x) / 0.0 ± 3.0 | 50.0 ± 1.0 (4.00x) | - |" in table
    assert "| 0.550 | 0.600 | 40.0 | 140 |" in table
    assert (tmp_path / "out" / "writing.png").stat().st_size > 0
    assert (REPO / "benchmarks" / "results" / "writing.md").read_bytes() == published
