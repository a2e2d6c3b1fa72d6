"""Shared by the benchmark scripts: the environment a figure was measured in, and the JSON + Markdown outputs."""
from __future__ import annotations

import datetime
import json
import os
import platform
import re
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
AT_END = 10**9  # recover.eval_steps for "validate once, after the last step" (the preset's 0 never validates)


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


def offline_data_dir(given: str | None) -> Path:
    """The commonsense data directory (--data-dir, else RORA_DATA_DIR); the benchmarks never download it."""
    import sys

    from rora.evaluation.data import resolve_data_dir

    found = resolve_data_dir(given)
    if found is None:
        sys.exit("set RORA_DATA_DIR or pass --data-dir (the benchmark runs offline)")
    return found


def matmul_peak(n: int = 1024, reps: int = 10, device="cpu") -> float:
    """Best fp32 FLOP/s of an n^3 torch.mm on `device` (on CPU with the current thread count): the roof the engines
    are held against."""
    import torch

    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    a @ b
    sync()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def write_outputs(name: str, *, title: str, command: str, setting: str, table: str, data: dict, images=(),
                  out: Path = RESULTS) -> None:
    """<out>/<name>.json (everything) and <out>/<name>.md (the section BENCHMARKS.md is assembled from); out is
    results/ unless a run writes elsewhere (a device run's $OUT, a test's temporary directory)."""
    env = data.get("environment") or environment()
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps({**data, "environment": env}, indent=2, default=str) + "\n")
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v)
    md = [f"## {title}", "", f"- command: `{command}`", f"- machine: {env['machine']} ({env['device']}), {env['date']}",
          f"- versions: {versions}", f"- setting: {setting}", "", table, ""]
    md += [f"![{name}](benchmarks/results/{img})" for img in images]
    (out / f"{name}.md").write_text("\n".join(md) + "\n")


def paired_cell(diff: dict | None, key: str) -> str:
    """A table cell for a paired difference (stats.paired_difference) at `key`: '+1.2 ± 0.8', starred beyond two
    standard errors; '-' where there is none."""
    if not diff or key not in diff:
        return "-"
    d = diff[key]
    return f"{100 * d['difference']:+.1f} ± {100 * d['se']:.1f}{' *' if d['significant'] else ''}"


def percent(x: float | None) -> str:
    return "-" if x is None else f"{100 * x + 0.0:.0f}%"  # + 0.0: no "-0%"


def validation_prose(prose_dir: str | Path, count: int = 48) -> list[str]:
    """The last `count` paragraphs of the prose corpus's last shard (tools/prose_corpus.py's output): validation
    text the demo and the benchmarks never train or calibrate on, since they read the corpus from the start."""
    import pyarrow.parquet as pq

    shards = sorted(Path(prose_dir).glob("*.parquet"))
    if not shards:
        raise SystemExit(f"no prose corpus in {prose_dir}: run `make prose` first")
    return pq.read_table(shards[-1]).column("text").to_pylist()[-count:]


# Tasks whose training split the offline data holds in a form log-likelihood scoring can read back (BoolQ's
# train.json lacks the passage its lm-eval task scores with), and the key their lm-eval records name the question by.
VALIDATION_TASKS = {"ARC-Easy": "question", "ARC-Challenge": "question", "openbookqa": "question_stem"}
_CHOICE = re.compile(r"Answer(\d): (.*?)(?= Answer\d: |$)")


def validation_tasks(data_dir: str | Path, out: str | Path, count: int = 300) -> Path:
    """Validation multiple-choice sets for the lm-eval protocol, carved from training data: the last `count` records
    of each VALIDATION_TASKS task's train.json, written as `<out>/<task>/lmeval_test.jsonl` in the original schema
    (question, choices, answerKey), parsed out of the LLM-Adapters instruction as the offline test files were. The
    demo's recovery reads a seeded ~1% of these training records, so a recovered model may have seen a few; a pruned
    or reconstructed one has seen none. Returns `out`, a data directory for evaluate() with these three tasks."""
    for task, key in VALIDATION_TASKS.items():
        records = json.loads((Path(data_dir) / task / "train.json").read_text())[-count:]
        lines = []
        for r in records:
            question, _, rest = r["instruction"].removeprefix("Please choose the correct answer to the question: ") \
                .partition("\n\n")
            choices = _CHOICE.findall(rest.split("\n\nAnswer format")[0])
            labels = [chr(ord("A") + int(n) - 1) for n, _ in choices]
            answer = chr(ord("A") + int(r["answer"].removeprefix("answer")) - 1)
            if not choices or answer not in labels:
                raise ValueError(f"{task}: cannot read the choices of {r['instruction'][:80]!r}")
            lines.append(json.dumps({key: question, "choices": {"text": [t for _, t in choices], "label": labels},
                                     "answerKey": answer}))
        (Path(out) / task).mkdir(parents=True, exist_ok=True)
        (Path(out) / task / "lmeval_test.jsonl").write_text("\n".join(lines) + "\n")
    return Path(out)


