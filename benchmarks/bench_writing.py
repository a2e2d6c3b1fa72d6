"""Can the recovered model still write? Recovery objectives and on-policy distillation against the quickstart recipe
(issue #24).

The quickstart's pruned and reconstructed model (its prune and reconstruct sections, as `rora run` builds it) is
recovered with the quickstart's recover section, once per variant (--variants):
    kd                 distillation alone on the records and prose (the quickstart's objective before kd+sft)
    on-policy N        + at every step the student writes N greedy continuations of training prompts and is
                       distilled on them (KL to the teacher on each written token)
    on-policy N nr K   + the teacher grades them without repeating a K-gram of the continuation
    kd+sft W           the recipe with the cross-entropy of the training tokens added (kd weight W): the records'
                       answers (each ended by EOS) and the prose
    ...-ul U           (suffix) token-level unlikelihood of the context's other tokens added, weight U
    ...-prose R        (suffix, last) R of the same training tokens prose instead of the preset's half
Each recovered model (and the base, pruned and reconstructed ones) gets validation figures only (never a test set):
    writing            repetition (% of repeated 4-grams, ± standard error over prompts) of greedy 48-token
                       continuations of the summary's held-out prompts (rora.evaluation.quality: 48 openings, the 32
                       validation records' prompts; by set), distinct-2, perplexity of the written text under the
                       unpruned model
    wide               repetition on --wide other openings (default 192), the first 10 words of the last corpus
                       paragraphs (never read by any recipe): what a recipe is chosen on, so that the summary's
                       openings stay a measurement; beside it each row's paired difference from the --reference row
                       on the same openings (± its standard error)
    KL                 to the unpruned model on the run's own validation split (records + prose) and on 48 paragraphs
                       of the prose corpus the recipe never reads (the end of its last shard)
and beside them the held-out prose test passages' perplexity (measured, never chosen on) and the seconds recovery took.

Each finished row is appended to <work>/runs.jsonl, so an interrupted benchmark continues where it stopped.

    make prose
    python benchmarks/bench_writing.py --variants kd+sft-0.6,kd+sft-0.6-ul0.3,kd+sft-0.6-ul1,kd+sft-0.6-ul3  # ~55 min
    python benchmarks/bench_writing.py --variants kd,on-policy-8-nr4 --max-steps 2 --work runs/writing-tiny
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
from _common import AT_END, RESULTS, Runs, publish, save_figure, validation_prose  # noqa: E402

VARIANTS = "kd+sft-0.6,kd+sft-0.6-ul0.3,kd+sft-0.6-ul1,kd+sft-0.6-ul3"
WIDE = 10  # words of each held-out corpus paragraph that make a wide opening
NEW_TOKENS = 48  # per greedy continuation, as in the demo's summary
PROMPTS = 48  # the summary's openings (all 48) and up to as many validation records' prompts (its 32)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=os.environ.get("RORA_DATA_DIR"), help="training records (default: RORA_DATA_DIR)")
    p.add_argument("--prose", default="runs/prose", help="the directory `make prose` wrote")
    p.add_argument("--variants", default=VARIANTS, help=f"comma-separated (default: {VARIANTS})")
    p.add_argument("--max-steps", type=int, default=None, help="cap each recovery's steps (a quick check)")
    p.add_argument("--wide", type=int, default=192,
                   help="validation openings: the first words of the corpus's last N paragraphs")
    p.add_argument("--reference", default="kd+sft-0.6", help="the row every other is compared with, paired, on the "
                                                              "wide openings")
    p.add_argument("--seed", type=int, default=None, help="the recovery's seed (validation split, order, prompts; "
                                                          "default: the preset's)")
    p.add_argument("--work", default="runs/writing", help="scratch directory (runs.jsonl, recoveries)")
    p.add_argument("--out", type=Path, default=RESULTS, help="where the report goes (writing.{md,json,png}): another "
                                                             "directory keeps a run on another prune from replacing "
                                                             "the published section")
    p.add_argument("--report-only", action="store_true", help="write the report from the rows done so far")
    return p.parse_args(argv)


def variant_config(rc, name: str):
    """The quickstart's recover section changed as the variant's name says (from plain kd, whatever the preset's
    objective); a "-proseR" suffix makes R of the preset's training tokens prose (text_ratio R, the prose budget
    scaled to match; the preset's is half); an "-ulU" suffix before it adds token-level unlikelihood, weight U."""
    name, _, prose = name.partition("-prose")
    name, _, unlikelihood = name.partition("-ul")
    kd = dataclasses.replace(rc, objective="kd", on_policy=0, on_policy_no_repeat=0,
                             unlikelihood=float(unlikelihood or 0.0), eval_steps=AT_END)  # the val KL column
    if prose:
        held_out = rc.val_set_size * rc.cutoff_len  # the validation sequences the text budget also pays for
        kd = dataclasses.replace(kd, text_ratio=float(prose),
                                 max_text_tokens=round(held_out + (rc.max_text_tokens - held_out) * 2 * float(prose)))
    if name == "kd":
        return kd
    if name.startswith("kd+sft-"):
        return dataclasses.replace(kd, objective="kd+sft", kd_weight=float(name.split("-")[-1]))
    parts = name.split("-")  # on-policy-N[-nrK]
    no_repeat = int(parts[3][2:]) if len(parts) > 3 else 0
    return dataclasses.replace(kd, on_policy=int(parts[2]), on_policy_no_repeat=no_repeat)


