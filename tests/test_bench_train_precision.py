"""benchmarks/bench_train_precision.py at a tiny size: every variant trains its budget's tokens from the same model,
and the table reads the rows."""
from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO, subprocess_env


def _prose_corpus(root, paragraphs):
    """make prose's layout (parquet shards, a text column): the preset reads the second shard, the benchmark
    validates on the last one's last paragraphs."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root.mkdir()
    for i, shard in enumerate((paragraphs[:8], paragraphs[8:-8], paragraphs[-8:])):
        pq.write_table(pa.table({"text": shard}), root / f"train-0000{i}.parquet")


def test_bench_train_precision_trains_each_budget_and_tabulates_it(tmp_path, data_dir):
    words = "the river runs past the old mill and the town grows around its banks every year".split()
    _prose_corpus(tmp_path / "prose", [" ".join(words[i % 7:] + words[: i % 7]) * 3 for i in range(60)])
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_train_precision.py"), "--small",
                           "--variants", "float32:1,bfloat16:2", "--prose-dir", str(tmp_path / "prose"),
                           "--data-dir", str(data_dir), "--work", str(tmp_path / "work"), "--out", str(tmp_path)],
                          env=subprocess_env(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {r["name"]: r for r in json.loads((tmp_path / "train_precision.json").read_text())["rows"]}
    assert list(rows) == ["float32:1", "bfloat16:2"]
    one, double = rows.values()
    assert one["train_tokens"] > 0 and double["train_tokens"] > 1.5 * one["train_tokens"]
    assert all(r["val_records_tokens"] > 0 and r["val_prose_kl"] > 0 for r in rows.values())
    table = (tmp_path / "train_precision.md").read_text()
    ratio = double["tokens_per_second"] / one["tokens_per_second"]
    assert f"| bfloat16 | 2x | {double['train_tokens']:,} |" in table and f"({ratio:.2f}x)" in table
