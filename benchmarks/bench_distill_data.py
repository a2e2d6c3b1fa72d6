"""Benchmark: what to distil on. `recover --objective kd` on the training records vs on text the teacher writes
(`--synthetic`, continuing the same records' prompts), at about the same number of training tokens, one epoch each.

Student smollm2-135m pruned 30% (Taylor), teacher the unpruned model; both runs scored with
rora.measure.heldout_metrics on the same held-out records (real task text the runs never saw).

    .venv/bin/python benchmarks/bench_distill_data.py
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
from _common import write_outputs  # noqa: E402
from bench_distill import CUTOFF, SEED, TASKS, load_split  # noqa: E402
from bench_recover import prune_model  # noqa: E402

N_TRAIN, N_VAL, BATCH, RANK, LR = 64, 24, 16, 16, 1e-3
SYNTHETIC_TOKENS = 96
THREADS = int(os.environ.get("RORA_BENCH_THREADS", os.cpu_count() or 1))


def main() -> None:
    from rora.config import RecoverConfig
    from rora.models import load_model
    from rora.measure import heldout_metrics
    from rora.recovery.distill import record_examples
    from rora.recovery.trainer import recover

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(THREADS)
    t_start = time.time()
    train, val = load_split(N_TRAIN, N_VAL)
    base = dict(method="rora", rank=RANK, lr=LR, warmup_steps=1, seed=SEED, cutoff_len=CUTOFF, batch_size=BATCH,
                micro_batch_size=BATCH, epochs=1.0, val_set_size=0, objective="kd")
    with tempfile.TemporaryDirectory() as tmp:
        how = prune_model(Path(tmp) / "model")
        os.environ["RORA_CACHE_DIR"] = str(Path(tmp) / "cache")  # a fresh cache: the generation is timed too
        teacher, tok = load_model("smollm2-135m")
        pruned, _ = load_model(Path(tmp) / "model")
        runs = {"pruned (no recovery)": {"heldout": heldout_metrics(pruned, teacher, tok, record_examples(val, tok, CUTOFF))}}
        record_tokens = sum(len(e) for e in _tokenized(train, tok))
        # Texts of ~(prompt + SYNTHETIC_TOKENS) tokens: as many as give about the records' token count.
        mean_prompt = record_tokens / len(train) - 8  # the records' responses are a few tokens
        n_synthetic = max(BATCH, round(record_tokens / (mean_prompt + SYNTHETIC_TOKENS)))
        for name, kw, data in (("records", {}, train),
                               ("teacher-written", {"synthetic": n_synthetic, "synthetic_tokens": SYNTHETIC_TOKENS}, train)):
            student, _ = load_model(Path(tmp) / "model")
            t0 = time.perf_counter()
            result = recover(student, tok, data, RecoverConfig(**base, **kw), None, progress=False, teacher=teacher)
            wall = time.perf_counter() - t0
            runs[name] = {"heldout": heldout_metrics(result.model, teacher, tok, record_examples(val, tok, CUTOFF)), "steps": result.steps,
                          "train_tokens": result.train_tokens, "wall_s": wall,
                          "tokens_per_second": result.tokens_per_second, **kw}
            print(name, json.dumps(runs[name]), flush=True)
    total = time.time() - t_start
    rows = ["| training text | steps | training tokens | wall (s) | held-out KL | held-out whole-text loss |",
            "|---|---:|---:|---:|---:|---:|"]
    for name, r in runs.items():
        h = r["heldout"]
        rows.append(f"| {name} | {r.get('steps', 0)} | {r.get('train_tokens', 0):,} | {r.get('wall_s', 0):.0f} | "
                    f"{h['kl']:.4f} | {h['loss']:.4f} |")
    setting = (f"student smollm2-135m pruned 30% ({how}); teacher smollm2-135m (fp32); {N_TRAIN} training records "
               f"from {', '.join(TASKS)}; teacher-written: {n_synthetic} continuations of their prompts, "
               f"{SYNTHETIC_TOKENS} new tokens each, sampled at temperature 1 (the wall time includes the sampling), "
               f"packed to {CUTOFF}; one epoch each, batch {BATCH}, RoRA r={RANK}, lr {LR}; held-out: {N_VAL} "
               f"records carved from the same files (seed {SEED}); {THREADS} torch thread(s); {total / 60:.1f} min")
    write_outputs("distill_data", title="What to distil on: training records vs teacher-written text",
                  command="python benchmarks/bench_distill_data.py", setting=setting, table="\n".join(rows),
                  data={"runs": runs, "n_synthetic": n_synthetic, "pruning": how, "total_seconds": total})
    print("\n".join(rows))


def _tokenized(records, tok):
    from rora.recovery.data import tokenize

    return tokenize(records, tok, CUTOFF, True)[0]


if __name__ == "__main__":
    main()
