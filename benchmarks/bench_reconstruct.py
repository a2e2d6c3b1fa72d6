"""Reconstruction against the unpruned model (issue #20): how much does it recover alone, and how much do adapters
still add, at pruning ratios 0.2, 0.3 and 0.5?

For each ratio, smollm2-135m is pruned once (uniform Taylor, as the quickstart), then each variant starts from that
same pruned model:
    none                      no reconstruction
    <method>-<calibration>    reconstruction with method bias or lstsq, calibrated on the training records or on
                              teacher-written general text (the same token count either way)
and each of those is measured as it is and after kd recovery (the same recipe and token budget for every variant).
Every model is measured on the same examples: accuracy on the eight tasks (lm-eval protocol, native engine, a seeded
sample per task; paired differences against the pruned model), prose loss, perplexity and KL to the unpruned model
on held-out Wikipedia paragraphs (BoolQ validation passages: measured only), and the two validation figures the
choices are made on (never a test set): KL on held-out teacher-written text and on held-out training records.

Each finished model is appended to <work>/runs.jsonl, so an interrupted benchmark continues where it stopped.

    python benchmarks/bench_reconstruct.py                         # ~4 h on 2 quiet CPU cores
    python benchmarks/bench_reconstruct.py --ratios 0.3 --sample 40 --work runs/recon-quick   # a quick look
    python benchmarks/bench_reconstruct.py --ratios 0.3 --methods lstsq --sample 200 --precision bfloat16 \
        --token-sweep '' --work runs/recon-200 --name reconstruct_200   # 200 per task at 0.3 (~40 min)
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

VALIDATION_TEXT_SEED = 1000  # teacher-written validation text: another seed than any calibration text


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data", default=os.environ.get("RORA_DATA_DIR"), help="training records (default: RORA_DATA_DIR)")
    p.add_argument("--ratios", default="0.2,0.3,0.5")
    p.add_argument("--methods", default="bias,lstsq")
    p.add_argument("--calibrations", default="records,teacher")
    p.add_argument("--kd", default="quickstart", help="the kd recovery recipe: a preset whose recover section is used, "
                                                     "or 'none' to measure reconstruction alone")
    p.add_argument("--kd-set", action="append", default=[], metavar="KEY=VALUE",
                   help="a recover setting changed from the preset's (YAML values, as rora run --set recover.KEY)")
    p.add_argument("--sample", type=int, default=200, help="evaluation examples per task (seeded random sample)")
    p.add_argument("--precision", default="auto", help="the scoring's matmul precision (rora eval --precision)")
    p.add_argument("--prose-documents", type=int, default=64)
    p.add_argument("--token-sweep", default="8,16,32,64,128",
                   help="calibration sizes (sequences of 128 tokens) for the how-many-tokens sweep at ratio 0.3 "
                        "(lstsq, teacher-written text; prose and validation figures only); '' to skip")
    p.add_argument("--work", default="runs/bench-reconstruct", help="scratch directory (runs.jsonl, recoveries)")
    p.add_argument("--name", default="reconstruct", help="results/<name>.{md,json,png}")
    return p.parse_args(argv)


class Measure:
    """Everything every model is measured on, loaded once."""

    def __init__(self, args, teacher, tok):
        from rora.config import ReconstructConfig, RecoverConfig, load_preset, parse_setting
        from rora.measure import Prose
        from rora.reconstruction.calibration import calibration_sequences
        from rora.recovery.data import load_records, split_train_val
        from rora.recovery.distill import record_examples

        self.args, self.teacher, self.tok = args, teacher, tok
        recipe = load_preset(args.kd).recover if args.kd != "none" else RecoverConfig()
        self.recover = recipe.replace(**dict(map(parse_setting, args.kd_set)))
        rc = self.recover
        # the records calibration reads every training record (the recipe's own cap, 168 in the quickstart, would
        # not fill 80 sequences); their seeded order is the recipe's, so a cap only cuts it short
        self.train, val = split_train_val(load_records(args.data), rc.val_set_size, rc.seed, None)
        self.val_records = record_examples(val, tok, rc.cutoff_len)
        ids, _ = calibration_sequences(ReconstructConfig(num_samples=32, holdout_samples=1, seed=VALIDATION_TEXT_SEED),
                                       tok, teacher=teacher)
        self.val_text = ids[:32].tolist()
        self.prose = Prose.load("auto", args.prose_documents, args.data)

    def __call__(self, model) -> dict:
        from rora.config import EvalConfig
        from rora.evaluation.evaluate import evaluate
        from rora.evaluation.stats import outcomes_from_records
        from rora.measure import heldout_metrics

        start = time.perf_counter()
        res = evaluate(model, self.tok, EvalConfig(protocol="lm-eval", sample=self.args.sample, seed=0, prose="none",
                                                        generation=False, precision=self.args.precision),
                       data_dir=self.args.data, progress=False)
        return {"outcomes": outcomes_from_records(res.records),
                "prose": self.prose.measure(model, self.teacher, self.tok),
                "val_text": heldout_metrics(model, self.teacher, self.tok, self.val_text),
                "val_records": heldout_metrics(model, self.teacher, self.tok, self.val_records),
                "measure_seconds": time.perf_counter() - start}


def main(argv=None) -> None:
    from rora.config import PruneConfig, ReconstructConfig
    from rora.models import load_model
    from rora.pruning.prune import prune
    from rora.reconstruction.calibration import calibration_sequences
    from rora.reconstruction.reconstruct import reconstruct
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
        print(f"{row['name']}: {summary_line(row)}", flush=True)

    base, tok = load_model(args.model)
    teacher = copy.deepcopy(base).eval()
    measure = Measure(args, teacher, tok)
    if "base" not in done:
        keep({"name": "base", **measure(base)})
    variants = ["none"] + [f"{m}-{c}" for m in args.methods.split(",") for c in args.calibrations.split(",")]
    for ratio in map(float, args.ratios.split(",")):
        pruned = copy.deepcopy(base)
        report = prune(pruned, tok, PruneConfig(ratio=ratio, importance="taylor", num_samples=8))
        state = {k: v.clone() for k, v in pruned.state_dict().items()}
        for variant in variants:
            name = f"{ratio:g}/{variant}"
            if name in done and (args.kd == "none" or f"{name}+kd" in done):
                continue
            model = copy.deepcopy(pruned)
            model.load_state_dict(state)
            row = {"name": name, "ratio": ratio, "variant": variant, "parameters": report.params_after}
            if variant != "none":
                method, calibration = variant.split("-")
                cfg = ReconstructConfig(method=method, calibration=calibration)
                ids, what = calibration_sequences(cfg, tok, teacher=teacher, records=measure.train)
                rec = reconstruct(model, teacher, tok, cfg, sequences=ids, source=what, progress=False)
                row.update(reconstruct_seconds=rec.seconds, error_removed=rec.error_removed,
                           rules=[p["rule"] for p in rec.projections], calibration_tokens=rec.calibration["fit_tokens"])
            if name not in done:
                keep({**row, **measure(model)})
            if args.kd != "none":
                start = time.perf_counter()
                res = recover(model, tok, args.data, measure.recover, work / "recovery" / name.replace("/", "-"),
                              overwrite=True, progress=False, teacher=teacher)
                keep({**row, "name": f"{name}+kd", "train_seconds": time.perf_counter() - start,
                      "train_tokens": res.train_tokens, **measure(res.model)})
    sweep = token_sweep(args, base, teacher, tok, measure, work) if args.token_sweep else []
    report_results(args, done, sweep)


def token_sweep(args, base, teacher, tok, measure, work: Path) -> list[dict]:
    """How many calibration tokens are enough, and what reconstruction costs against plain forward passes: lstsq on
    teacher-written text at ratio 0.3, for each size, timed beside one forward pass of each model over the same
    calibration tokens."""
    import torch

    from rora.config import PruneConfig, ReconstructConfig
    from rora.measure import heldout_metrics
    from rora.pruning.prune import prune
    from rora.reconstruction.calibration import calibration_sequences
    from rora.reconstruction.reconstruct import reconstruct

    path = work / "token_sweep.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    pruned = copy.deepcopy(base)
    prune(pruned, tok, PruneConfig(ratio=0.3, importance="taylor", num_samples=8))
    for n in map(int, args.token_sweep.split(",")):
        if any(r["sequences"] == n for r in rows):
            continue
        cfg = ReconstructConfig(num_samples=n, holdout_samples=max(2, n // 4))
        ids, what = calibration_sequences(cfg, tok, teacher=teacher)
        forward = {}
        for label, m in (("teacher", teacher), ("pruned", pruned)):
            start = time.perf_counter()
            with torch.no_grad():
                for s in range(0, ids.shape[0], cfg.batch_size):
                    m.get_decoder()(input_ids=ids[s : s + cfg.batch_size], use_cache=False)
            forward[label] = time.perf_counter() - start
        model = copy.deepcopy(pruned)
        rec = reconstruct(model, teacher, tok, cfg, sequences=ids, source=what, progress=False)
        row = {"sequences": n, "tokens": rec.calibration["fit_tokens"], "reconstruct_seconds": rec.seconds,
               "forward_seconds": forward, "kl_removed_on_held_calibration": rec.heldout_after["kl"],
               "prose": measure.prose.measure(model, teacher, tok),
               "val_text": heldout_metrics(model, teacher, tok, measure.val_text)}
        rows.append(row)
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"token sweep {n}: prose ppl {row['prose']['perplexity']:.1f}, {rec.seconds:.0f} s vs forwards "
              f"{sum(forward.values()):.0f} s", flush=True)
    return rows


def summary_line(row: dict) -> str:
    from rora.evaluation.stats import accuracy_table

    acc = accuracy_table(row["outcomes"])
    return (f"avg {100 * acc['average']['accuracy']:.1f} ± {100 * acc['average']['se']:.1f}, prose ppl "
            f"{row['prose']['perplexity']:.1f} (KL {row['prose']['kl']:.3f}), val KL text {row['val_text']['kl']:.3f} "
            f"records {row['val_records']['kl']:.3f}")


def report_results(args, done: dict, sweep: list[dict]) -> None:
    from rora.evaluation.stats import WITHOUT_PRIOR, accuracy_table, gap_closed, paired_difference

    base = done["base"]
    acc_base = accuracy_table(base["outcomes"])
    rows, table = {}, [
        "| ratio | model | avg acc (%) | vs pruned (paired) | w/o BoolQ vs pruned | acc gap closed | prose ppl | "
        "prose KL | prose gap closed | val KL (text) | val KL (records) | seconds |", "|---" * 12 + "|"]
    for name, row in done.items():
        if name == "base":
            continue
        ratio = name.split("/")[0]
        pruned = done[f"{ratio}/none"]
        acc = accuracy_table(row["outcomes"])
        diff = paired_difference(pruned["outcomes"], row["outcomes"]) if row is not pruned else None
        closed = gap_closed(acc_base["average"]["accuracy"], accuracy_table(pruned["outcomes"])["average"]["accuracy"],
                            acc["average"]["accuracy"])
        prose_closed = gap_closed(base["prose"]["loss"], pruned["prose"]["loss"], row["prose"]["loss"])
        rows[name] = {"accuracy": acc, "vs_pruned": diff, "acc_gap_closed": closed, "prose_gap_closed": prose_closed}
        seconds = row.get("reconstruct_seconds", 0) + row.get("train_seconds", 0)
        table.append(
            f"| {ratio} | {name.split('/')[1]} | {100 * acc['average']['accuracy']:.1f} ± "
            f"{100 * acc['average']['se']:.1f} | {paired_cell(diff, 'average')} | "
            f"{paired_cell(diff, WITHOUT_PRIOR)} | {percent(closed)} | {row['prose']['perplexity']:.1f} | "
            f"{row['prose']['kl']:.3f} | {percent(prose_closed)} | "
            f"{row['val_text']['kl']:.3f} | {row['val_records']['kl']:.3f} | {seconds:.0f} |")
    head = (f"Base model: average {100 * acc_base['average']['accuracy']:.1f} ± {100 * acc_base['average']['se']:.1f}, "
            f"prose perplexity {base['prose']['perplexity']:.1f} ({base['prose']['tokens']:,} tokens of "
            f"{base['prose']['source']}).")
    if sweep:
        table += ["", "How many calibration tokens (ratio 0.3, lstsq, teacher-written text; time against one forward "
                  "pass of the teacher and of the pruned model over the same tokens):", "",
                  "| calibration tokens | prose ppl | prose KL | val KL (text) | reconstruct s | forwards s | ratio |",
                  "|---|---|---|---|---|---|---|"]
        for r in sorted(sweep, key=lambda r: r["tokens"]):
            fwd = sum(r["forward_seconds"].values())
            table.append(f"| {r['tokens']:,} | {r['prose']['perplexity']:.1f} | {r['prose']['kl']:.3f} | "
                         f"{r['val_text']['kl']:.3f} | {r['reconstruct_seconds']:.0f} | {fwd:.0f} | "
                         f"{r['reconstruct_seconds'] / fwd:.2f}x |")
    plot(done, RESULTS / f"{args.name}.png")
    setting = (f"{args.model} pruned uniformly by Taylor importance at each ratio; reconstruction on 64 x 128 "
               f"calibration tokens (+16 x 128 held out for the damping); kd recovery: the {args.kd} preset's recover "
               f"section for every variant{_changes(args.kd_set)}; accuracy: lm-eval protocol (native engine), a "
               f"seeded {args.sample} per task{'' if args.precision == 'auto' else f' ({args.precision} scoring)'}, "
               "paired against the pruned model of the same ratio; prose: held-out BoolQ validation passages "
               "(measured only); val KL: held-out teacher-written text and training records (the selection figures)")
    write_outputs(args.name, title="Reconstruction: closed-form refits against the unpruned model, then adapters "
                                   f"({args.sample} per task)",
                  command="python benchmarks/bench_reconstruct.py " + " ".join(sys.argv[1:]), setting=setting,
                  table=head + "\n\n" + "\n".join(table), data={"rows": rows, "runs": done, "token_sweep": sweep,
                                                                "environment": environment()},
                  images=[f"{args.name}.png"])
    print("\n".join(table))


def _changes(settings: list[str]) -> str:
    return f" (changed: {', '.join(settings)})" if settings else ""


def plot(done: dict, path: Path) -> None:
    """Per ratio: average accuracy (± se) and prose perplexity of each variant, before and after kd."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rora.evaluation.stats import accuracy_table

    ratios = sorted({n.split("/")[0] for n in done if n != "base"}, key=float)
    fig, axes = plt.subplots(2, len(ratios), figsize=(4.2 * len(ratios), 7), squeeze=False)
    base_acc = 100 * accuracy_table(done["base"]["outcomes"])["average"]["accuracy"]
    for col, ratio in enumerate(ratios):
        names = [n for n in done if n.startswith(f"{ratio}/") and not n.endswith("+kd")]
        labels = [n.split("/")[1] for n in names]
        for row, (key, ylabel) in enumerate((("acc", "average accuracy (%), ± 1 se"), ("ppl", "prose perplexity"))):
            ax = axes[row][col]
            for k, (suffix, label) in enumerate((("", "no training"), ("+kd", "+ kd recovery"))):
                xs, ys, es = [], [], []
                for i, n in enumerate(names):
                    r = done.get(n + suffix)
                    if r is None:
                        continue
                    a = accuracy_table(r["outcomes"])["average"]
                    xs.append(i + (k - 0.5) * 0.35)
                    ys.append(100 * a["accuracy"] if key == "acc" else r["prose"]["perplexity"])
                    es.append(100 * a["se"] if key == "acc" else 0)
                if not xs:  # e.g. no kd column (--kd none)
                    continue
                ax.bar(xs, ys, 0.35, yerr=es if key == "acc" else None, capsize=2, label=label)
            ax.axhline(base_acc if key == "acc" else done["base"]["prose"]["perplexity"], color="k", ls="--", lw=1,
                       label="unpruned")
            ax.set_xticks(range(len(labels)), labels, rotation=25, ha="right", fontsize=8)
            ax.set_ylabel(ylabel)
            if key == "ppl":
                ax.set_yscale("log")
            ax.set_title(f"ratio {ratio}", fontsize=10)
            if col == 0:
                ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
