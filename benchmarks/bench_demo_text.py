"""How much text the demo reconstructs on, and which paragraphs it distils on (the "How much text" table in the
quickstart preset's comment), on the demo's own prune (`make demo` writes runs/quickstart/pruned).

One variant per call: reconstruction (lstsq) on --fit x 128 tokens of --calib (+ --hold held out), cached per
calibration under --work, then one recovery with the quickstart preset's recover section, changed by --set KEY=VALUE.
The reconstructed and the recovered model each append a line to <work>/rows.jsonl (and stdout):
    VAL   perplexity and KL to the unpruned model on the last 96 paragraphs of the prose corpus's last shard (the
          demo reads from the start of its first two shards: never read) and the KL on the run's 32 validation
          records: what a variant is chosen on
    TEST  perplexity and KL on 64 held-out BoolQ validation passages (measured, never chosen on)

The table's rows (2 cores, ~6 min each; the 160 x 128 reconstruction runs once):
    B=benchmarks/bench_demo_text.py; C='runs/prose/*.parquet'
    python $B --name same  --calib "$C" --set text="$C"
    python $B --name fresh --calib "$C" --set text=runs/prose/train-00001.parquet
    python $B --name fit256 --fit 256 --calib "$C" --set text=runs/prose/train-00001.parquet
    python $B --name fit256-r0.6 --fit 256 --calib "$C" --set text=runs/prose/train-00001.parquet \
        --set text_ratio=0.6 --set max_text_tokens=23000
(`runs/prose/*.parquet` is read from the start, so 256 x 128 tokens of it are the first shard's.)
The reconstruction's precision and size (BENCHMARKS.md, "The demo's reconstruction"), then the table:
    C=runs/prose/train-00000.parquet
    python $B --name recon-fp32 --fit 256 --calib $C
    python $B --name recon-bf16 --fit 256 --calib $C --reconstruct-precision bfloat16
    python $B --name recon-bf16-448 --fit 448 --calib $C --reconstruct-precision bfloat16
    python $B --report recon-fp32,recon-bf16,recon-bf16-448  (and 352, 640, 832 alike)
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import RESULTS, DemoFigures, bar_pairs, publish  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", help="the variant's name in rows.jsonl")
    p.add_argument("--report", metavar="NAME,NAME,..",
                   help="instead of a run: publish results/demo_text.{md,json,png} from these variants' rows")
    p.add_argument("--pruned", default="runs/quickstart/pruned", help="the pruned model (make demo's)")
    p.add_argument("--fit", type=int, default=160, help="calibration sequences of 128 tokens fitted on")
    p.add_argument("--hold", type=int, default=32, help="calibration sequences held out (damping choice)")
    p.add_argument("--calib", default="runs/prose/*.parquet", help="calibration text source")
    p.add_argument("--reconstruct-precision", default="float32", choices=("float32", "bfloat16"),
                   help="the reconstruction's forward passes (reconstruct.precision)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a recover setting changed from the quickstart preset's (YAML values, as rora run --set)")
    p.add_argument("--data", default=os.environ.get("RORA_DATA_DIR"))
    p.add_argument("--out", type=Path, default=RESULTS, help="where --report writes demo_text.{md,json,png}")
    p.add_argument("--work", default="runs/bench-demo-text")
    return p.parse_args(argv)


def main(argv=None) -> None:
    from safetensors.torch import load_model as load_weights
    from safetensors.torch import save_model

    from rora.architecture import add_output_biases
    from rora.config import ReconstructConfig, load_preset, parse_setting
    from rora.models import load_model
    from rora.reconstruction.calibration import calibration_sequences
    from rora.reconstruction.reconstruct import reconstruct
    from rora.recovery.trainer import recover

    args = parse_args(argv)
    work = Path(args.work)
    if args.report:
        return report(work / "rows.jsonl", args.report.split(","), args.out)
    if not args.name:
        raise SystemExit("give --name (a run) or --report (a table of earlier runs)")
    work.mkdir(parents=True, exist_ok=True)
    base, tok = load_model("smollm2-135m")
    rc = load_preset("quickstart").recover
    figures = DemoFigures(tok, rc, args.data)

    def line(model, stage: str, extra: str = "") -> None:
        row = {"name": args.name, "stage": stage, **figures.measure(model, base), "extra": extra,
               "reconstruction": {"fit": args.fit, "hold": args.hold, "calib": args.calib,
                                  "precision": args.reconstruct_precision}, "set": args.set}
        print(json.dumps(row), flush=True)
        with open(work / "rows.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")

    model, _ = load_model(args.pruned)
    cfg = ReconstructConfig.coerce({"method": "lstsq", "calibration": args.calib, "num_samples": args.fit,
                                    "holdout_samples": args.hold, "precision": args.reconstruct_precision})
    precision = "" if args.reconstruct_precision == "float32" else f"_{args.reconstruct_precision}"
    cache = work / (f"recon_{args.fit}_{args.hold}{precision}_" + "".join(c for c in args.calib if c.isalnum())
                    + ".safetensors")
    if cache.is_file():
        add_output_biases(model)
        load_weights(model, cache)
    else:
        ids, what = calibration_sequences(cfg, tok, teacher=base)
        start = time.perf_counter()
        reconstruct(model, base, tok, cfg, sequences=ids, source=what, progress=False)
        seconds = time.perf_counter() - start
        save_model(model, cache)  # the tied embedding once
        line(model, "reconstructed", f"{seconds:.0f} s")
    changes = dict(map(parse_setting, args.set))  # KEY=VALUE as rora run --set reads it (YAML values)
    start = time.perf_counter()
    res = recover(model, tok, args.data, dataclasses.replace(rc, **changes), work / f"recovery-{args.name}",
                  overwrite=True, progress=False, teacher=base)
    line(res.model, "recovered", f"{res.train_tokens} tokens {res.steps} steps {time.perf_counter() - start:.0f} s")


def report(rows_path: Path, names: list[str], out: Path) -> None:
    """results/demo_text: each named variant's reconstruction (its seconds and validation figures) and recovery."""
    rows = [json.loads(line) for line in rows_path.read_text().splitlines() if line.strip()]
    got = {(r["name"], r["stage"]): r for r in rows}  # a variant's latest row of each stage
    missing = [n for n in names if (n, "recovered") not in got]
    if missing:
        raise SystemExit(f"{rows_path} has no recovered row for {', '.join(missing)}")
    table = ["| variant | reconstruction | seconds | reconstructed: val prose ppl (KL) | recovered: val prose ppl (KL) "
             "| recovered: val records KL | recovered: test prose ppl |", "|---|---|---|---|---|---|---|"]
    variants = []
    for n in names:
        rec, rcv = got.get((n, "reconstructed")), got[(n, "recovered")]
        cal = rcv["reconstruction"]
        alone = f"{rec['val_prose_ppl']:.1f} ({rec['val_prose_kl']:.3f})" if rec else "-"
        seconds = rec["extra"].split()[0] if rec else "-"
        table.append(f"| {n}{''.join(' ' + s for s in rcv['set'])} | {cal['fit']} x 128, {cal['precision']} | {seconds} "
                     f"| {alone} | {rcv['val_prose_ppl']:.1f} ({rcv['val_prose_kl']:.3f}) | {rcv['val_records_kl']:.3f} "
                     f"| {rcv['test_prose_ppl']:.1f} |")
        variants.append({"name": n, "reconstructed": rec, "recovered": rcv})
    out.mkdir(parents=True, exist_ok=True)
    bar_pairs(out / "demo_text.png", [v["name"] for v in variants],
              tuple((legend, [v["recovered"][key] for v in variants]) for key, legend in
                    (("val_prose_kl", "never-read prose"), ("val_records_kl", "validation records"))),
              "recovered: KL to the unpruned model", "variant", fontsize=8)
    newest = variants[-1]["recovered"]  # the newest rows carry every token count
    setting = (f"the demo's prune, lstsq reconstruction on N + {newest['reconstruction']['hold']} sequences of 128 tokens "
               f"of {newest['reconstruction']['calib']} (reconstruct.precision as given), then the quickstart preset's "
               f"recovery (changed as the variant says); validation: {newest['val_prose_tokens']:,} tokens of never-read "
               f"corpus paragraphs, {newest['val_records_tokens']:,} of the run's validation records; test prose: "
               f"{newest['test_prose_tokens']:,} tokens of BoolQ validation passages, measured, never chosen on")
    publish("demo_text", title="The demo's reconstruction: precision and calibration size, on validation figures",
            setting=setting, table="\n".join(table), data={"variants": variants}, out=out)


if __name__ == "__main__":
    main()