def main(argv=None) -> None:
    from rora.config import load_preset
    from rora.evaluation.quality import generation_quality, repetition
    from rora.evaluation.text import generate_text
    from rora.measure import Prose, heldout_metrics
    from rora.models import load_model
    from rora.pruning.prune import prune
    from rora.reconstruction.calibration import calibration_sequences
    from rora.reconstruction.reconstruct import reconstruct
    from rora.recovery.data import load_records, split_train_val
    from rora.recovery.trainer import recover

    args = parse_args(argv)
    runs = Runs(args.work)
    preset = load_preset("quickstart")
    if args.report_only:
        return report(args, runs.done)
    val_prose = validation_prose(args.prose)
    text = os.path.join(args.prose, "*.parquet")
    rc = dataclasses.replace(preset.recover, text=text)
    if args.max_steps:
        rc = dataclasses.replace(rc, max_steps=args.max_steps)
    if args.seed is not None:
        rc = dataclasses.replace(rc, seed=args.seed)
    wide = [" ".join(p.split()[:WIDE]) for p in validation_prose(args.prose, args.wide)]
    base, tok = load_model(preset.model)
    prose = Prose.load("auto", 32, args.data)
    train, val = split_train_val(load_records(args.data), rc.val_set_size, rc.seed, rc.max_train_examples)

    def figures(model) -> dict:
        q = generation_quality(model, tok, base, val, prompts=PROMPTS, new_tokens=NEW_TOKENS)
        written = generate_text(model, tok, wide, {"max_new_tokens": NEW_TOKENS, "chat": False, "batch_size": 8})
        wide_rep = repetition([g.text for g in written])
        each = [repetition([g.text]) for g in written]  # per opening, for paired differences between rows
        return {"repetition": q["repetition"], "wide": wide_rep["repetition"], "wide_se": wide_rep["se"],
                "wide_each": [[r["repeated"], r["ngrams"]] for r in each],
                "by_set": {k: v["repetition"] for k, v in q["by_set"].items()},
                "distinct_2": q["distinct_2"], "reference_ppl": q["reference_ppl"],
                "val_prose_kl": heldout_metrics(model, base, tok, val_prose)["kl"],
                "test_prose_ppl": prose.measure(model, base, tok)["perplexity"],
                "se": {"repetition": q["repetition_se"], **{k: v["repetition_se"] for k, v in q["by_set"].items()}},
                "examples": q["examples"][:3] + q["examples"][-3:]}

    if "base" not in runs.done:
        runs.keep({"name": "base", **figures(base)})
    model = copy.deepcopy(base)
    prune(model, tok, preset.prune)
    if "pruned" not in runs.done:
        runs.keep({"name": "pruned", **figures(model)})
    calibration = dataclasses.replace(preset.reconstruct, calibration=text)
    ids, what = calibration_sequences(calibration, tok, teacher=base, records=train)
    reconstruct(model, base, tok, calibration, sequences=ids, source=what, progress=False)
    if "reconstructed" not in runs.done:
        runs.keep({"name": "reconstructed", **figures(model)})
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for name in args.variants.split(","):
        if name in runs.done:
            continue
        model.load_state_dict(state)
        cfg = variant_config(rc, name)
        start = time.perf_counter()
        res = recover(copy.deepcopy(model), tok, args.data, cfg, runs.work / "recovery" / name, overwrite=True,
                      progress=False, teacher=copy.deepcopy(base))
        row = {"name": name, "seconds": time.perf_counter() - start, "steps": res.steps,
               "train_tokens": res.train_tokens, "val_kl": res.val_metrics.get("val_kl"), **figures(res.model.eval())}
        runs.keep(row, f"repetition {row['repetition']:.3f}, val KL {row['val_kl']:.3f}, {row['seconds']:.0f} s")
    report(args, runs.done)


