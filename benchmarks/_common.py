"""Shared by the benchmark scripts: the environment a figure was measured in, and the JSON + Markdown outputs."""
from __future__ import annotations

import datetime
import json
import os
import platform
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def environment() -> dict:
    import torch

    from rora.artifacts import provenance

    prov = provenance()
    return {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU",
        "torch_threads": torch.get_num_threads(),
        "versions": prov["versions"],
        "git_commit": prov["git_commit"],
    }


def matmul_peak(n: int = 1024, reps: int = 10) -> float:
    """Best fp32 FLOP/s of an n^3 torch.mm with the current thread count: the roof the engines are held against."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def write_outputs(name: str, *, title: str, command: str, setting: str, table: str, data: dict, images=()) -> None:
    """results/<name>.json (everything) and results/<name>.md (the section BENCHMARKS.md is assembled from)."""
    env = data.get("environment") or environment()
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps({**data, "environment": env}, indent=2, default=str) + "\n")
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v)
    md = [f"## {title}", "", f"- command: `{command}`", f"- machine: {env['machine']} ({env['device']}), {env['date']}",
          f"- versions: {versions}", f"- setting: {setting}", "", table, ""]
    md += [f"![{name}](benchmarks/results/{img})" for img in images]
    (RESULTS / f"{name}.md").write_text("\n".join(md) + "\n")
