"""The log-likelihood engine's matmul precision on this CPU: float32 (the default on a CPU, lm-eval's numbers to ~1e-5)
against bfloat16 autocast (`--precision bfloat16`, what the quickstart evaluates with), side by side in one run on the
same examples: time, identical predictions, each model's average, and the comparison a run makes (pruned - base,
paired) at each precision.

Models: smollm2-135m, and the pruned and recovered (merged) models of a finished `make demo` (--run). Every model is
scored at both precisions in turn (float32 first), all eight tasks, a seeded random N per task (the demo's sample).

    .venv/bin/python benchmarks/bench_precision.py [--sample 100] [--run runs/quickstart] [--small] [--out DIR]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import environment, offline_data_dir, paired_cell, write_outputs  # noqa: E402
from rora.registry import TASKS as TASK_NAMES  # noqa: E402

PRECISIONS = ("float32", "bfloat16")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sample", type=int, default=100, help="seeded random N examples of each task")
    ap.add_argument("--small", action="store_true", help="3 examples of two tasks, base model only (a smoke run)")
    ap.add_argument("--run", type=Path, default=Path("runs/quickstart"),
                    help="a finished rora run whose pruned/ and merged/ models are scored too")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", type=Path, default=None, help="where precision.{json,md} go (default benchmarks/results)")
    args = ap.parse_args(argv)
    tasks = ["winogrande", "openbookqa"] if args.small else TASK_NAMES.names()
    sample = 3 if args.small else args.sample

    import torch

    from rora.config import EvalConfig
    from rora.evaluation.evaluate import evaluate
    from rora.evaluation.stats import outcomes_from_records, paired_difference
    from rora.models import load_model

    data_dir = offline_data_dir(args.data_dir)
    base, tok = load_model("smollm2-135m")
    models = {"base": base}
    if not args.small:
        stages = {"pruned": args.run / "pruned", "recovered": args.run / "merged"}
        if not all(p.is_dir() for p in stages.values()):
            sys.exit(f"{args.run} has no pruned/ and merged/ models: run `make demo` first, or give --run")
        models.update({label: load_model(str(path))[0].eval() for label, path in stages.items()})

    cfg = EvalConfig(tasks=tasks, protocol="lm-eval", sample=sample, seed=0, prose="none", generation=False)
    runs = {}
    for label, model in models.items():
        for precision in PRECISIONS:
            res = evaluate(model, tok, cfg.replace(precision=precision), data_dir=data_dir, progress=False)
            runs[label, precision] = {
                "seconds": sum(r["seconds"] for r in res.per_task.values()), "average": res.average,
                "predictions": [r["prediction"] for r in res.records],
                "outcomes": outcomes_from_records(res.records)}
            print(f"{label} {precision}: {runs[label, precision]['seconds']:.1f} s, average {res.average:.4f}",
                  flush=True)
    rows = {}
    for label in models:
        a, b = runs[label, "float32"], runs[label, "bfloat16"]
        rows[label] = {"examples": len(a["predictions"]), "float32_s": a["seconds"], "bfloat16_s": b["seconds"],
                       "speedup": a["seconds"] / b["seconds"],
                       "identical_predictions": sum(x == y for x, y in zip(a["predictions"], b["predictions"])),
                       "float32_average": a["average"], "bfloat16_average": b["average"],
                       "bfloat16_minus_float32": paired_difference(a["outcomes"], b["outcomes"])}
    comparisons = {f"{label} - {ref}, {p}": paired_difference(runs[ref, p]["outcomes"], runs[label, p]["outcomes"])
                   for label, ref in (("pruned", "base"), ("recovered", "pruned"), ("recovered", "base"))
                   if label in models for p in PRECISIONS}
    table = _table(rows, comparisons)
    write_outputs("precision", title="Scoring precision on a CPU: float32 against bfloat16 autocast",
                  command="python benchmarks/bench_precision.py " + " ".join(sys.argv[1:] if argv is None else argv),
                  setting=f"smollm2-135m ({', '.join(models)}: the models of {args.run}), lm-eval protocol, "
                          f"rora engine, a seeded random {sample} examples of each of {len(tasks)} tasks, every model "
                          f"at both precisions in turn, torch threads {torch.get_num_threads()}",
                  table=table, data={"sample": sample, "tasks": tasks, "rows": rows, "comparisons": comparisons,
                                     "environment": environment()}, **({"out": args.out} if args.out else {}))
    print(table)


def _table(rows: dict, comparisons: dict) -> str:
    from rora.evaluation.stats import WITHOUT_PRIOR

    lines = ["| model | examples | float32 s | bfloat16 s | speed-up | identical predictions | average float32 | "
             "average bfloat16 | bfloat16 - float32 (paired) |", "|---|---|---|---|---|---|---|---|---|"]
    for label, r in rows.items():
        lines.append(f"| {label} | {r['examples']} | {r['float32_s']:.1f} | {r['bfloat16_s']:.1f} | "
                     f"{r['speedup']:.2f}x | {r['identical_predictions']} | {100 * r['float32_average']:.2f} | "
                     f"{100 * r['bfloat16_average']:.2f} | {paired_cell(r['bfloat16_minus_float32'], 'average')} |")
    if comparisons:
        lines += ["", "| paired comparison, precision | average | average w/o BoolQ |", "|---|---|---|"]
        lines += [f"| {name} | {paired_cell(c, 'average')} | {paired_cell(c, WITHOUT_PRIOR)} |"
                  for name, c in comparisons.items()]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
