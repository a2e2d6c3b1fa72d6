"""Benchmark (issue 22, part 4): a recovery at ~1000x the demo's budget on one GPU, and what each budget buys.

SmolLM2-135M is pruned and reconstructed as the quickstart preset does (its prune and reconstruct sections), then
distilled from the unpruned model with the quickstart's recover section (kd+sft, RoRA rank 16, unlikelihood) on
every training record and every paragraph of the Wikipedia corpus (`make prose`), half and half by tokens, cycled
over as many epochs as each budget takes. Each budget in --budgets is its own run from the reconstructed model, so
each point of the curve is a complete recipe at that budget. Every model is measured on the same examples: the FULL
test sets of the eight tasks (lm-eval protocol, native engine; 22,419 examples; or a seeded --sample per task),
paired against the base and the pruned model, and on held-out prose (BoolQ validation passages: measured only).
Nothing is chosen on a test set: the recipe is the quickstart's, the budgets are fixed in advance.

Device time is short (one call runs 10 minutes at most), so with --budget-s the smallest budget runs first and
measures the training speed, the others then run largest first, and each is skipped (and recorded so) when its
training at that speed plus one evaluation would not end in time. The outputs are rewritten after every model, so
a call stopped at its limit still brings back every model measured before.

    . tools/device_setup.sh && python3 benchmarks/bench_gpu_recovery.py --budget-s 400 --out $OUT   # the GPU run
    python benchmarks/bench_gpu_recovery.py --model DIR --budgets 2000,4000 --set eval.sample=3 \\
        --set prune.layers=0:2 --set reconstruct.num_samples=4 ... --out /tmp/rec         # tiny, on CPU (the test)
--set SECTION.KEY=VALUE changes the preset as `rora run --set` does, after the scale-up below (SCALE). The GPU run
needs the model, the data and the corpus carried there (tools/device_carry.py); results/gpu_recovery.* take the
files it writes to --out.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import RESULTS, environment, paired_cell, percent, save_figure, write_outputs  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data", default=os.environ.get("RORA_DATA_DIR"), help="task data (default: RORA_DATA_DIR)")
    p.add_argument("--budgets", default="1000000,3000000,10000000", help="training tokens of each recovery")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="a setting of the quickstart preset changed (YAML values, as rora run --set)")
    p.add_argument("--device", default=None, help="default: cuda when available")
    p.add_argument("--budget-s", type=float, default=None,
                   help="skip a recovery that would not end within this many seconds of the start; unset: no limit")
    p.add_argument("--out", type=Path, default=RESULTS)
    return p.parse_args(argv)


# The quickstart preset at scale: every record and every paragraph of the corpus (half and half by tokens, the
# preset's text_ratio), a GPU-sized batch, no validation pass (the budgets are fixed in advance; nothing is chosen),
# the full test sets and more prose.
SCALE = {"recover.text": "runs/prose/train-*.parquet", "recover.max_train_examples": None,
         "recover.max_text_tokens": None, "recover.batch_size": 64, "recover.micro_batch_size": 64,
         "recover.eval_steps": 0, "eval.sample": None, "eval.prose_documents": 256}


def main(argv=None) -> None:
    import torch

    from rora.config import load_preset, parse_setting
    from rora.evaluation.evaluate import evaluate
    from rora.evaluation.stats import outcomes_from_records
    from rora.measure import Prose
    from rora.models import load_model
    from rora.pruning.prune import prune
    from rora.reconstruction.calibration import calibration_sequences
    from rora.reconstruction.reconstruct import reconstruct
    from rora.recovery.trainer import _training_data, recover

    args = parse_args(argv)
    start_time = time.time()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    preset = load_preset("quickstart").with_settings({**SCALE, **dict(map(parse_setting, args.set))})
    base, tok = load_model(args.model, device=device)
    teacher = copy.deepcopy(base).eval()
    prose = Prose.load("auto", preset.eval.prose_documents, args.data)
    eval_cfg = preset.eval.replace(prose="none", generation=False)  # prose is measured here, against the teacher

    def measure(name: str, model, **extra) -> dict:
        start = time.perf_counter()
        res = evaluate(model, tok, eval_cfg, data_dir=args.data, progress=False)
        row = {"name": name, **extra, "outcomes": outcomes_from_records(res.records),
               "examples": {t: sorted(int(r["index"]) for r in res.records if r["task"] == t) for t in eval_cfg.tasks},
               "prose": prose.measure(model, teacher, tok), "eval_seconds": time.perf_counter() - start}
        print(f"{name}: {summary_line(row)}", flush=True)
        return row

    recipe = preset.recover
    epoch = _training_data(args.data, tok, recipe).train  # what one epoch of the recipe trains on
    epoch_tokens = sum(len(e) for e in epoch)
    skipped, speed = [], None  # training tokens/s, once a recovery has measured it
    deadline = None if args.budget_s is None else start_time + args.budget_s
    rows = [measure("base", base)]
    pruned = copy.deepcopy(base)
    start = time.perf_counter()
    prune(pruned, tok, preset.prune)
    rows.append(measure("pruned", pruned, seconds=time.perf_counter() - start))
    report(args, rows, epoch_tokens, preset, skipped)
    rc = preset.reconstruct
    ids, what = calibration_sequences(rc, tok, teacher=teacher)
    rec = reconstruct(pruned, teacher, tok, rc, sequences=ids, source=what, progress=False)
    rows.append(measure("reconstructed", pruned, seconds=rec.seconds, calibration_tokens=rec.calibration["fit_tokens"]))
    report(args, rows, epoch_tokens, preset, skipped)

    with tempfile.TemporaryDirectory() as work:
        for budget in run_order(map(int, args.budgets.split(","))):
            need = overrun(budget, speed, rows[0]["eval_seconds"], deadline)
            if need is not None:
                skipped.append({"budget": budget, "needs_seconds": round(need)})
                print(f"recovered {budget:,}: skipped, it needs ~{need:.0f} s", flush=True)
                continue
            steps = max(1, round(budget / epoch_tokens * len(epoch) / recipe.batch_size))  # epochs cycle
            cfg = recipe.replace(max_steps=steps, warmup_steps=max(1, steps // 30), save_steps=steps)
            model = copy.deepcopy(pruned)  # the adapter wraps the copy; pruned stays the reconstructed model
            start = time.perf_counter()
            res = recover(model, tok, args.data, cfg, Path(work) / str(budget), overwrite=True, progress=False,
                          teacher=teacher)
            seconds = time.perf_counter() - start
            speed = res.train_tokens / seconds
            rows.append(measure(f"recovered {budget:,}", res.model, budget=budget, steps=res.steps,
                                train_tokens=res.train_tokens, seconds=seconds, tokens_per_second=speed))
            report(args, rows, epoch_tokens, preset, skipped)
    report(args, rows, epoch_tokens, preset, skipped, final=True)


def overrun(budget: int, speed: float | None, eval_seconds: float, deadline: float | None) -> float | None:
    """The seconds a recovery of `budget` tokens and its evaluation need, when they would end after the deadline
    (time.time() scale) at `speed` training tokens/s; None when it fits, or no deadline or speed is known yet."""
    if deadline is None or speed is None:
        return None
    need = budget / speed + eval_seconds
    return need if time.time() + need > deadline else None


def run_order(budgets) -> list[int]:
    """The smallest budget first (it measures the training speed), then the others largest first: the goal's
    budget before the curve's middle points."""
    first, *rest = sorted(budgets)
    return [first, *sorted(rest, reverse=True)]


