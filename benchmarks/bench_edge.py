"""Benchmark: the edge payoff in llama.cpp: file size, prompt-processing and generation tokens/s, held-out perplexity.

Models (label=spec, any rora model spec): by default the base smollm2-135m and its 30% uniform Taylor prune made
here with `rora prune`; pass a recovered model as e.g. `recovered=runs/quickstart/merged`. Each is exported with
`rora.export` (so every file is verified in llama.cpp before it is kept) as f16, q8_0 and q4_k_m GGUF; with
--nonuniform also a 4:26 non-uniform prune as compact (deci) and padded (llama) q8_0 files.

Speed is llama.cpp's own, through llama-cpp-python, measured as llama-bench does: pp = one 128-token prompt
evaluated from an empty cache, tg = 64 single-token decode steps after an 8-token prompt (no sampler), best of
--repeats rounds, the files interleaved within each round so that load from other jobs on shared cores hits them
alike. Perplexity: the packaged held-out prose (rora/deployment/heldout.txt, written for rora, in no training set).
Goal (issue #14): the pruned model generates >= 1.2x the base model's tokens/s at q8_0; the ceiling is the ratio of
weight bytes read per token (every tensor: SmolLM2's tied embeddings are read whole as the output layer).

    .venv/bin/python benchmarks/bench_edge.py [label=spec ...] [--nonuniform] [--threads N]
Writes benchmarks/results/edge.{json,md,png}.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
from _common import RESULTS, environment, write_outputs  # noqa: E402

DTYPES = ("f16", "q8_0", "q4_k_m")
RATIO = 0.3
PP_TOKENS, TG_TOKENS, TG_PROMPT = 128, 64, 8
# The llama.cpp commit vendored in llama-cpp-python 0.3.36 (the sdist's vendor/llama.cpp); the Python package
# does not report it at runtime.
VENDORED = {"0.3.36": "0c1e57098"}


def rora_cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "rora", *args], check=True, cwd=REPO,
                   env={**os.environ, "PYTHONPATH": str(REPO)})


def make_models(work: Path, specs: list[str], nonuniform: str | None) -> dict[str, tuple[str, str]]:
    """label -> (spec, layout). The default prunes come from the CLI, as a user makes them."""
    models = {}
    for item in specs or ["base=smollm2-135m", "pruned=PRUNE"]:
        label, _, spec = item.partition("=")
        if spec == "PRUNE":
            spec = str(work / "pruned")
            rora_cli("prune", "smollm2-135m", "--ratio", str(RATIO), "--importance", "taylor", "--out", spec)
        models[label] = (spec, "compact")
    if nonuniform:
        spec = nonuniform if nonuniform != "PRUNE" else str(work / "pruned-4-26")
        if nonuniform == "PRUNE":
            rora_cli("prune", "smollm2-135m", "--ratio", str(RATIO), "--layers", "4:26", "--importance", "taylor",
                     "--out", spec)
        models["4:26 compact"] = (spec, "compact")
        models["4:26 padded"] = (spec, "padded")
    return models


def export_all(work: Path, models: dict, dtypes, reuse: bool = False) -> list[dict]:
    from rora.config import ExportConfig
    from rora.models import load_model
    from rora.deployment import export_model

    rows = []
    for label, (spec, layout) in models.items():
        model, tok = load_model(spec)
        for dtype in (("q8_0",) if label.startswith("4:26") else dtypes):
            out = work / f"{label.replace(' ', '-').replace(':', '-')}-{dtype}.gguf"
            if reuse and out.is_file():  # an earlier run's verified export (--reuse): measure it again
                from rora.sources.gguf import gguf_metadata

                rows.append({"model": label, "spec": spec, "dtype": dtype, "layout": layout, "path": str(out),
                             "architecture": gguf_metadata(out)["general.architecture"],
                             "size_bytes": out.stat().st_size, "quality": None})
                continue
            t0 = time.perf_counter()
            r = export_model(model, tok, ExportConfig(format="gguf", dtype=dtype, layout=layout), out)
            rows.append({"model": label, "spec": spec, "dtype": dtype, "layout": r.layout, "architecture": r.architecture,
                         "path": str(out), "size_bytes": r.size_bytes, "parameters": r.parameters,
                         "export_s": time.perf_counter() - t0, "llamacpp_max_abs_diff": r.llamacpp["max_abs_diff"],
                         "greedy_match": r.llamacpp["greedy_match"], "quality": r.quality})
            print(f"exported {label} {dtype}: {r.size_bytes / 1e6:.1f} MB, ppl change "
                  f"{r.quality['increase']:+.2%}", flush=True)
        del model
    return rows


def weight_bytes(path: str) -> int:
    from gguf import GGUFReader

    return sum(int(t.n_bytes) for t in GGUFReader(path).tensors)


def speed(path: str, threads: int) -> tuple[float, float]:
    """(prompt tokens/s, generation tokens/s) of one run."""
    import numpy as np

    from rora.deployment.llamacpp import Runner

    rng = np.random.default_rng(0)
    prompt = rng.integers(100, 40000, PP_TOKENS).tolist()
    with Runner(path, n_ctx=PP_TOKENS + TG_TOKENS + TG_PROMPT, logits_all=False, threads=threads) as r:
        r.llm.eval(prompt[:16])  # warm-up: first-touch of the mapped weights
        r.llm.reset()
        t0 = time.perf_counter()
        r.llm.eval(prompt)
        pp = PP_TOKENS / (time.perf_counter() - t0)
        r.llm.reset()
        r.llm.eval(prompt[:TG_PROMPT])
        t0 = time.perf_counter()
        for tok in prompt[TG_PROMPT:TG_PROMPT + TG_TOKENS]:
            r.llm.eval([tok])
        tg = TG_TOKENS / (time.perf_counter() - t0)
    return pp, tg


def measure(rows: list[dict], threads: int, repeats: int) -> None:
    from rora.deployment.gguf import heldout_chunks
    from rora.deployment.llamacpp import perplexity
    from rora.models import load_model

    for row in rows:
        row["pp"], row["tg"] = [], []
        row["weight_bytes"] = weight_bytes(row["path"])
    for _ in range(repeats):
        for row in rows:
            pp, tg = speed(row["path"], threads)
            row["pp"].append(pp)
            row["tg"].append(tg)
    tokenizers = {}
    for row in rows:
        row["pp_tps"], row["tg_tps"] = max(row["pp"]), max(row["tg"])
        if row["spec"] not in tokenizers:
            tokenizers[row["spec"]] = heldout_chunks(load_model(row["spec"])[1])
        row["ppl"] = perplexity(row["path"], tokenizers[row["spec"]])


def table(rows: list[dict]) -> str:
    out = ["| model | dtype | arch | size (MB) | pp tok/s | tg tok/s | held-out ppl | ppl vs same model f16 |",
           "|---|---|---|---|---|---|---|---|"]
    f16 = {r["spec"]: r["ppl"] for r in rows if r["dtype"] == "f16"}
    for r in rows:
        change = f"{r['ppl'] / f16[r['spec']] - 1:+.2%}" if r["spec"] in f16 else "(no f16 file)"
        out.append(f"| {r['model']} | {r['dtype']} | {r['architecture']} | {r['size_bytes'] / 1e6:.1f} | "
                   f"{r['pp_tps']:.0f} | {r['tg_tps']:.1f} | {r['ppl']:.2f} | {change} |")
    return "\n".join(out)


def plot(rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['model']}\n{r['dtype']}" for r in rows]
    fig, axes = plt.subplots(1, 4, figsize=(17, 4))
    for ax, key, title in zip(axes, ("size_bytes", "pp_tps", "tg_tps", "ppl"),
                              ("file size (MB)", "prompt tokens/s", "generation tokens/s", "held-out perplexity")):
        values = [r[key] / 1e6 if key == "size_bytes" else r[key] for r in rows]
        ax.bar(range(len(rows)), values, color=[f"C{list(dict.fromkeys(x['model'] for x in rows)).index(r['model'])}"
                                                for r in rows])
        ax.set_xticks(range(len(rows)), labels, fontsize=7, rotation=60)
        ax.set_title(title)
        if key == "ppl":
            ax.set_yscale("log")
    fig.suptitle("llama.cpp on this CPU: base vs pruned GGUF exports")
    fig.tight_layout()
    fig.savefig(RESULTS / "edge.png", dpi=110)


def goal_lines(rows: list[dict], gains: dict, labels: list[str]) -> list[str]:
    """Issue #14's goal, for the recovered model when there is one (else the first model after the base): >= 1.2x
    the base model's generation tokens/s at q8_0, its held-out perplexity within 5% of its unquantized export's."""
    target = "recovered" if "recovered" in labels else labels[1] if len(labels) > 1 else None
    goal = gains.get(f"{target} q8_0")
    if not goal:
        return []
    quality = next(r for r in rows if r["model"] == target and r["dtype"] == "q8_0").get("quality")
    ppl = (f"; its held-out perplexity {quality['increase']:+.2%} vs its unquantized (f32) export in llama.cpp "
           f"({'within' if quality['increase'] <= 0.05 else 'beyond'} 5%)") if quality else ""
    return ["", f"Goal (issue #14): {target} generates >= 1.2x {labels[0]}'s tokens/s at q8_0: measured "
            f"{goal['tg_speedup']:.2f}x ({'met' if goal['tg_speedup'] >= 1.2 else 'not met'}), "
            f"{goal['share_of_bytes_ratio']:.0%} of the {goal['weight_bytes_ratio']:.2f}x weight-bytes ratio{ppl}."]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", help="label=spec (default: base=smollm2-135m pruned=<30%% Taylor prune>)")
    parser.add_argument("--nonuniform", nargs="?", const="PRUNE", metavar="DIR",
                        help="also a 4:26 prune (made here, or DIR), compact (deci) vs padded, at q8_0")
    parser.add_argument("--threads", type=int, default=1,
                        help="llama.cpp threads (default 1: on shared cores more threads spin at llama.cpp's barriers; "
                             "measured 2.9 vs 22.5 tg tok/s with 2 threads vs 1 on a loaded 2-core machine)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--reuse", action="store_true", help="measure GGUF files already in --work instead of exporting")
    parser.add_argument("--work", help="directory for the models and GGUF files (default: a temporary one)")
    args = parser.parse_args()

    import llama_cpp

    with tempfile.TemporaryDirectory(prefix="bench_edge-") as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        models = make_models(work, args.models, args.nonuniform)
        rows = export_all(work, models, DTYPES, args.reuse)
        measure(rows, args.threads, args.repeats)
    labels = list(models)
    base = {r["dtype"]: r for r in rows if r["model"] == labels[0]}
    gains = {}
    for label in labels[1:]:
        for r in rows:
            if r["model"] == label and r["dtype"] in base:
                b = base[r["dtype"]]
                bytes_ratio = b["weight_bytes"] / r["weight_bytes"]
                speedup = r["tg_tps"] / b["tg_tps"]
                gains[f"{label} {r['dtype']}"] = {
                    "tg_speedup": speedup, "pp_speedup": r["pp_tps"] / b["pp_tps"], "weight_bytes_ratio": bytes_ratio,
                    "share_of_bytes_ratio": speedup / bytes_ratio, "size_ratio": r["size_bytes"] / b["size_bytes"]}
    build = f"llama-cpp-python {llama_cpp.__version__} (llama.cpp {VENDORED.get(llama_cpp.__version__, 'unknown')})"
    system = llama_cpp.llama_print_system_info().decode().strip()
    lines = [table(rows), "", "| vs " + labels[0] + " | tg speedup | pp speedup | weight-bytes ratio | "
             "tg speedup / bytes ratio | file size |", "|---|---|---|---|---|---|"]
    for key, g in gains.items():
        lines.append(f"| {key} | {g['tg_speedup']:.2f}x | {g['pp_speedup']:.2f}x | {g['weight_bytes_ratio']:.2f}x | "
                     f"{g['share_of_bytes_ratio']:.0%} | {g['size_ratio']:.2f}x |")
    lines += goal_lines(rows, gains, labels)
    RESULTS.mkdir(parents=True, exist_ok=True)
    plot(rows)
    cmd = "python benchmarks/bench_edge.py " + " ".join(sys.argv[1:])
    setting = (f"{build}, {args.threads} threads, best of {args.repeats}; pp {PP_TOKENS} tokens, tg {TG_TOKENS} "
               f"tokens; f32 KV cache; system: {system}")
    for r in rows:
        r.pop("pp_all", None)
    write_outputs("edge", title="Edge: llama.cpp size, speed and perplexity", command=cmd, setting=setting,
                  table="\n".join(lines), data={"rows": rows, "gains": gains, "llama_cpp": build,
                                                "system_info": system, "environment": environment()},
                  images=["edge.png"])
    print("\n".join(lines))


if __name__ == "__main__":
    main()