def report(args, done: dict) -> None:
    from rora.pipelines.summary import _percent as _pm  # a share as a percentage, ± its standard error

    base, ref = done.get("base"), done.get(args.reference)
    table = ["| model | repetition (%) | text openings (x base) / task prompts | wide openings (x base) | "
             f"wide vs {args.reference} (paired) | distinct-2 | reference ppl | val KL (run) | val KL (prose) | "
             "test prose ppl | recover s |", "|---" * 11 + "|"]
    for name, r in done.items():
        se = r.get("se", {})
        text = _pm(r["by_set"]["text"], se.get("text")) + _times(r["by_set"]["text"], base and base["by_set"]["text"])
        table.append(f"| {name} | {_pm(r['repetition'], se.get('repetition'))} | {text} / "
                     f"{_pm(r['by_set']['task'], se.get('task'))} | "
                     f"{_pm(r['wide'], r.get('wide_se'))}{_times(r['wide'], base and base['wide'])} | "
                     f"{_paired(r, ref)} | {r['distinct_2']:.3f} | {r['reference_ppl']:.2f} | "
                     f"{_num(r.get('val_kl'))} | {r['val_prose_kl']:.3f} | {r['test_prose_ppl']:.1f} | "
                     f"{_num(r.get('seconds'), '.0f')} |")
    args.out.mkdir(parents=True, exist_ok=True)
    plot(done, args.out / "writing.png")
    wide = len(next(iter(done.values())).get("wide_each", [])) or 48
    publish("writing", title="Writing after recovery: the recovery's objective (kd weight, share of prose, "
                             "token-level unlikelihood)",
            setting="the quickstart preset's prune and reconstruction, then its recovery (RoRA r16, lr 1e-3, ~28k "
                    "tokens of records and Wikipedia prose) with the row's objective (kd+sft-W: kd weight W; "
                    "-ulU: token-level unlikelihood of the context's other tokens, weight U; -proseR: R of the same "
                    "training tokens prose), one recovery per variant from "
                    "the same reconstructed model; repetition (± standard error over prompts): greedy 48-token "
                    "continuations of the summary's 48 text openings and 32 validation records' prompts (its limit: "
                    f"1.5x the unpruned model's on each set), wide openings: {wide} more, the first 10 words of corpus "
                    "paragraphs never read (validation: what a recipe is chosen on), and each row's difference from "
                    f"{args.reference} on them, paired over openings (* beyond two standard errors); val KL (run): "
                    "the recovery's own validation records and prose; val KL (prose): the last 48 of those "
                    "paragraphs, whole; test prose: 32 held-out BoolQ "
                    "passages (measured only, never chosen on); one run each (deterministic on the same setup and "
                    "thread count, not across them)",
            table="\n".join(table), data={"runs": done}, out=args.out)


def _paired(row: dict, ref: dict | None) -> str:
    """The row's wide-openings repetition minus the reference row's, on the same openings, ± its paired se."""
    from rora.evaluation.stats import paired_ratio_se

    if ref is None or row is ref or "wide_each" not in row or "wide_each" not in ref:
        return "-"
    (a_parts, a_wholes), (b_parts, b_wholes) = zip(*row["wide_each"]), zip(*ref["wide_each"])
    diff, se = row["wide"] - ref["wide"], paired_ratio_se(a_parts, a_wholes, b_parts, b_wholes)
    return f"{100 * diff:+.1f} ± {100 * se:.1f}" + (" *" if abs(diff) > 2 * se else "")


def _times(value, base) -> str:
    return f" ({value / base:.2f}x)" if base else ""


def _num(value, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def plot(done: dict, path: Path) -> None:
    """Repetition of each model's writing (± standard error): the summary's text openings and task prompts and the
    validation openings side by side, the text openings' 1.5x-base limit drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(done)
    fig, ax = plt.subplots(figsize=(7, 3.6))
    bars = [([done[n]["by_set"][part] for n in names], [done[n].get("se", {}).get(part) for n in names], label)
            for part, label in (("text", "the summary's text openings"), ("task", "task prompts"))]
    bars.append(([done[n]["wide"] for n in names], [done[n].get("wide_se") for n in names],
                 "validation openings (what a recipe is chosen on)"))
    for k, (values, errors, label) in enumerate(bars):
        ax.bar([i + 0.27 * k for i in range(len(names))], [100 * v for v in values], 0.27,
               yerr=[100 * (e or 0) for e in errors], capsize=2, label=label)
    if "base" in done:
        ax.axhline(150 * done["base"]["by_set"]["text"], color="k", ls=":", lw=1,
                   label="1.5x the unpruned model (text openings)")
    ax.set_xticks([i + 0.27 for i in range(len(names))], names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("repeated 4-grams (%)")
    ax.legend(fontsize=8)
    save_figure(fig, path)


if __name__ == "__main__":
    main()
