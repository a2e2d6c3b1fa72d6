"""Assemble BENCHMARKS.md from the sections the benchmark scripts write (benchmarks/results/<name>.md).

    python benchmarks/assemble.py
"""
from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).parent
# the claims first, then the speed figures, then the device
ORDER = ("reconstruct", "reconstruct_200", "prune_layers", "demo_text", "writing", "writing_obs", "writing_obs_mlp", "writing_mlp_only", "objectives", "rank_sweep", "rank_kd",
         "text_budget", "lr_auto", "recover", "distill", "distill_checkpointing", "distill_data", "eval", "loglik",
         "precision", "train_precision", "prune", "edge", "gpu", "gpu_recovery")
INTRO = """# Benchmarks

Every figure below was measured by the scripts in `benchmarks/` on this repository's code; each section names the
machine, the package versions, the date and the exact command. Comparisons run side by side in one run and are
reported as ratios, since absolute times on shared 2-core machines are noisy. Regenerate this file with
`python benchmarks/assemble.py` after running the scripts.

Not yet measured: the rank sweep's `--full` setting, everything on a GPU (issue #22: `bench_gpu.py` for throughput
and memory, `bench_loglik.py --device cuda` for the evaluation engines, `bench_gpu_recovery.py` for a recovery at
~1000x the demo's budget; each written and tested on CPU at a tiny size, waiting for a session with a GPU, with
`tools/device_carry.py` to carry the model, data and wheels there), the text-budget benchmark's larger budget
(`bench_text_budget.py` ran at 5k and 20k training tokens; 80k is next). No GPU was lent to the sessions that made
these figures; the recovery scripts train through accelerate, which picks up a GPU (and bf16) unchanged; the edge scripts and bench_eval.py are CPU-only
as written. Where a goal is out of reach on this CPU, the section says how far any implementation could go here
(FLOPs it must do at the measured matmul peak).
"""


def main() -> None:
    sections = [HERE / "results" / f"{name}.md" for name in ORDER]
    missing = [s.stem for s in sections if not s.is_file()]
    body = [_with_plot(s) for s in sections if s.is_file()]
    if missing:
        body.append("## Not yet measured\n\n" + ", ".join(missing))
    (HERE.parent / "BENCHMARKS.md").write_text(INTRO + "\n" + "\n\n".join(body) + "\n")


def _with_plot(section: Path) -> str:
    """The section's text, with its PNG shown when the script did not link it itself."""
    text = section.read_text().strip()
    png = section.with_suffix(".png")
    if png.is_file() and png.name not in text:
        text += f"\n\n![{section.stem}](benchmarks/results/{png.name})"
    return text


if __name__ == "__main__":
    main()
