"""The demo's recovery at float32 and at bfloat16 autocast on this CPU (`recover.precision`), side by side in one run:
training throughput, and what the model learns (the validation figures the demo's recipe is chosen on), at the
demo's token budget (168 training records and 14,000 tokens of text) and at larger ones that bfloat16's speed buys
in about the same time.

Every variant starts from the same model (make demo's reconstructed model by default) and runs the quickstart
preset's recover section, changed only by its precision and its token budget (a multiple of --records training
records and --text-tokens of training text; the 32 validation records and validation text sequences stay the
same). Measured:
    seconds, training tokens per second   the recovery's own figures
    VAL   perplexity and KL to the unpruned model on the last 96 paragraphs of the prose corpus's last shard (the
          demo reads its first two shards from the start: never read) and the KL on the run's validation records
    TEST  perplexity on held-out BoolQ validation passages (measured, never chosen on)
Each finished variant is appended to <work>/runs.jsonl, so an interrupted benchmark continues where it stopped.

    .venv/bin/python benchmarks/bench_train_precision.py [--variants float32:1,bfloat16:1,bfloat16:1.5]
        [--start runs/quickstart/reconstructed] [--prose-dir runs/prose] [--work runs/bench-train-precision]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import DemoFigures, Runs, offline_data_dir, write_outputs  # noqa: E402

SMALL = {"batch_size": 2, "micro_batch_size": 2, "cutoff_len": 160, "val_set_size": 2, "warmup_steps": 1}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default="float32:1,bfloat16:1,bfloat16:1.5",
                   help="PRECISION:BUDGET pairs; BUDGET multiplies --records and --text-tokens")
    p.add_argument("--records", type=int, default=168,
                   help="training records of budget 1x (the demo's)")
    p.add_argument("--text-tokens", type=int, default=14000, help="tokens of training text of budget 1x (likewise)")
    p.add_argument("--start", default="runs/quickstart/reconstructed", help="the model every variant starts from")
    p.add_argument("--prose-dir", default="runs/prose", help="make prose's corpus (training text and validation)")
    p.add_argument("--data-dir", default=os.environ.get("RORA_DATA_DIR"))
    p.add_argument("--work", default="runs/bench-train-precision")
    p.add_argument("--small", action="store_true", help="a few tiny steps from the unpruned model (a smoke run)")
    p.add_argument("--out", type=Path, default=None, help="where train_precision.{json,md} go (default results/)")
    args = p.parse_args(argv)
    try:
        args.variants = [(precision, float(scale)) for precision, scale in
                         (v.split(":") for v in args.variants.split(","))]
    except ValueError:
        p.error(f"--variants {args.variants!r}: give PRECISION:BUDGET pairs, e.g. float32:1,bfloat16:1.5")
    return args


def budget(rc, scale: float, records: int, text_tokens: int) -> dict:
    """The recover settings of one variant's token budget: `scale` times `records` training records and
    `text_tokens` tokens of training text; the validation sequences (val_set_size of cutoff_len, taken out of the
    text first) unchanged."""
    return {"max_train_examples": round(records * scale),
            "max_text_tokens": round(text_tokens * scale) + rc.val_set_size * rc.cutoff_len}


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch

    from rora.config import load_preset
    from rora.models import load_model
    from rora.recovery.trainer import recover

    data_dir = offline_data_dir(args.data_dir)
    runs = Runs(args.work)
    base, tok = load_model("smollm2-135m")
    start = "smollm2-135m" if args.small else args.start
    preset = load_preset("quickstart").recover
    rc = preset.replace(text=str(Path(args.prose_dir) / Path(preset.text).name), **(SMALL if args.small else {}))
    figures = DemoFigures(tok, rc, data_dir, args.prose_dir, *((4, 2) if args.small else (96, 64)))
    unit = (4, 320) if args.small else (args.records, args.text_tokens)  # budget 1x: records, tokens of text
    for precision, scale in args.variants:
        variant = f"{precision}:{scale:g}"
        if variant in runs.done:
            continue
        model, _ = load_model(start)
        cfg = rc.replace(precision=precision, **budget(rc, scale, *unit))
        t0 = time.perf_counter()
        res = recover(model, tok, str(data_dir), cfg, Path(args.work) / f"recovery-{precision}-{scale}",
                      overwrite=True, progress=False, teacher=base)
        seconds = time.perf_counter() - t0
        row = figures.measure(res.model, base)
        runs.keep({"name": variant, "precision": precision, "budget": scale, "seconds": seconds,
                   "train_tokens": res.train_tokens, "tokens_per_second": res.tokens_per_second, "steps": res.steps,
                   **row}, say=f"{res.train_tokens} tokens in {seconds:.0f} s, val prose KL {row['val_prose_kl']:.3f}")
    rows = [runs.done[f"{p}:{b:g}"] for p, b in args.variants]
    table = _table(rows)
    given = sys.argv[1:] if argv is None else argv
    write_outputs("train_precision", title="Training precision on a CPU: the demo's recovery at float32 and bfloat16",
                  command="python benchmarks/bench_train_precision.py " + " ".join(given),
                  setting=f"the quickstart preset's recover section from {start}, at each precision and token budget "
                          f"in turn, torch threads {torch.get_num_threads()}; validation: "
                          f"{rows[0]['val_prose_tokens']:,} tokens of never-read corpus paragraphs, "
                          f"{rows[0]['val_records_tokens']:,} of the run's validation records; test prose: "
                          f"{rows[0]['test_prose_tokens']:,} tokens of {figures.test_prose.source}",
                  table=table, data={"rows": rows}, **({"out": args.out} if args.out else {}))
    print(table)


def _table(rows: list[dict]) -> str:
    ref = next((r for r in rows if r["precision"] == "float32" and r["budget"] == 1.0), rows[0])
    lines = ["| precision | token budget | training tokens | seconds | tokens/s (x float32) | val prose ppl (KL) | "
             "val records KL | test prose ppl |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['precision']} | {r['budget']:g}x | {r['train_tokens']:,} | {r['seconds']:.0f} | "
                     f"{r['tokens_per_second']:.0f} ({r['tokens_per_second'] / ref['tokens_per_second']:.2f}x) | "
                     f"{r['val_prose_ppl']:.1f} ({r['val_prose_kl']:.3f}) | {r['val_records_kl']:.3f} | "
                     f"{r['test_prose_ppl']:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
