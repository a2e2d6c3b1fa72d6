"""`--lr auto` against the preset's hand-picked learning rate and the best of a full grid (issue #21): how close
does the probe get, and what does it cost?

The quickstart's pruned model (30% uniform Taylor, reconstructed against the unpruned model as `rora run` does) is
recovered by kd (the quickstart preset's recover section, scaled down by --steps/--batch/--cutoff so that a setting
fits in minutes) for each method (--methods) and rank (--ranks; alpha = 2r):
    auto      --lr auto: its grid around the rule of thumb (rora.recovery.lr_auto), probes of a few steps, the run
              continued from the winner
    lr=X      a full run at every value auto probed, then one more value (a factor 2.5 out) on whichever side the
              best full run lies until the best is bracketed (a value on each side of it), and the preset's own
              learning rate: the best of this grid is the best a user could have found by hand
A row named <method>-r<rank>/auto-lowest in runs.jsonl is a --lr auto run of the rule before the margin (the lowest
probe figure won; rora up to commit e837447), reported beside it. Each run is scored on the figure every choice
here is made on, the held-out KL to the unpruned model on the validation split carved from the training data (at
the end of the run), and beside it on held-out prose (BoolQ validation passages, measured only). The cost of auto
is the losing probes' steps and seconds against the run's.

Each finished run is appended to <work>/runs.jsonl, so an interrupted benchmark continues where it stopped.

    python benchmarks/bench_lr_auto.py                  # 4 settings x ~6 runs; ~1.5 h on 2 quiet CPU cores
    python benchmarks/bench_lr_auto.py --methods rora --ranks 8 --steps 4 --batch 4 --prose-documents 4 \\
        --work runs/lr-auto-tiny                        # a tiny check, ~10 min
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import RESULTS, Runs, publish, save_figure  # noqa: E402
from bench_text_budget import pruned_and_reconstructed  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data", default=os.environ.get("RORA_DATA_DIR"), help="training records (default: RORA_DATA_DIR)")
    p.add_argument("--ratio", type=float, default=0.3)
    p.add_argument("--methods", default="lora,rora")
    p.add_argument("--ranks", default="8,128")
    p.add_argument("--kd", default="quickstart", help="the preset whose recover section is the recipe")
    p.add_argument("--steps", type=int, default=16, help="optimizer steps per run")
    p.add_argument("--batch", type=int, default=8, help="sequences per optimizer step (one micro-batch)")
    p.add_argument("--cutoff", type=int, default=128, help="tokens per sequence (records and packed prose)")
    p.add_argument("--val", type=int, default=16, help="validation sequences (the figure every choice is made on)")
    p.add_argument("--brackets", type=int, default=2, help="at most this many values added beyond auto's probes")
    p.add_argument("--prose-documents", type=int, default=32)
    p.add_argument("--work", default="runs/lr-auto", help="scratch directory (runs.jsonl, recoveries)")
    p.add_argument("--report-only", action="store_true", help="write the report from the runs done so far")
    return p.parse_args(argv)


def settings(args) -> list[tuple[str, int]]:
    return [(m, int(r)) for m in args.methods.split(",") for r in args.ranks.split(",")]


def recipe(args):
    """The preset's recover section as kd, scaled to --steps, --batch, --cutoff and --val; validation at the end."""
    from rora.config import load_preset

    preset = load_preset(args.kd).recover
    return dataclasses.replace(
        preset, objective="kd", max_steps=args.steps, batch_size=args.batch, micro_batch_size=args.batch,
        cutoff_len=args.cutoff, val_set_size=args.val, eval_steps=args.steps, save_steps=args.steps,
        warmup_steps=min(preset.warmup_steps, 2), max_train_examples=None,
        max_text_tokens=(args.steps * args.batch + args.val) * args.cutoff)


def next_lr(grid: list[float], best: float) -> float | None:
    """The value to run next so that the best full run is bracketed: a factor FACTOR beyond the grid's edge on the
    side where the best lies, or None when a value on each side of it exists."""
    from rora.recovery.lr_auto import FACTOR, _round

    if best == min(grid):
        return _round(best / FACTOR)
    if best == max(grid):
        return _round(best * FACTOR)
    return None


def main(argv=None) -> None:
    from rora.config import AUTO, load_preset
    from rora.errors import TrainingError
    from rora.measure import Prose
    from rora.models import load_model
    from rora.recovery.trainer import recover

    args = parse_args(argv)
    runs = Runs(args.work)
    done = runs.done
    preset_lr = load_preset(args.kd).recover.lr
    if args.report_only:
        return report_results(args, done, preset_lr)

    base, tok = load_model(args.model)
    teacher = copy.deepcopy(base).eval()
    prose = Prose.load("auto", args.prose_documents, args.data)
    model = pruned_and_reconstructed(base, tok, teacher, args.ratio)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    cfg0 = recipe(args)

    def run(method: str, rank: int, lr) -> dict:
        name = f"{method}-r{rank}/{lr if lr == AUTO else f'lr={lr:g}'}"
        if name in done:
            return done[name]
        student = copy.deepcopy(model)
        student.load_state_dict(state)
        cfg = dataclasses.replace(cfg0, method=method, rank=rank, alpha=None, lr=lr)
        start = time.perf_counter()
        try:
            res = recover(student, tok, args.data, cfg, runs.work / "recovery" / name.replace("/", "-"),
                          overwrite=True, progress=False, teacher=teacher)
        except TrainingError as exc:  # a value too large: its loss became non-finite
            runs.keep({"name": name, "method": method, "rank": rank, "lr": lr, "val_kl": None,
                       "diverged": str(exc)}, "diverged")
            return done[name]
        row = {"name": name, "method": method, "rank": rank, "lr": res.lr, "auto": lr == AUTO,
               "val_kl": res.val_metrics.get("val_kl"), "best_step": res.best_step, "steps": res.steps,
               "seconds": time.perf_counter() - start, "train_seconds": res.train_tokens / res.tokens_per_second,
               "lr_auto": res.lr_auto, "prose": prose.measure(res.model, teacher, tok)}
        runs.keep(row, f"lr {res.lr:g}, val KL {row['val_kl']:.4f}, prose KL {row['prose']['kl']:.3f}, "
                       f"{row['seconds']:.0f} s")
        return row

    for method, rank in settings(args):
        auto = run(method, rank, AUTO)
        grid = sorted({p["lr"] for p in auto["lr_auto"]["probes"]})
        for _ in range(args.brackets + 1):  # the last pass only runs the value the one before added
            rows = [run(method, rank, lr) for lr in grid]
            best = min((r for r in rows if r["val_kl"] is not None), key=lambda r: r["val_kl"])["lr"]
            lr = next_lr(grid, best)
            if lr is None:
                break
            grid = sorted({*grid, lr})
        run(method, rank, preset_lr)
    report_results(args, done, preset_lr)


