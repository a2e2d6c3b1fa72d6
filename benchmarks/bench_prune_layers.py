"""Which units to prune (the quickstart's prune section), on validation figures only: SmolLM2-135M pruned over a
layer range at the ratio that removes about the same share of the decoder's weights as a uniform 30% prune, with the
preset's importance (obs-mlp; Taylor before commit 288fa2e) or another (--set importance=obs ...), then
reconstructed as the quickstart reconstructs (lstsq on prose, here 32 + 16 sequences of 128 tokens from the first
three corpus shards). Each model gets the KL per token to the unpruned model (and the perplexity) on 48 paragraphs of
the prose corpus the demo never reads (the end of its last shard), before and after reconstruction. One line per
setting on stdout; each finished setting is appended to <work>/runs.jsonl.

    make prose
    python benchmarks/bench_prune_layers.py        # ~4 min per setting on 2 cores
    O="--set importance=obs --set calibration=runs/prose/train-00002.parquet"
    python benchmarks/bench_prune_layers.py --settings uniform@0.3,1:29@0.33,2:28@0.37,3:27@0.4 $O --set num_samples=64
    python benchmarks/bench_prune_layers.py --settings 3:27@0.4 $O --set num_samples=256
    python benchmarks/bench_prune_layers.py --report "uniform@0.3,...": one table of any rows of <work>
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
from _common import (RESULTS, VALIDATION_TASKS, Runs, bar_pairs, offline_data_dir, paired_cell,  # noqa: E402
                     publish, validation_prose, validation_tasks)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data", default=os.environ.get("RORA_DATA_DIR"), help="task data, for --accuracy (default: "
                                                                             "RORA_DATA_DIR)")
    p.add_argument("--prose", default="runs/prose", help="the directory tools/prose_corpus.py wrote")
    p.add_argument("--settings", default="uniform@0.3,1:29@0.33,3:27@0.4,4:28@0.4",
                   help="comma-separated LAYERS@RATIO prunes")
    p.add_argument("--samples", type=int, default=32, help="calibration sequences of 128 tokens fitted on")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a prune setting changed from the quickstart preset's for every prune (YAML values, as rora "
                        "run --set); each row's name says which")
    p.add_argument("--accuracy", type=int, default=0, metavar="N",
                   help="also score the unpruned, pruned and reconstructed models on N validation questions per task "
                        "carved from the ARC-e, ARC-c and OBQA training data (lm-eval protocol, as the demo scores); "
                        "rows without it are redone. 0: off")
    p.add_argument("--report", metavar="NAME,NAME,..",
                   help="instead of a run: publish results/prune_layers.{md,json,png} from these rows of <work>")
    p.add_argument("--out", type=Path, default=RESULTS, help="where the report goes (prune_layers.{md,json,png})")
    p.add_argument("--work", default="runs/prune-layers")
    return p.parse_args(argv)


def decoder_weights(model) -> int:
    """Parameters of the model without its input embedding (tied to the output head in SmolLM2)."""
    return sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()


def main(argv=None) -> None:
    from rora.config import load_preset, parse_setting
    from rora.measure import heldout_metrics
    from rora.models import load_model
    from rora.pruning.prune import prune
    from rora.reconstruction.calibration import calibration_sequences
    from rora.reconstruction.reconstruct import reconstruct

    args = parse_args(argv)
    runs = Runs(args.work)
    if args.report:
        names = args.report.split(",")
        missing = [n for n in names if n not in runs.done]
        if missing:
            raise SystemExit(f"{runs.path} has no row named {', '.join(missing)}")
        return report(args, runs.done, names)
    val_prose = validation_prose(args.prose)
    preset = load_preset("quickstart")
    base, tok = load_model(args.model)
    teacher = copy.deepcopy(base).eval()
    rc = preset.reconstruct.replace(calibration=os.path.join(args.prose, "train-0000[0-2].parquet"),
                                    num_samples=args.samples, holdout_samples=16)
    ids, what = calibration_sequences(rc, tok)
    changes = dict(map(parse_setting, args.set))
    suffix = "".join(f" {k}={v}" for k, v in changes.items())
    settings = [s.split("@") for s in args.settings.split(",")]
    score = validation_scorer(args, preset, tok) if args.accuracy else lambda model: None
    if args.accuracy and scored_with(runs.done.get(BASE_ROW), "base") != args.accuracy:
        runs.keep({"name": BASE_ROW, "accuracy": {"base": score(base)}})
    for layers, ratio in settings:
        name = f"{layers}@{ratio}{suffix}"
        if name in runs.done and args.accuracy in (0, scored_with(runs.done[name], "reconstructed")):
            continue
        model = copy.deepcopy(base)
        pc = preset.prune.replace(layers=layers, ratio=float(ratio), **changes)
        prune(model, tok, pc)
        pruned = heldout_metrics(model, teacher, tok, val_prose, cutoff_len=256)
        pruned_accuracy = score(model)
        start = time.perf_counter()
        reconstruct(model, teacher, tok, rc, sequences=ids, source=what, progress=False)
        seconds = time.perf_counter() - start
        after = heldout_metrics(model, teacher, tok, val_prose, cutoff_len=256)
        accuracy = {"pruned": pruned_accuracy, "reconstructed": score(model)} if args.accuracy else None
        runs.keep({"name": name, "layers": layers, "ratio": float(ratio), "accuracy": accuracy,
                   "prune": {k: getattr(pc, k) for k in PRUNE_KEYS},
                   "calibration": what, "weights": decoder_weights(model),
                   "weights_base": decoder_weights(base), "pruned": pruned, "reconstructed": after,
                   "reconstruct_seconds": seconds},
                  f"KL pruned {pruned['kl']:.3f} -> reconstructed {after['kl']:.3f}")
    report(args, runs.done, [f"{layers}@{ratio}{suffix}" for layers, ratio in settings])


def accuracy_columns(table: list[str], rows: list[dict], first: dict, base: dict | None) -> list[str]:
    """The table with validation accuracy (pruned, reconstructed, reconstructed minus `first`'s, paired) added to
    each row ('-' for rows scored without it), and the unpruned model's as a note line."""
    from rora.evaluation.stats import accuracy_table, paired_difference

    def cell(outcomes: dict) -> str:
        avg = accuracy_table(outcomes)["average"]
        return f"{100 * avg['accuracy']:.1f} ± {100 * avg['se']:.1f}"

    out = [table[0] + " val. accuracy pruned | val. accuracy reconstructed | reconstructed - first |",
           table[1] + "---|---|---|"]
    for line, r in zip(table[2:], rows):
        acc = r.get("accuracy")
        if not acc:
            out.append(line + " - | - | - |")
            continue
        diff = "" if r is first else paired_cell(
            paired_difference(first["accuracy"]["reconstructed"], acc["reconstructed"]), "average")
        out.append(line + f" {cell(acc['pruned'])} | {cell(acc['reconstructed'])} | {diff} |")
    if base:
        out.append(f"\nThe unpruned model's validation accuracy: {cell(base['accuracy']['base'])}.")
    return out


BASE_ROW = "unpruned"  # the row holding the unpruned model's validation accuracy
PRUNE_KEYS = ("importance", "num_samples", "calibration", "mlp_ratio", "attention")  # what a row records of its prune


def scored_with(row: dict | None, model: str) -> int:
    """How many validation questions per task `row` scored `model` on (0: none, or no such row)."""
    outcomes = ((row or {}).get("accuracy") or {}).get(model)
    return len(next(iter(outcomes.values()))) if outcomes else 0


def validation_scorer(args, preset, tok):
    """model -> {task: [0/1 per question]} on --accuracy validation questions per task (validation_tasks), scored
    as the demo scores (the preset's eval section: lm-eval protocol, bfloat16)."""
    from rora.evaluation.evaluate import evaluate
    from rora.evaluation.stats import outcomes_from_records

    data = validation_tasks(offline_data_dir(args.data), Path(args.work) / "validation-tasks", args.accuracy)
    config = dataclasses.replace(preset.eval, tasks=list(VALIDATION_TASKS), sample=None, prose="none", generation=False)
    return lambda model: outcomes_from_records(evaluate(model, tok, config, data_dir=data, progress=False).records)


def prune_settings(row: dict) -> dict:
    """The importance, num_samples and calibration the row was pruned with (older rows record only their changes to
    the preset's of the time: Taylor on its 8 built-in paragraphs)."""
    return row.get("prune") or {"importance": "taylor", "num_samples": 8, "calibration": "builtin",
                                **row.get("changes", {})}


def importance(row: dict) -> str:
    prune = prune_settings(row)
    source = "built-in paragraphs" if prune["calibration"] == "builtin" else "prose sequences of 128 tokens"
    return f"{prune['importance']}, {prune['num_samples']} {source}"


def ratios(row: dict, short: bool = False) -> str:
    """The row's ratio, and its MLP channels' where they differ ("0.67, MLP 0.3164"); "MLP 0.4831, heads kept" for a
    prune of the MLP alone. `short`: two decimals, for a bar's label ("0.67/MLP 0.32")."""
    prune, fmt = prune_settings(row), (lambda x: f"{x:.2g}") if short else str
    if prune.get("attention") is False:
        return f"MLP {fmt(row['ratio'])}" + ("" if short else ", heads kept")
    mlp = prune.get("mlp_ratio")
    return fmt(row["ratio"]) + ("" if mlp is None else ("/" if short else ", ") + f"MLP {fmt(mlp)}")


def _short(row: dict) -> str:
    """A bar's label: the range, the scorer and its text, one per line."""
    prune = prune_settings(row)
    text = "built-in" if prune["calibration"] == "builtin" else "prose"
    return f"{row['layers']}\n{ratios(row, short=True)}\n{prune['importance']}\n{prune['num_samples']} {text}"


def report(args, done: dict, names: list[str]) -> None:
    rows = [done[n] for n in names if n in done]
    table = ["| layers | ratio | importance | parameters removed | KL pruned | KL reconstructed | perplexity reconstructed |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        removed = r["weights_base"] - r["weights"]
        table.append(f"| {r['layers']} | {ratios(r)} | {importance(r)} "
                     f"| {removed / 1e6:.2f}M ({100 * removed / r['weights_base']:.1f}%) "
                     f"| {r['pruned']['kl']:.3f} | {r['reconstructed']['kl']:.3f} | "
                     f"{r['reconstructed']['perplexity']:.1f} |")
    scored = [r for r in rows if r.get("accuracy")]
    if scored:
        table = accuracy_columns(table, rows, scored[0], done.get(BASE_ROW))
    tokens = rows[0]["reconstructed"]["tokens"] if rows else 0
    args.out.mkdir(parents=True, exist_ok=True)
    bar_pairs(args.out / "prune_layers.png", [_short(r) for r in rows],
              tuple((key, [r[key]["kl"] for r in rows]) for key in ("pruned", "reconstructed")),
              "KL to the unpruned model (nats/token)")
    calibration = rows[-1].get("calibration", "runs/prose/train-0000[0-2].parquet") if rows else ""
    texts = sorted({prune_settings(r)["calibration"] for r in rows} - {"builtin"})
    setting = (f"{args.model}, the quickstart's prune section with each row's layer range, ratio and importance"
               + (f" (the prose sequences: of {', '.join(texts)})" if texts else "") + "; reconstruction "
               f"lstsq on {args.samples} + 16 sequences of 128 tokens of {calibration}; KL per token to the unpruned "
               f"model on 48 held-out corpus paragraphs ({tokens:,} tokens), validation text never read by the demo; "
               "parameters removed: of the decoder's (the embedding aside), net of the zero-initialised output biases "
               "reconstruction adds (~0.13M)")
    if scored:
        n = len(next(iter(scored[0]["accuracy"]["reconstructed"].values())))
        setting += (f"; validation accuracy: lm-eval protocol (bfloat16) on the last {n} training questions of each of "
                    f"{', '.join(VALIDATION_TASKS)} (never a test set), average ± se, the last column paired against "
                    f"the first scored row ({scored[0]['name']})")
    publish("prune_layers", title="Which units to prune: layer ranges and importance scores at the same size",
            setting=setting, table="\n".join(table), data={"rows": rows}, out=args.out)


if __name__ == "__main__":
    main()
