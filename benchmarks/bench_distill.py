"""Benchmark: the distillation trainer (`recover --objective kd`) vs a naive KD loop, and sft for reference.

Same student (smollm2-135m pruned 30%, Taylor), same teacher (the unpruned smollm2-135m, fp32 on CPU), same PEFT
adapter (RoRA r=16), same training examples (so the same tokens), batch size, optimizer, schedule and seed.
  naive:   plain PyTorch + PEFT, the way a KD loop is usually written: seeded random micro-batches padded to the
           longest with an attention mask; both models' full logits ([batch x length x vocab], fp32), log-softmax of
           both, KL per position, masked mean; one backward.
  kd:      rora.recover(objective="kd"): length-grouped micro-batches, both decoders to hidden states, the KL in
           chunks of 256 positions (rora.recovery.distill.ChunkedKL), the teacher under inference_mode.
  sft:     rora.recover(objective="sft") on the same examples: what distillation costs per token over SFT.
Each side runs in its own process (clean peak-memory figures). After training, every side's adapter is scored on
the same held-out records with rora.measure.heldout_metrics (KL to the teacher, whole-text loss).

    .venv/bin/python benchmarks/bench_distill.py [--small] [--gradient-checkpointing]

`--gradient-checkpointing` runs every side with activation checkpointing (results/distill_checkpointing.*): the
students' saved activations, which all sides share and which set the memory floor without it, then shrink, and
what remains is what the loss itself costs.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
from _common import RESULTS, environment, write_outputs  # noqa: E402
from bench_recover import DATA_DIR, TASKS, PeakRSS, prune_model  # noqa: E402

SETTINGS = {  # full run / --small
    "full": dict(steps=3, batch=16, val=16, rank=16),  # micro-batch 16: the recipe's
    "small": dict(steps=2, batch=4, val=8, rank=8),
}
LR, WARMUP, SEED, CUTOFF = 1e-3, 1, 42, 256
THREADS = int(os.environ.get("RORA_BENCH_THREADS", os.cpu_count() or 1))
SIDES = ("naive", "kd", "sft")


def load_split(n_train: int, n_val: int):
    from rora.recovery.data import load_records, split_train_val

    records = [r for t in TASKS for r in load_records(DATA_DIR / t / "train.json")]
    train, val = split_train_val(records, n_val, SEED)
    return train[:n_train], val


CHECKPOINTING = os.environ.get("RORA_BENCH_CHECKPOINTING") == "1"  # set by --gradient-checkpointing for every side


def recover_config(s: dict, **kw):
    from rora.config import RecoverConfig

    return RecoverConfig(method="rora", rank=s["rank"], lr=LR, warmup_steps=WARMUP, seed=SEED, cutoff_len=CUTOFF,
                         batch_size=s["batch"], micro_batch_size=s["batch"], max_steps=s["steps"], val_set_size=0,
                         gradient_checkpointing=CHECKPOINTING, **kw)


def run_side(side: str, model_dir: str, size: str) -> dict:
    from rora.models import load_model
    from rora.recovery.data import tokenize
    from rora.measure import heldout_metrics
    from rora.recovery.distill import record_examples

    s = SETTINGS[size]
    torch.set_num_threads(THREADS)
    model, tok = load_model(model_dir)
    teacher, _ = load_model("smollm2-135m")
    train, val = load_split(s["steps"] * s["batch"], s["val"])
    examples, _ = tokenize(train, tok, CUTOFF, True)
    real_tokens = sum(len(e) for e in examples)
    if side == "naive":
        peft_model, wall, mem = _naive(model, teacher, tok, examples, s)
    else:
        from rora.recovery.trainer import recover

        with PeakRSS() as mem:
            t0 = time.perf_counter()
            result = recover(model, tok, train, recover_config(s, objective=side), None, progress=False, teacher=teacher)
            wall = time.perf_counter() - t0
        peft_model = result.model
    held = heldout_metrics(peft_model, teacher, tok, record_examples(val, tok, CUTOFF), batch_size=8)
    return {"side": side, "wall_s": wall, "real_tokens": real_tokens, "tokens_per_second": real_tokens / wall,
            "peak_rss_gib": mem.peak / 2**30, "train_rss_gib": (mem.peak - mem.start) / 2**30,
            "heldout": held, "examples": len(examples)}


def _naive(model, teacher, tok, examples, s):
    """A plain KD loop over PEFT: full logits of both models, then the masked mean KL."""
    import torch.nn.functional as F
    from peft import get_peft_model
    from transformers import get_linear_schedule_with_warmup

    from rora.recovery.data import collate
    from rora.recovery.methods import peft_config

    torch.manual_seed(SEED)
    peft_model = get_peft_model(model, peft_config(recover_config(s), model))
    if CHECKPOINTING:  # as recover does it
        peft_model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    teacher.requires_grad_(False)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    scheduler = get_linear_schedule_with_warmup(optimizer, WARMUP, s["steps"])
    order = list(range(len(examples)))
    random.Random(SEED).shuffle(order)
    peft_model.train()
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        for step in range(s["steps"]):
            batch = [examples[i] for i in order[step * s["batch"] : (step + 1) * s["batch"]]]
            ids, _ = collate(batch, tok.pad_token_id)
            mask = torch.arange(ids.shape[1])[None, :] < torch.tensor([len(e) for e in batch])[:, None]
            student_logits = peft_model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            with torch.no_grad():
                teacher_logits = teacher(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            kl = F.kl_div(student_logits.log_softmax(-1), teacher_logits.log_softmax(-1), log_target=True,
                          reduction="none").sum(-1)
            keep = mask[:, 1:]
            loss = (kl * keep).sum() / keep.sum()
            loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        wall = time.perf_counter() - t0
    return peft_model, wall, mem


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", action="store_true", help="a smoke run")
    ap.add_argument("--gradient-checkpointing", action="store_true", help="every side with activation checkpointing")
    ap.add_argument("--render", help="rewrite the .md and .png of a results JSON this script wrote (no measuring)")
    ap.add_argument("--side", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    size = "small" if args.small else "full"
    if args.render:
        global CHECKPOINTING, THREADS
        d = json.loads(Path(args.render).read_text())
        CHECKPOINTING = d["settings"].get("gradient_checkpointing", False)
        THREADS = d["settings"]["threads"]  # the run's, not this shell's
        report(d["sides"], d["settings"]["pruning"], "small" if d["settings"]["batch"] == SETTINGS["small"]["batch"]
               else "full", d["load_average_before"], d["total_seconds"], d["environment"])
        return
    if args.side:
        print("RESULT " + json.dumps(run_side(args.side, args.model_dir, size)))
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.gradient_checkpointing:
        CHECKPOINTING = True
        os.environ["RORA_BENCH_CHECKPOINTING"] = "1"  # read by the side processes
    t_start = time.time()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        how = prune_model(Path(tmp) / "model")
        sides = {}
        for side in SIDES:
            cmd = [sys.executable, __file__, "--side", side, "--model-dir", str(Path(tmp) / "model")] + (["--small"] if args.small else [])
            done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
            if done.returncode:
                sys.exit(f"{side} failed:\n{done.stderr[-4000:]}")
            sides[side] = json.loads(next(l for l in done.stdout.splitlines() if l.startswith("RESULT "))[7:])
            print(side, json.dumps(sides[side]), flush=True)
    report(sides, how, size, load_before, time.time() - t_start)


def report(sides: dict, how: str, size: str, load_before, total_s: float, env: dict | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n, k, f = sides["naive"], sides["kd"], sides["sft"]
    speedup = k["tokens_per_second"] / n["tokens_per_second"]
    memory = k["peak_rss_gib"] / n["peak_rss_gib"]
    s = SETTINGS[size]
    name = ("distill" if size == "full" else "distill_small") + ("_checkpointing" if CHECKPOINTING else "")
    goal = speedup >= 1.5 and memory <= 0.5
    data = {"settings": {**s, "gradient_checkpointing": CHECKPOINTING, "lr": LR, "warmup": WARMUP, "seed": SEED, "cutoff_len": CUTOFF, "tasks": TASKS,
                         "pruning": how, "threads": THREADS, "kd_chunk_size": 256},
            "sides": sides, "speedup": speedup, "peak_memory_ratio": memory, "goal_met": goal,
            "load_average_before": load_before, "total_seconds": total_s, "environment": env or environment()}

    fig, axes = plt.subplots(1, 3, figsize=(10, 3.2))
    labels = ["naive KD\n(full logits)", "rora kd\n(chunked)", "rora sft"]
    for ax, key, title in zip(axes, ("tokens_per_second", "peak_rss_gib", "kl"),
                              ("tokens/s", "peak RSS (GiB)", "held-out KL to the teacher")):
        values = [x["heldout"]["kl"] if key == "kl" else x[key] for x in (n, k, f)]
        ax.bar(labels, values, color=["#999", "#2a7", "#58c"])
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(RESULTS / f"{name}.png", dpi=100)

    rows = ["| | naive KD loop | rora kd | ratio kd/naive | rora sft (reference) |", "|---|---:|---:|---:|---:|"]
    rows.append(f"| tokens/s (real tokens) | {n['tokens_per_second']:.1f} | {k['tokens_per_second']:.1f} | "
                f"**{speedup:.2f}x** | {f['tokens_per_second']:.1f} |")
    rows.append(f"| wall time (s) | {n['wall_s']:.1f} | {k['wall_s']:.1f} | {k['wall_s'] / n['wall_s']:.2f} | {f['wall_s']:.1f} |")
    rows.append(f"| peak RSS (GiB) | {n['peak_rss_gib']:.2f} | {k['peak_rss_gib']:.2f} | **{memory:.2f}** | {f['peak_rss_gib']:.2f} |")
    rows.append(f"| RSS growth while training (GiB) | {n['train_rss_gib']:.2f} | {k['train_rss_gib']:.2f} | "
                f"{k['train_rss_gib'] / n['train_rss_gib']:.2f} | {f['train_rss_gib']:.2f} |")
    extra_n, extra_k = n["peak_rss_gib"] - f["peak_rss_gib"], k["peak_rss_gib"] - f["peak_rss_gib"]
    rows.append(f"| peak RSS above the sft run (GiB) | {extra_n:.2f} | {extra_k:.2f} | "
                f"{extra_k / extra_n:.2f} | 0 |")
    rows.append(f"| held-out KL to the teacher | {n['heldout']['kl']:.4f} | {k['heldout']['kl']:.4f} | | {f['heldout']['kl']:.4f} |")
    rows.append(f"| held-out whole-text loss | {n['heldout']['loss']:.4f} | {k['heldout']['loss']:.4f} | | {f['heldout']['loss']:.4f} |")
    rows.append("")
    rows.append(f"Goal (kd >= 1.5x the naive loop's tokens/s at <= 0.5x its peak memory): {'met' if goal else 'NOT met'}. "
                f"KD costs {f['tokens_per_second'] / k['tokens_per_second']:.2f}x the time per token of SFT here: it "
                "runs the teacher's decoder and both LM heads on every position, where SFT runs one head on the "
                "response tokens only. Peak memory: the student's own saved activations, which every side holds "
                "alike, bound the ratio from below (the sft column is that floor: its teacher is never run, so never "
                "paged in); the 'above the sft run' row is what distillation adds (teacher weights and KL), as far as peaks sampled every 20 ms tell.")
    setting = (f"student smollm2-135m pruned 30% ({how}); teacher smollm2-135m (fp32); {k['examples']} training "
               f"examples from {', '.join(TASKS)} ({s['steps']} steps x batch {s['batch']} = micro-batch, "
               f"{k['real_tokens']:,} real tokens, cutoff {CUTOFF}); RoRA r={s['rank']}, lr {LR}, warmup {WARMUP} + "
               f"linear; held-out: {s['val']} records carved from the same files (seed {SEED}); torch threads "
               f"{THREADS} per side; load average {load_before[0]:.1f} at start; {total_s / 60:.1f} min in all")
    cmd = ("python benchmarks/bench_distill.py" + (" --small" if size == "small" else "")
           + (" --gradient-checkpointing" if CHECKPOINTING else ""))
    title = "Distillation trainer: `recover --objective kd` vs a naive KD loop" + (
        ", every side with gradient checkpointing" if CHECKPOINTING else "")
    write_outputs(name, title=title, command=cmd,
                  setting=setting + ("; gradient checkpointing on every side" if CHECKPOINTING else ""), table="\n".join(rows), data=data, images=[f"{name}.png"])
    print("\n".join(rows))


if __name__ == "__main__":
    main()
