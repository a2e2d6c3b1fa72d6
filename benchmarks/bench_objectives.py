"""Recovery objectives side by side (issue #12, benchmark 1): sft, kd, kd+sft, and kd on teacher-written text.

One pruned model (smollm2-135m, 30% uniform Taylor), the same training records and the same number of optimizer
steps of the same batch for every objective; the teacher is the unpruned model. For each recovered model: held-out
KL to the teacher and whole-text loss (validation records carved from the training data), accuracy on the eight
tasks (lm-eval protocol, native engine, a seeded random sample per task) with its standard error, the paired
difference against the pruned model on the same examples, the share of the pruning gap closed, and wall time.

Each finished run is appended to <work>/runs.jsonl, so an interrupted benchmark continues where it stopped.

    python benchmarks/bench_objectives.py                      # ~40 min on 2 quiet CPU cores
    python benchmarks/bench_objectives.py --steps 240 --sample 500 --work runs/objectives-gpu   # on a GPU
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import RESULTS, environment, paired_cell, percent, write_outputs  # noqa: E402

# name -> RecoverConfig changes. "kd-synthetic": the teacher writes as many texts as there are training records,
# continuing their instructions, and the student is distilled on those instead of on the records.
VARIANTS = {
    "sft": {"objective": "sft"},
    "kd": {"objective": "kd"},
    "kd+sft": {"objective": "kd+sft"},
    "kd-synthetic": {"objective": "kd", "synthetic_tokens": 96},
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--ratio", type=float, default=0.3)
    p.add_argument("--data", default=os.environ.get("RORA_DATA_DIR"), help="training data (default: RORA_DATA_DIR)")
    p.add_argument("--examples", type=int, default=384, help="training records (the same for every objective)")
    p.add_argument("--steps", type=int, default=24, help="optimizer steps of --batch records")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--sample", type=int, default=200, help="evaluation examples per task (seeded random sample)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ", ".join(VARIANTS))
    p.add_argument("--work", default="runs/objectives", help="scratch directory (pruned model, runs, results)")
    return p.parse_args(argv)


def recover_config(args, variant: str):
    from rora.config import RecoverConfig

    extra = dict(VARIANTS[variant])
    if variant == "kd-synthetic":
        extra["synthetic"] = args.examples
    return RecoverConfig(method="rora", rank=args.rank, lr=args.lr, max_steps=args.steps, batch_size=args.batch,
                         micro_batch_size=8, cutoff_len=192, val_set_size=32, max_train_examples=args.examples,
                         warmup_steps=3, eval_steps=max(1, args.steps // 6), save_steps=10_000, **extra)


def measure(model, teacher, tok, args, val_records) -> dict:
    """Accuracy outcomes on the suite and the held-out figures of one model."""
    from rora.config import EvalConfig
    from rora.evaluation.evaluate import evaluate
    from rora.evaluation.stats import outcomes_from_records
    from rora.measure import heldout_metrics
    from rora.recovery.distill import record_examples

    start = time.perf_counter()
    res = evaluate(model, tok, EvalConfig(protocol="lm-eval", sample=args.sample, seed=0, prose="none",
                                          generation=False), progress=False)
    held = heldout_metrics(model, teacher, tok, record_examples(val_records, tok, 192))
    return {"outcomes": outcomes_from_records(res.records), "heldout_loss": held["loss"], "heldout_kl": held["kl"],
            "eval_seconds": time.perf_counter() - start}


def main(argv=None) -> None:
    from rora.config import PruneConfig, RecoverConfig
    from rora.models import load_model
    from rora.pruning.prune import prune
    from rora.recovery.data import load_records, split_train_val
    from rora.recovery.trainer import recover

    args = parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    runs_path = work / "runs.jsonl"
    done = {r["name"]: r for r in map(json.loads, runs_path.read_text().splitlines())} if runs_path.is_file() else {}

    def keep(row: dict) -> None:
        done[row["name"]] = row
        with open(runs_path, "a") as f:
            f.write(json.dumps(row) + "\n")

    base, tok = load_model(args.model)
    teacher = copy.deepcopy(base).eval()
    cfg0 = RecoverConfig(val_set_size=32, max_train_examples=args.examples)
    _, val_records = split_train_val(load_records(args.data), cfg0.val_set_size, cfg0.seed, args.examples)
    if "base" not in done:
        keep({"name": "base", "tokens": 0, **measure(base, teacher, tok, args, val_records)})
    pruned = base
    report = prune(pruned, tok, PruneConfig(ratio=args.ratio, importance="taylor", num_samples=8))
    if "pruned" not in done:
        keep({"name": "pruned", "tokens": 0, "parameters": report.params_after,
              **measure(pruned, teacher, tok, args, val_records)})
    state = {k: v.clone() for k, v in pruned.state_dict().items()}
    for variant in args.variants.split(","):
        if variant in done:
            continue
        student = copy.deepcopy(pruned)
        student.load_state_dict(state)
        start = time.perf_counter()
        res = recover(student, tok, args.data, recover_config(args, variant), work / variant, overwrite=True,
                      progress=False, teacher=teacher)
        seconds = time.perf_counter() - start
        curve = [json.loads(line) for line in res.metrics_path.read_text().splitlines()]
        keep({"name": variant, "tokens": res.train_tokens, "train_seconds": seconds,
              "tokens_per_second": res.tokens_per_second, "best_step": res.best_step,
              "curve": [r for r in curve if "val_kl" in r], "step_tokens": [r.get("tokens") for r in curve if "loss" in r],
              **measure(res.model, teacher, tok, args, val_records)})
    report_results(args, done)


def report_results(args, done: dict) -> None:
    from rora.evaluation.stats import accuracy_table, gap_closed, paired_difference

    names = [n for n in ("base", "pruned", *args.variants.split(",")) if n in done]
    acc = {n: accuracy_table(done[n]["outcomes"]) for n in names}
    avg = {n: acc[n]["average"]["accuracy"] for n in names}
    rows, table = {}, ["| model | train tokens | held-out KL | whole-text loss | loss gap closed | average acc (%) | "
                       "vs pruned (paired) | acc gap closed | train s |", "|---" * 9 + "|"]
    for n in names:
        row = done[n]
        diff = paired_difference(done["pruned"]["outcomes"], row["outcomes"]) if n != "pruned" else None
        loss_closed = gap_closed(done["base"]["heldout_loss"], done["pruned"]["heldout_loss"], row["heldout_loss"])
        acc_closed = gap_closed(avg["base"], avg["pruned"], avg[n])
        rows[n] = {"accuracy": acc[n], "vs_pruned": diff, "heldout_kl": row["heldout_kl"],
                   "heldout_loss": row["heldout_loss"], "loss_gap_closed": loss_closed, "acc_gap_closed": acc_closed,
                   "tokens": row["tokens"], "train_seconds": row.get("train_seconds")}
        table.append(
            f"| {n} | {row['tokens']:,} | {row['heldout_kl']:.3f} | {row['heldout_loss']:.3f} | "
            f"{percent(loss_closed)} | {100 * avg[n]:.1f} ± {100 * acc[n]['average']['se']:.1f} | "
            f"{paired_cell(diff, 'average')} | {percent(acc_closed)} | {row.get('train_seconds', 0):.0f} |")
    tasks = [t for t in acc["pruned"] if t != "average"]
    table += ["", "Per task (%, ± se; * = paired difference from pruned beyond two standard errors):", "",
              "| model | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
    for n in names:
        diff = rows[n]["vs_pruned"]
        cells = [f"{100 * acc[n][t]['accuracy']:.1f} ± {100 * acc[n][t]['se']:.1f}"
                 + (" *" if diff and diff[t]["significant"] else "") for t in tasks]
        table.append(f"| {n} | " + " | ".join(cells) + " |")
    plot(done, names, acc, RESULTS / "objectives.png")
    setting = (f"{args.model} pruned {args.ratio:.0%} (Taylor, uniform); RoRA r={args.rank}, lr {args.lr:g}, "
               f"{args.steps} steps of {args.batch} of the same {args.examples} training records; teacher: the "
               f"unpruned model; accuracy: lm-eval protocol (native engine), a seeded sample of {args.sample} per task")
    write_outputs("objectives", title="Recovery objectives: sft vs kd vs kd+sft vs kd on teacher-written text",
                  command="python benchmarks/bench_objectives.py " + " ".join(sys.argv[1:]), setting=setting,
                  table="\n".join(table), data={"rows": rows, "runs": done, "environment": environment()},
                  images=["objectives.png"])
    print("\n".join(table))


def plot(done: dict, names: list[str], acc: dict, path: Path) -> None:
    """Left: held-out KL against training tokens. Right: average accuracy against training tokens (± se)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for n in names:
        row = done[n]
        if row.get("curve"):
            per_step = row["step_tokens"]
            xs = [sum(per_step[: r["step"]]) for r in row["curve"]]
            left.plot([0, *xs], [done["pruned"]["heldout_kl"], *[r["val_kl"] for r in row["curve"]]], "o-", label=n)
            right.errorbar([0, row["tokens"]], [100 * acc["pruned"]["average"]["accuracy"],
                                                100 * acc[n]["average"]["accuracy"]],
                           yerr=[100 * acc["pruned"]["average"]["se"], 100 * acc[n]["average"]["se"]],
                           fmt="o-", capsize=3, label=n)
    for n, style in (("base", "k--"), ("pruned", "k:")):
        right.axhline(100 * acc[n]["average"]["accuracy"], color="k", ls=style[1:], lw=1, label=n)
    left.set(xlabel="training tokens", ylabel="held-out KL(teacher || model), nats/token", yscale="log",
             title="Distance to the unpruned model")
    right.set(xlabel="training tokens", ylabel="average accuracy (%), ± 1 se", title="Eight-task accuracy")
    left.legend(fontsize=8)
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
