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
from _common import DemoFigures  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", required=True, help="the variant's name in rows.jsonl")
    p.add_argument("--pruned", default="runs/quickstart/pruned", help="the pruned model (make demo's)")
    p.add_argument("--fit", type=int, default=160, help="calibration sequences of 128 tokens fitted on")
    p.add_argument("--hold", type=int, default=32, help="calibration sequences held out (damping choice)")
    p.add_argument("--calib", default="runs/prose/*.parquet", help="calibration text source")
    p.add_argument("--reconstruct-precision", default="float32", choices=("float32", "bfloat16"),
                   help="the reconstruction's forward passes (reconstruct.precision)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a recover setting changed from the quickstart preset's (YAML values, as rora run --set)")
    p.add_argument("--data", default=os.environ.get("RORA_DATA_DIR"))
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
    work.mkdir(parents=True, exist_ok=True)
    base, tok = load_model("smollm2-135m")
    rc = load_preset("quickstart").recover
    figures = DemoFigures(tok, rc, args.data)

    def line(model, stage: str, extra: str = "") -> None:
        row = {"name": args.name, "stage": stage, **figures.measure(model, base), "extra": extra}
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


if __name__ == "__main__":
    main()