def summary_line(row: dict) -> str:
    from rora.evaluation.stats import accuracy_table

    acc = accuracy_table(row["outcomes"])["average"]
    return (f"avg {100 * acc['accuracy']:.1f} ± {100 * acc['se']:.1f} ({sum(len(v) for v in row['outcomes'].values())}"
            f" examples), prose ppl {row['prose']['perplexity']:.1f} (KL {row['prose']['kl']:.3f})")


def report(args, rows: list[dict], epoch_tokens: int, preset, skipped: list[dict], final: bool = False) -> None:
    """The outputs from the models measured so far (rewritten after each), the recovered ones in budget order; the
    table is printed at the end."""
    from rora.evaluation.stats import WITHOUT_PRIOR, accuracy_table, gap_closed, paired_difference

    rows = rows[:3] + sorted(rows[3:], key=lambda r: r["budget"])
    base, pruned = rows[0], rows[1]
    acc = {r["name"]: accuracy_table(r["outcomes"]) for r in rows}
    table = ["| model | training tokens | avg acc (%) | vs base (paired) | vs pruned (paired) | w/o BoolQ vs pruned | "
             "acc gap closed | prose ppl | prose KL | prose gap closed | seconds |", "|---" * 11 + "|"]
    for r in rows:
        a = acc[r["name"]]["average"]
        vs_base = paired_difference(base["outcomes"], r["outcomes"]) if r is not base else None
        vs_pruned = paired_difference(pruned["outcomes"], r["outcomes"]) if r not in (base, pruned) else None
        closed = gap_closed(acc["base"]["average"]["accuracy"], acc["pruned"]["average"]["accuracy"], a["accuracy"])
        prose_closed = gap_closed(base["prose"]["loss"], pruned["prose"]["loss"], r["prose"]["loss"])
        r["vs_base"], r["vs_pruned"], r["acc_gap_closed"], r["prose_gap_closed"] = vs_base, vs_pruned, closed, \
            prose_closed
        tokens = f"{r['train_tokens']:,}" if "train_tokens" in r else "-"
        table.append(f"| {r['name']} | {tokens} | {100 * a['accuracy']:.1f} ± {100 * a['se']:.1f} "
                     f"| {paired_cell(vs_base, 'average')} | {paired_cell(vs_pruned, 'average')} | "
                     f"{paired_cell(vs_pruned, WITHOUT_PRIOR)} | {percent(closed)} | {r['prose']['perplexity']:.1f} | "
                     f"{r['prose']['kl']:.3f} | {percent(prose_closed)} | {r.get('seconds', 0):.0f} |")
    n = sum(len(v) for v in base["outcomes"].values())
    sample = preset.eval.sample
    head = (f"{n:,} examples per model ({'the full test sets' if sample is None else f'{sample} per task'}),"
            f" the same for every model; prose: {base['prose']['tokens']:,} tokens of {base['prose']['source']}. "
            "Differences without * are inside two standard errors (noise).")
    if not final:
        head += " Incomplete: written before the run's end."
    if skipped:
        head += " Not trained, for lack of device time: " + ", ".join(
            f"{s['budget']:,} tokens (~{s['needs_seconds']} s)" for s in skipped) + "."
    args.out.mkdir(parents=True, exist_ok=True)
    plot(rows, args.out / "gpu_recovery.png")
    rc = preset.recover
    setting = (f"{args.model}: the quickstart preset's prune and reconstruct sections (calibration "
               f"{preset.reconstruct.calibration}), then its recover section on every training record and "
               f"{rc.text}, {rc.text_ratio:.0%} text by tokens ({epoch_tokens:,} tokens an epoch), batch "
               f"{rc.batch_size}, lr {rc.lr}, max_steps from each budget, warmup 1/30 of the steps; accuracy: "
               "lm-eval protocol (native engine), paired")
    write_outputs("gpu_recovery", title="A recovery at ~1000x the demo's budget (one GPU)",
                  command="python benchmarks/bench_gpu_recovery.py " + " ".join(sys.argv[1:]), setting=setting,
                  table=head + "\n\n" + "\n".join(table), out=args.out, images=["gpu_recovery.png"],
                  data={"rows": rows, "skipped": skipped, "complete": final, "epoch_tokens": epoch_tokens,
                        "preset": preset.to_dict(), "environment": environment()})
    if final:
        print("\n".join(table))


