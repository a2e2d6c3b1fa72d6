"""Which text the demo reconstructs and distils on, chosen on validation figures only (the table in the
quickstart preset's comment). The quickstart prune (30% uniform Taylor) is reconstructed (lstsq) on one calibration
text and then, per --kd entry, distilled with the preset's recipe on ~32k training tokens of records, prose or half
of each; every model gets:
    VAL   KL to the unpruned model (and perplexity) on 48 paragraphs of the prose corpus that the demo never reads
          (the last of its last shard), on 32 teacher-written sequences and on the 32 validation records; the
          repetition of its greedy writing on the held-out prompts (generation_quality, 12 + 12 prompts)
    TEST  prose perplexity and KL on 64 held-out BoolQ validation passages (reported, never chosen on)
One line per model on stdout.

    python tools/prose_corpus.py runs/prose
    python benchmarks/bench_demo_recipe.py --calibration prose --samples 64 --kd mix,prose   # ~35 min, 1 thread
    python benchmarks/bench_demo_recipe.py --calibration teacher --kd prose,mix
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
from _common import validation_prose  # noqa: E402
from bench_reconstruct import VALIDATION_TEXT_SEED  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data", default=os.environ.get("RORA_DATA_DIR"))
    p.add_argument("--prose", default="runs/prose", help="the directory tools/prose_corpus.py wrote")
    p.add_argument("--calibration", default="prose", help="teacher, records or prose")
    p.add_argument("--samples", type=int, default=64, help="calibration sequences of 128 tokens")
    p.add_argument("--kd", default="", help="comma-separated: records, prose, mix (none: reconstruction only)")
    p.add_argument("--budget", type=int, default=32000, help="distillation training tokens")
    p.add_argument("--lr", type=float, default=2e-3, help="distillation learning rate")
    return p.parse_args(argv)


def main(argv=None) -> None:
    from rora.config import PruneConfig, ReconstructConfig, load_preset
    from rora.evaluation.quality import generation_quality
    from rora.measure import Prose, heldout_metrics
    from rora.models import load_model
    from rora.pruning.prune import prune
    from rora.reconstruction.calibration import calibration_sequences
    from rora.reconstruction.reconstruct import reconstruct
    from rora.recovery.data import load_records, split_train_val
    from rora.recovery.distill import record_examples
    from rora.recovery.trainer import recover

    args = parse_args(argv)
    corpus = os.path.join(args.prose, "train-0000[0-2].parquet")  # the last shard is for validation
    val_prose = validation_prose(args.prose)
    base, tok = load_model(args.model)
    prose = Prose.load("auto", 64, args.data)
    rc = load_preset("quickstart").recover
    train, val = split_train_val(load_records(args.data), rc.val_set_size, rc.seed, rc.max_train_examples)
    val_records = record_examples(val, tok, rc.cutoff_len)
    ids, _ = calibration_sequences(ReconstructConfig(num_samples=32, holdout_samples=1, seed=VALIDATION_TEXT_SEED),
                                   tok, teacher=base)
    val_text = ids[:32].tolist()

    def line(model, label: str, extra: str = "") -> None:
        vp, vt, vr = (heldout_metrics(model, base, tok, items) for items in (val_prose, val_text, val_records))
        q = generation_quality(model, tok, base, val, prompts=12, new_tokens=48)
        p = prose.measure(model, base, tok)
        print(f"{label}: VAL prose kl {vp['kl']:.3f} ppl {vp['perplexity']:.1f} text kl {vt['kl']:.3f} records kl "
              f"{vr['kl']:.3f} rep {q['repetition']:.3f} | TEST prose ppl {p['perplexity']:.1f} kl {p['kl']:.3f} "
              f"{extra}", flush=True)

    model = copy.deepcopy(base)
    prune(model, tok, PruneConfig(ratio=0.3, importance="taylor", num_samples=8))
    cfg = ReconstructConfig(method="lstsq", calibration=corpus if args.calibration == "prose" else args.calibration,
                            num_samples=args.samples, holdout_samples=max(16, args.samples // 4))
    ids, what = calibration_sequences(cfg, tok, teacher=base, records=train)
    start = time.perf_counter()
    reconstruct(model, base, tok, cfg, sequences=ids, source=what, progress=False)
    label = f"recon[{args.calibration} {args.samples}x128]"
    line(model, label, f"{time.perf_counter() - start:.0f} s")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    val_tokens = rc.val_set_size * rc.cutoff_len
    # the recipe the table was measured with: the preset's, at lr 2e-3 with validation every 8 steps, no text
    # (dataclasses.replace: the config's own replace() skips None values, and these must clear)
    recipe = dataclasses.replace(rc, lr=args.lr, eval_steps=8, save_steps=8, text=None, text_ratio=None,
                                 max_text_tokens=None)
    for kd in filter(None, args.kd.split(",")):
        model.load_state_dict(state)
        if kd == "records":  # 384 records hold ~32k tokens
            data, cfg_kd = args.data, recipe.replace(max_train_examples=384)
        elif kd == "prose":
            data, cfg_kd = None, dataclasses.replace(recipe, text=corpus, max_text_tokens=args.budget + val_tokens,
                                                     max_train_examples=None)
        else:
            data, cfg_kd = args.data, recipe.replace(text=corpus, max_text_tokens=args.budget // 2 + val_tokens,
                                                     text_ratio=0.5, max_train_examples=192)
        start = time.perf_counter()
        res = recover(copy.deepcopy(model), tok, data, cfg_kd, f"runs/demo-recipe/{args.calibration}-{kd}",
                      overwrite=True, progress=False, teacher=base)
        line(res.model, f"{label}+kd[{kd}]", f"{res.train_tokens} tokens, {res.steps} steps, "
                                              f"{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
