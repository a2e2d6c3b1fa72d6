"""benchmarks/bench_precision.py at a tiny size: both precisions score the same examples, and the table reads them."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO, subprocess_env


def test_bench_precision_scores_the_same_examples_at_both_precisions(tmp_path, data_dir):
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_precision.py"), "--small", "--data-dir",
                           str(data_dir), "--out", str(tmp_path)],
                          env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads((tmp_path / "precision.json").read_text())
    row = data["rows"]["base"]
    assert data["sample"] == 3 and data["tasks"] == ["winogrande", "openbookqa"] and row["examples"] == 6
    assert 0 <= row["identical_predictions"] <= 6 and row["float32_s"] > 0 and row["bfloat16_s"] > 0
    assert row["bfloat16_minus_float32"]["average"]["difference"] == \
        pytest.approx(row["bfloat16_average"] - row["float32_average"])
    assert "| base | 6 |" in (tmp_path / "precision.md").read_text()
