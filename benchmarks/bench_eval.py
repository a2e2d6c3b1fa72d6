"""Evaluation speed and faithfulness on smollm2-135m, side by side in one run.

1. `generate` (batched per task, shared prefix and prompts encoded once) vs the reference script's loop
   (batch 1, 4 beams, no attention mask): seconds per example and identical predictions/responses; and vs
   lm-eval-harness's own HF backend (HFLM.generate_until, same batch size, 4 beams) on the same prompts.
2. `score` vs lm-eval-harness's own HF backend (HFLM.loglikelihood) on the same (context, label) requests:
   seconds per example, identical predictions and accuracy, max |log-likelihood difference|.
3. How often `score` agrees with `generate`.

Subsets: the first N test records of each of the eight tasks (N per comparison below). By default the reference
loop runs on the same records as the batched engine (a smaller `--ref-n` takes a prefix of them); identical
predictions are counted on that overlap.

    .venv/bin/python benchmarks/bench_eval.py [--small]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import RESULTS, environment, offline_data_dir, write_outputs  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="tiny subsets (a smoke run)")
    ap.add_argument("--gen-n", type=int, default=16, help="examples per task for batched generate")
    ap.add_argument("--ref-n", type=int, default=16, help="examples per task for the one-at-a-time reference loop")
    ap.add_argument("--score-n", type=int, default=16, help="examples per task for score vs lm-eval's HFLM")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--model", default="smollm2-135m",
                    help="model spec; a recovered model (e.g. runs/quickstart/merged) is what the protocol is used on")
    args = ap.parse_args()
    if args.small:
        args.gen_n, args.ref_n, args.score_n = 1, 1, 1

    from rora.evaluation.data import load_examples
    from rora.evaluation.generate import generate_reference, generate_responses
    from rora.evaluation.score import argmax, loglikelihoods
    from rora.evaluation.tasks import ANSWER_PREFIX, TASKS, eval_prompt, extract_answer, record_labels
    from rora.models import load_model
    from rora.registry import TASKS as TASK_NAMES

    ALL_TASKS = TASK_NAMES.names()
    data_dir = offline_data_dir(args.data_dir)
    model, tok = load_model(args.model)
    n_max = max(args.gen_n, args.ref_n, args.score_n)
    examples = {t: load_examples(TASKS[t], data_dir, n_max) for t in ALL_TASKS}

    def subset(n):
        return [(t, r) for t in ALL_TASKS for r in examples[t][:n]]

    def timed(fn, *a, **kw):
        start = time.perf_counter()
        out = fn(*a, **kw)
        return out, time.perf_counter() - start

    # 1. generate: batched vs the reference loop
    # The CPU is shared, so each fast engine runs before and after its baselines (A B C A), and the two are averaged.
    gen_set, ref_set = subset(args.gen_n), subset(args.ref_n)
    gen_prompts = [eval_prompt(r["instruction"]) for _, r in gen_set]

    def batched_per_task():  # as evaluate() runs it: one call per task
        return [resp for t in ALL_TASKS for resp in generate_responses(
            model, tok, [p for (task, _), p in zip(gen_set, gen_prompts) if task == t], batch_size=args.batch_size)]

    generate_responses(model, tok, gen_prompts[:1], max_new_tokens=2)  # warm-up
    batched, t_b1 = timed(batched_per_task)
    print(f"generate batched: {len(gen_set)} examples in {t_b1:.1f} s", flush=True)
    ref_prompts = [eval_prompt(r["instruction"]) for _, r in ref_set]
    reference, t_ref = timed(generate_reference, model, tok, ref_prompts)
    print(f"generate reference loop: {len(ref_set)} examples in {t_ref:.1f} s", flush=True)
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=args.batch_size, device="cpu")
    gen_kwargs = {"until": [], "max_gen_toks": 32, "num_beams": 4, "do_sample": False}
    hf_gen, t_hg = timed(lm.generate_until, [Instance("generate_until", {}, (p, dict(gen_kwargs)), i)
                                             for i, p in enumerate(gen_prompts)], disable_tqdm=True)
    print(f"generate lm-eval HFLM.generate_until: {len(gen_set)} examples in {t_hg:.1f} s", flush=True)
    again, t_b2 = timed(batched_per_task)
    print(f"generate batched again: {t_b2:.1f} s", flush=True)
    assert again == batched, "batched generate is not deterministic"
    t_batched = (t_b1 + t_b2) / 2
    gen_index = {id(r): i for i, (_, r) in enumerate(gen_set)}
    same_pred = same_resp = 0
    for (t, r), resp in zip(ref_set, reference):
        mine = batched[gen_index[id(r)]]
        same_resp += mine == resp
        same_pred += extract_answer(TASKS[t], mine) == extract_answer(TASKS[t], resp)
    gen_preds = [extract_answer(TASKS[t], resp) for (t, _), resp in zip(gen_set, batched)]
    ceiling = _generate_ceiling(model, tok, ref_set, ref_prompts, reference, t_ref / len(ref_set), args.batch_size)

    # the prompt ends with "### Response:" and blanks: the continuation, stripped, is the response
    same_hf = sum(extract_answer(TASKS[t], b) == extract_answer(TASKS[t], h.strip())
                  for (t, _), b, h in zip(gen_set, batched, hf_gen))

    # 2. score vs lm-eval's HFLM on identical requests
    score_set = subset(args.score_n)
    labels = [record_labels(TASKS[t], r["instruction"]) for t, r in score_set]
    requests = [(eval_prompt(r["instruction"]) + ANSWER_PREFIX, labs) for (_, r), labs in zip(score_set, labels)]
    inst = [Instance("loglikelihood", {}, (c, k), i) for c, cands in requests for i, k in enumerate(cands)]
    loglikelihoods(model, tok, requests[:2]), lm.loglikelihood(inst[:2], disable_tqdm=True)  # warm-up
    ours, t_s1 = timed(loglikelihoods, model, tok, requests, batch_size=args.batch_size)
    flat, t_h1 = timed(lm.loglikelihood, inst, disable_tqdm=True)
    _, t_h2 = timed(lm.loglikelihood, inst, disable_tqdm=True)
    _, t_s2 = timed(loglikelihoods, model, tok, requests, batch_size=args.batch_size)
    t_score, t_hflm = (t_s1 + t_s2) / 2, (t_h1 + t_h2) / 2  # order A B B A on a shared CPU
    print(f"score: {len(score_set)} examples in {t_s1:.1f} / {t_s2:.1f} s; lm-eval HFLM in {t_h1:.1f} / {t_h2:.1f} s",
          flush=True)
    theirs, it = [], iter(ll for ll, _ in flat)
    for _, cands in requests:
        theirs.append([next(it) for _ in cands])
    pred_ours = [labs[argmax(v)] for labs, v in zip(labels, ours)]
    pred_theirs = [labs[argmax(v)] for labs, v in zip(labels, theirs)]
    answers = [r["answer"] for _, r in score_set]
    acc_ours = sum(p == a for p, a in zip(pred_ours, answers)) / len(answers)
    acc_theirs = sum(p == a for p, a in zip(pred_theirs, answers)) / len(answers)
    max_diff = max(abs(a - b) for x, y in zip(ours, theirs) for a, b in zip(x, y))

    # 3. score vs generate agreement on the generate set (score predictions for those examples)
    score_index = {id(r): i for i, (_, r) in enumerate(score_set)}
    pairs = [(pred_ours[score_index[id(r)]], g) for (_, r), g in zip(gen_set, gen_preds) if id(r) in score_index]
    agree = sum(a == b for a, b in pairs) / len(pairs) if pairs else None
    gen_acc = sum(p == r["answer"] for p, (_, r) in zip(gen_preds, gen_set)) / len(gen_set)

    per_ex = {"generate batched": t_batched / len(gen_set), "reference loop": t_ref / len(ref_set),
              "lm-eval HFLM generate_until": t_hg / len(gen_set),
              "score": t_score / len(score_set), "lm-eval HFLM": t_hflm / len(score_set)}
    gen_speedup = per_ex["reference loop"] / per_ex["generate batched"]
    score_speedup = per_ex["lm-eval HFLM"] / per_ex["score"]
    data = {
        "subsets": {"generate_batched_per_task": args.gen_n, "reference_per_task": args.ref_n,
                    "score_per_task": args.score_n, "tasks": list(ALL_TASKS), "batch_size": args.batch_size},
        "seconds": {"generate_batched": [t_b1, t_b2], "reference_loop": t_ref, "hflm_generate_until": t_hg,
                    "score": [t_s1, t_s2],
                    "hflm": [t_h1, t_h2]},
        "seconds_per_example": per_ex,
        "generate": {"speedup": gen_speedup, "identical_predictions": same_pred / len(ref_set),
                     "identical_responses": same_resp / len(ref_set), "compared": len(ref_set),
                     "accuracy_batched": gen_acc,
                     "speedup_vs_hflm": per_ex["lm-eval HFLM generate_until"] / per_ex["generate batched"],
                     "identical_predictions_vs_hflm": same_hf / len(gen_set)},
        "score": {"speedup": score_speedup, "accuracy": acc_ours, "hflm_accuracy": acc_theirs,
                  "identical_predictions": sum(a == b for a, b in zip(pred_ours, pred_theirs)) / len(pred_ours),
                  "max_abs_loglik_diff": max_diff, "examples": len(score_set)},
        "generate_ceiling": ceiling,
        "score_vs_generate_agreement": agree, "agreement_examples": len(pairs),
        "environment": environment(),
    }
    png = _plot(per_ex)
    rows = [
        "| comparison | ours (s/example) | baseline (s/example) | speedup | goal | faithfulness |",
        "|---|---|---|---|---|---|",
        f"| generate: batched vs reference loop (batch 1, 4 beams, no mask) | {per_ex['generate batched']:.2f} | "
        f"{per_ex['reference loop']:.2f} | **{gen_speedup:.1f}x** | >= 10x | "
        f"{same_pred}/{len(ref_set)} identical predictions, {same_resp}/{len(ref_set)} identical responses |",
        f"| generate: batched vs lm-eval HFLM.generate_until (batch {args.batch_size}, 4 beams, same prompts) | "
        f"{per_ex['generate batched']:.2f} | {per_ex['lm-eval HFLM generate_until']:.2f} | "
        f"**{per_ex['lm-eval HFLM generate_until'] / per_ex['generate batched']:.1f}x** | (none) | "
        f"{same_hf}/{len(gen_set)} identical predictions |",
        f"| score vs lm-eval HFLM.loglikelihood (same requests) | {per_ex['score']:.2f} | {per_ex['lm-eval HFLM']:.2f} | "
        f"**{score_speedup:.1f}x** | >= 1.5x | accuracy {acc_ours:.3f} vs {acc_theirs:.3f}, "
        f"max loglik diff {max_diff:.1e} |",
        "",
        f"score agrees with generate on {agree:.0%} of {len(pairs)} examples ({args.model}: generate accuracy "
        f"{gen_acc:.1%}, score accuracy {acc_ours:.1%}; a model not tuned to the format rarely writes a label, so "
        f"generate then mostly predicts \"\")." if pairs else "",
        "",
        _verdict(gen_speedup, score_speedup, same_pred, len(ref_set), ceiling),
    ]
    setting = (f"{args.model} fp32 on CPU (fast engines timed before and after their "
               f"baseline, averaged); first {args.gen_n} test records per task for batched generate "
               f"(batch {args.batch_size}, one call per task as `rora eval` makes), first {args.ref_n} per task for the "
               f"reference loop (the same records when equal), "
               f"first {args.score_n} per task for score vs HFLM; all eight tasks")
    cmd = "python benchmarks/bench_eval.py" + (" --small" if args.small else "") + (
        f" --model {args.model}" if args.model != "smollm2-135m" else "")
    write_outputs("eval", title="Evaluation: batched generate and fast scoring", command=cmd, setting=setting,
                  table="\n".join(rows), data=data, images=[png.name])
    print("\n".join(rows))


def _generate_ceiling(model, tok, ref_set, prompts, responses, ref_s_per_example, batch_size) -> dict:
    """The most any exact engine could gain over the reference loop on this machine.

    Even a perfect engine must run every prompt token it cannot share through the decoder once, and every beam
    through decoder and LM head once per generated step. Counted with the batches' shared prefixes removed and the
    steps taken from the reference's own responses (+1 for the end token), at the measured matmul peak.
    """
    import torch

    from _common import matmul_peak
    from rora.evaluation.loglik import shared_prefix_length

    body = sum(m.weight.numel() for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head"))
    head = model.get_output_embeddings().weight.numel()
    unique = 0
    for t in dict.fromkeys(task for task, _ in ref_set):
        rows = sorted((tok(p).input_ids for (task, _), p in zip(ref_set, prompts) if task == t), key=len, reverse=True)
        for k in range(0, len(rows), batch_size):
            chunk = rows[k:k + batch_size]
            shared = shared_prefix_length(chunk, min(len(r) for r in chunk) - 1)
            unique += shared + sum(len(r) - shared for r in chunk)
    steps = sum(len(tok(r).input_ids) + 1 for r in responses)
    flops = 2 * body * unique + 4 * 2 * (body + head) * steps  # 4 beams
    peak = matmul_peak()
    floor = flops / peak / len(ref_set)
    return {"min_flop_per_example": flops / len(ref_set), "matmul_peak_flop_per_s": peak,
            "min_s_per_example": floor, "max_speedup": ref_s_per_example / floor,
            "unique_prompt_tokens_per_example": unique / len(ref_set), "steps_per_example": steps / len(ref_set)}


def _verdict(gen_speedup, score_speedup, same, n, ceiling) -> str:
    out = []
    if gen_speedup >= 10 and same / n >= 0.99:
        out.append("generate goal met.")
    else:
        out.append(
            f"generate goal {'met on faithfulness but not' if same / n >= 0.99 else 'not met'} on speed "
            f"({gen_speedup:.1f}x < 10x). The ceiling on this CPU: an exact engine must still run each example's "
            f"{ceiling['unique_prompt_tokens_per_example']:.0f} unshared prompt tokens once and 4 beams x "
            f"{ceiling['steps_per_example']:.1f} decode steps through decoder and LM head, "
            f"{ceiling['min_flop_per_example'] / 1e9:.1f} GFLOP per example; at the measured fp32 matmul peak "
            f"({ceiling['matmul_peak_flop_per_s'] / 1e9:.0f} GFLOP/s) that is {ceiling['min_s_per_example']:.3f} s, "
            f"so no exact engine could be more than {ceiling['max_speedup']:.1f}x faster than the reference loop here. "
            "The batched engine encodes each batch's shared prefix once and each prompt once (the reference: 4x, once "
            "per beam), decodes all beams of 16 prompts per step, and grows and reorders the KV cache in place. The "
            "10x goal is a GPU figure, where the batch-1 loop is latency-bound rather than compute-bound."
        )
    out.append("score goal met." if score_speedup >= 1.5 else f"score goal not met ({score_speedup:.1f}x < 1.5x).")
    return " ".join(out)


def _plot(per_ex: dict) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.2))
    names = list(per_ex)
    colors = ["tab:blue", "tab:gray", "tab:gray", "tab:blue", "tab:gray"]
    ax.barh(names, [per_ex[n] for n in names], color=colors)
    ax.invert_yaxis()
    ax.set_xlabel("seconds per example (smollm2-135m, CPU; lower is better)")
    for i, n in enumerate(names):
        ax.text(per_ex[n], i, f" {per_ex[n]:.2f}", va="center")
    fig.tight_layout()
    path = RESULTS / "eval.png"
    RESULTS.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


if __name__ == "__main__":
    main()