def plot(rows: list[dict], path: Path) -> None:
    """Accuracy (± se) and prose perplexity against training tokens, the base, pruned and reconstructed models as
    lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rora.evaluation.stats import accuracy_table

    curve = [r for r in rows if "budget" in r]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for r, style in zip(rows[:3], ("k--", "r:", "b-.")):
        a = accuracy_table(r["outcomes"])["average"]["accuracy"]
        left.axhline(100 * a, color=style[0], linestyle=style[1:], label=r["name"])
        right.axhline(r["prose"]["perplexity"], color=style[0], linestyle=style[1:], label=r["name"])
    xs = [r["train_tokens"] for r in curve]
    accs = [accuracy_table(r["outcomes"])["average"] for r in curve]
    left.errorbar(xs, [100 * a["accuracy"] for a in accs], yerr=[100 * a["se"] for a in accs], fmt="o-",
                  color="g", label="recovered")
    right.plot(xs, [r["prose"]["perplexity"] for r in curve], "o-", color="g", label="recovered")
    for ax, label in ((left, "8-task average accuracy (%)"), (right, "held-out prose perplexity")):
        ax.set_xscale("log")
        ax.set_xlabel("training tokens")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    right.set_yscale("log")
    save_figure(fig, path)


if __name__ == "__main__":
    main()
