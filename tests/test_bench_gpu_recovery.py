"""benchmarks/bench_gpu_recovery.py (issue 22, part 4) at a tiny size on CPU: a tiny random model through the
quickstart's prune, reconstruct and two kd budgets, every model measured on the same examples."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import REPO, make_model, make_tokenizer, subprocess_env

PARAGRAPH = ("The river runs past the old mill and the town gathers by the bridge each spring, when the water is "
             "high and the fields beyond the hill turn green again. ")


def test_bench_gpu_recovery_tiny_trains_each_budget_and_pairs_every_model(tmp_path, data_dir):
    model = tmp_path / "model"
    make_model().save_pretrained(model)
    make_tokenizer().save_pretrained(model)
    for i in range(2):
        docs = [f"{PARAGRAPH * (1 + (i + j) % 3)} Paragraph {i}-{j}." for j in range(60)]
        pq.write_table(pa.table({"text": docs}), tmp_path / f"train-{i:05d}.parquet")
    settings = ["prune.layers=0:2", f"prune.calibration={tmp_path / 'train-00001.parquet'}", "prune.num_samples=4",
                "prune.holdout_samples=2", "reconstruct.num_samples=4", "reconstruct.holdout_samples=2",
                f"reconstruct.calibration={tmp_path / 'train-00000.parquet'}",
                f"recover.text={tmp_path / 'train-*.parquet'}", "recover.val_set_size=2", "recover.batch_size=4",
                "recover.micro_batch_size=4", "eval.sample=3", "eval.tasks=[winogrande, openbookqa]",
                "eval.prose_documents=4"]
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_gpu_recovery.py"), "--model", str(model),
                           "--data", str(data_dir), "--budgets", "2000,4000", "--device", "cpu", "--out", str(out),
                           *[a for s in settings for a in ("--set", s)]],
                          cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads((out / "gpu_recovery.json").read_text())
    rows = data["rows"]
    assert [r["name"] for r in rows] == ["base", "pruned", "reconstructed", "recovered 2,000", "recovered 4,000"]
    examples = rows[0]["examples"]
    assert set(examples) == {"winogrande", "openbookqa"} and all(len(v) == 3 for v in examples.values())
    for r in rows:  # paired: every model on the same examples
        assert r["examples"] == examples and {t: len(v) for t, v in r["outcomes"].items()} == {t: 3 for t in examples}
        assert r["prose"]["tokens"] > 0 and r["prose"]["perplexity"] > 1
    for r in rows[3:]:
        assert 0.6 * r["budget"] <= r["train_tokens"] <= 1.4 * r["budget"], r  # max_steps from the budget
        assert abs(r["vs_pruned"]["average"]["difference"]) <= 1 and r["tokens_per_second"] > 0
    assert rows[4]["steps"] > rows[3]["steps"]
    assert rows[2]["calibration_tokens"] == 4 * 128
    md = (out / "gpu_recovery.md").read_text()
    assert "| recovered 4,000 |" in md and "6 examples per model (3 per task)" in md and "Incomplete" not in md
    assert data["complete"] and data["skipped"] == []
    assert (out / "gpu_recovery.png").stat().st_size > 0


def test_bench_gpu_recovery_measures_speed_first_then_skips_what_the_deadline_leaves_no_room_for():
    sys.path.insert(0, str(REPO / "benchmarks"))
    import bench_gpu_recovery as bench

    assert bench.run_order([3_000_000, 1_000_000, 10_000_000]) == [1_000_000, 10_000_000, 3_000_000]
    now = time.time()
    assert bench.overrun(10_000_000, None, 30.0, now + 1) is None  # the speed is not measured yet: it runs
    assert bench.overrun(10_000_000, 1e5, 30.0, None) is None  # no deadline
    assert bench.overrun(10_000_000, 1e5, 30.0, now + 100) == pytest.approx(130.0)  # 100 s training + 30 s eval
    assert bench.overrun(10_000_000, 1e5, 30.0, now + 200) is None