def report_results(args, done: dict, preset_lr: float) -> None:
    table = ["| method | rank | preset lr (val KL) | best of the grid (val KL) | auto: chosen lr (val KL) | auto / best | "
             "auto's probes | extra steps (% of the run) | extra s (% of the run) | prose KL: preset / best / auto | "
             "earlier rule: lr (val KL) |", "|---" * 11 + "|"]
    rows = {}
    for method, rank in settings(args):
        grid = [r for n, r in done.items() if n.startswith(f"{method}-r{rank}/lr=") and r["val_kl"] is not None]
        auto = done.get(f"{method}-r{rank}/auto")
        if not grid or auto is None:
            continue
        best = min(grid, key=lambda r: r["val_kl"])
        preset = next((r for r in grid if r["lr"] == preset_lr), None)
        a = auto["lr_auto"]
        probes = ", ".join(f"{p['lr']:g}" for p in sorted(a["probes"], key=lambda p: p["lr"])) + \
            (" (widened)" if a["widened"] else "")
        steps_share, seconds_share = a["extra_steps"] / auto["steps"], a["extra_seconds"] / auto["train_seconds"]
        rows[f"{method}-r{rank}"] = {"preset": preset, "best": best, "auto": auto, "ratio": auto["val_kl"] / best["val_kl"],
                                     "extra_steps_share": steps_share, "extra_seconds_share": seconds_share}
        table.append(
            f"| {method} | {rank} | {_lr_kl(preset)} | {_lr_kl(best)} | {_lr_kl(auto)} | "
            f"{auto['val_kl'] / best['val_kl']:.3f}x | {probes} | {a['extra_steps']} ({100 * steps_share:.0f}%) | "
            f"{a['extra_seconds']:.0f} ({100 * seconds_share:.0f}%) | "
            f"{_kl(preset)} / {best['prose']['kl']:.3f} / {auto['prose']['kl']:.3f} | "
            f"{_lr_kl(done.get(f'{method}-r{rank}/auto-lowest'))} |")
    plot(args, done, preset_lr, RESULTS / "lr_auto.png")
    setting = (f"{args.model} pruned uniformly by Taylor importance at ratio {args.ratio}, then reconstructed (lstsq, "
               f"teacher-written calibration text); kd recovery with the {args.kd} preset's recover section (half "
               f"task records, half Wikipedia prose; alpha = 2r) scaled to {args.steps} steps of {args.batch} "
               f"sequences of {args.cutoff} tokens; grid: every value auto probed, bracketed by up to {args.brackets} "
               f"more a factor 2.5 out, and the preset's {preset_lr:g}; val KL: held-out KL to the unpruned model on "
               f"the validation split ({args.val} sequences carved from the training data) at the end of the run "
               "(what every choice here is made on); prose KL: held-out BoolQ validation passages (measured only); "
               "auto's cost: the losing probes against the run's own steps and training seconds")
    publish("lr_auto", title="--lr auto against the hand-picked learning rate and the best of a full grid",
            setting=setting, table="\n".join(table), data={"rows": rows, "runs": done})


def _lr_kl(row) -> str:
    return "-" if row is None else f"{row['lr']:g} ({row['val_kl']:.4f})"


def _kl(row) -> str:
    return "-" if row is None else f"{row['prose']['kl']:.3f}"


def plot(args, done: dict, preset_lr: float, path: Path) -> None:
    """Held-out KL against the learning rate per method and rank, with auto's choice marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for method, rank in settings(args):
        grid = sorted((r for n, r in done.items() if n.startswith(f"{method}-r{rank}/lr=") and r["val_kl"] is not None),
                      key=lambda r: r["lr"])
        if not grid:
            continue
        line, = ax.plot([r["lr"] for r in grid], [r["val_kl"] for r in grid], "o-", label=f"{method} r{rank}")
        for name, marker in (("auto", "*"), ("auto-lowest", "x")):
            auto = done.get(f"{method}-r{rank}/{name}")
            if auto is not None:
                ax.plot([auto["lr"]], [auto["val_kl"]], marker, ms=14, color=line.get_color())
    ax.axvline(preset_lr, color="k", ls=":", lw=1, label=f"preset lr {preset_lr:g}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("learning rate (stars: --lr auto's choice and result; x: the earlier rule's)")
    ax.set_ylabel("held-out KL to the unpruned model")
    ax.legend(fontsize=8)
    save_figure(fig, path)


if __name__ == "__main__":
    main()
