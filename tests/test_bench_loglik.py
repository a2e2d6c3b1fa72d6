"""benchmarks/bench_loglik.py at a tiny size on CPU: the script the GPU run (issue 22, part 3) uses, end to end."""
from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO, subprocess_env


def test_bench_loglik_runs_at_a_tiny_size_and_both_engines_agree(tmp_path, data_dir):
    """benchmarks/bench_loglik.py --small (the GPU run's script, issue 22 part 3) on CPU, two tasks, into --out:
    the engines' predictions and metrics are identical, and every figure the table reads is there."""
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_loglik.py"), "--small", "--device", "cpu",
                           "--tasks", "winogrande,openbookqa", "--data-dir", str(data_dir), "--out", str(tmp_path)],
                          env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads((tmp_path / "loglik.json").read_text())
    assert data["tasks"] == ["winogrande", "openbookqa"] and data["models"] == ["base"]
    for run in data["runs"].values():
        assert run["n"] == 3 and run["identical_predictions"] == 3 and run["metric_equal"]
        assert run["max_abs_loglik_diff"] < 1e-3 and run["eps"] > 0 and run["hflm_eps"] > 0
    assert data["design_check"]["max_abs_diff"] < 1e-3 and data["ceiling"]["flop"] > 0
    assert "| base | **suite** | 6 |" in (tmp_path / "loglik.md").read_text()