class DemoFigures:
    """The figures the demo's recovery recipe is chosen on, and the test prose beside them, loaded once:
        val_prose_*    perplexity and KL to the unpruned model on `prose_count` never-read corpus paragraphs
                       (validation_prose)
        val_records_*  KL on the recovery's own validation records (carved before the training records are capped)
        test_prose_*   perplexity and KL on `test_count` held-out BoolQ validation passages (measured, never chosen on)
    """

    def __init__(self, tok, recover_config, data_dir, prose_dir="runs/prose", prose_count=96, test_count=64):
        from rora.measure import Prose
        from rora.recovery.data import load_records, split_train_val
        from rora.recovery.distill import record_examples

        rc = recover_config
        self.tok = tok
        self.val_prose = validation_prose(prose_dir, prose_count)
        self.val_records = record_examples(split_train_val(load_records(str(data_dir)), rc.val_set_size, rc.seed)[1],
                                           tok, rc.cutoff_len)
        self.test_prose = Prose.load("auto", test_count, str(data_dir))

    def measure(self, model, base) -> dict:
        from rora.measure import heldout_metrics

        vp, vr = (heldout_metrics(model, base, self.tok, texts) for texts in (self.val_prose, self.val_records))
        tp = self.test_prose.measure(model, base, self.tok)
        return {"val_prose_ppl": vp["perplexity"], "val_prose_kl": vp["kl"], "val_prose_tokens": vp["tokens"],
                "val_records_kl": vr["kl"], "val_records_tokens": vr["tokens"], "test_prose_ppl": tp["perplexity"],
                "test_prose_kl": tp["kl"], "test_prose_tokens": tp["tokens"]}


class Runs:
    """<work>/runs.jsonl: the rows a benchmark finished so far, by name (`done`), so an interrupted benchmark
    continues where it stopped; keep(row) appends one."""

    def __init__(self, work: str | Path):
        self.work = Path(work)
        self.work.mkdir(parents=True, exist_ok=True)
        self.path = self.work / "runs.jsonl"
        lines = self.path.read_text().splitlines() if self.path.is_file() else []
        self.done = {r["name"]: r for r in map(json.loads, lines)}

    def keep(self, row: dict, say: str | None = None) -> None:
        self.done[row["name"]] = row
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"{row['name']}: {say}" if say else row["name"], flush=True)


def publish(name: str, *, title: str, setting: str, table: str, data: dict, out: Path = RESULTS) -> None:
    """write_outputs for the running script (its command line, <out>/<name>.png beside it), and the table printed."""
    import sys

    script = Path(sys.argv[0]).name
    write_outputs(name, title=title, command=f"python benchmarks/{script} " + " ".join(sys.argv[1:]), setting=setting,
                  table=table, data={**data, "environment": environment()}, images=[f"{name}.png"], out=out)
    print(table)


def save_figure(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def bar_pairs(path: Path, labels: list[str], series: tuple, ylabel: str, xlabel: str | None = None,
              fontsize: int | None = None) -> None:
    """Two bars per label, side by side: `series` is ((legend, values), (legend, values)); saved to `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(labels)), 3.4))  # room for every label
    xs = range(len(labels))
    for shift, (legend, values) in zip((-0.2, 0.2), series):
        ax.bar([x + shift for x in xs], values, width=0.4, label=legend)
    ax.set_xticks(list(xs), labels, fontsize=fontsize)
    if xlabel:
        ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    save_figure(fig, path)
