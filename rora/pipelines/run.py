"""run_pipeline(config): the stages in order, each writing its own directory, skipping what is already done.

    base model -> eval_base -> prune -> eval_pruned -> recover -> merge -> eval_recovered -> export

Objects flow in memory from stage to stage; nothing is re-read from disk unless a stage was skipped because a
previous run already finished it. A stage is done when `<out>/stages/<stage>.json` exists and its fingerprint (a
hash of the stage's config and of every upstream fingerprint) matches the current config: change the rank and the
recovery, merge, evaluation and export stages rerun while pruning is kept. A recovery stage that crashed mid-way
resumes from its last checkpoint.

The recovered model is evaluated after merging: the merge stage proves (logits within 1e-4 in fp32) that the
merged model computes what the adapter model computes, and the merged model is faster to evaluate.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..artifacts import count_parameters, dir_size, read_json, write_json
from ..config import PipelineConfig
from ..errors import ConfigError

SUMMARY_LABELS = {"eval_base": "base", "eval_pruned": "pruned", "eval_recovered": "recovered"}


@dataclass
class PipelineResult:
    """What a pipeline run produced: accuracies per evaluated model, parameters, sizes, time per stage."""

    out: Path
    evals: dict = field(default_factory=dict)  # "base" | "pruned" | "recovered" -> {task: accuracy, "average": ...}
    parameters: dict = field(default_factory=dict)
    sizes: dict = field(default_factory=dict)  # bytes on disk of the stage outputs
    stages: dict = field(default_factory=dict)  # stage -> {"seconds": float, "skipped": bool}
    evaluation: str = ""  # how the accuracies were measured, e.g. "lm-eval, first 40 examples per task"
    model: object = None  # the final (merged) model, in memory
    tokenizer: object = None

    def to_dict(self) -> dict:
        return {
            "out": str(self.out),
            "evals": self.evals,
            "parameters": self.parameters,
            "sizes": self.sizes,
            "stages": self.stages,
            "evaluation": self.evaluation,
        }


class _Stages:
    """Bookkeeping for done-markers and fingerprints."""

    def __init__(self, out: Path, say: Callable[[str], None]):
        self.out, self.say = out, say
        (out / "stages").mkdir(parents=True, exist_ok=True)
        self.timings: dict[str, dict] = {}

    def fingerprint(self, stage: str, *parts) -> str:
        blob = json.dumps([stage, *parts], sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def done(self, stage: str, fp: str) -> dict | None:
        marker = self.out / "stages" / f"{stage}.json"
        if marker.is_file():
            data = read_json(marker)
            if data.get("fingerprint") == fp:
                self.say(f"[{stage}] done in an earlier run (fingerprint {fp}); skipping")
                self.timings[stage] = {"seconds": data.get("seconds", 0.0), "skipped": True}
                return data
        return None

    def interrupted(self, stage: str, fp: str) -> bool:
        """An earlier run started this very stage (same fingerprint) and did not finish it."""
        started = self.out / "stages" / f"{stage}.started.json"
        return started.is_file() and read_json(started).get("fingerprint") == fp

    def run(self, stage: str, fp: str, fn: Callable[[], dict | None]) -> dict:
        self.say(f"[{stage}] running")
        write_json(self.out / "stages" / f"{stage}.started.json", {"fingerprint": fp})
        start = time.perf_counter()
        extra = fn() or {}
        seconds = time.perf_counter() - start
        write_json(self.out / "stages" / f"{stage}.json", {"fingerprint": fp, "seconds": seconds, **extra})
        self.timings[stage] = {"seconds": seconds, "skipped": False}
        self.say(f"[{stage}] finished in {seconds:.1f} s")
        return extra


def run_pipeline(config: PipelineConfig, *, say: Callable[[str], None] = lambda msg: None, progress: bool = True) -> PipelineResult:
    """Run every stage of `config` not in `config.skip`; returns the summary and the final model in memory."""
    from ..models import load_model

    out = Path(config.out)
    data_dir = config.data_dir or os.environ.get("RORA_DATA_DIR")
    train_data = config.data or data_dir
    if config.runs("recover") and not train_data:
        raise ConfigError("pipeline.data is not set and RORA_DATA_DIR is empty: name the recovery training data")
    st = _Stages(out, say)
    result = PipelineResult(out=out, evaluation=f"{config.eval.protocol}, " + (
        f"first {config.eval.limit} examples per task" if config.eval.limit else "all examples"))

    model, tok = load_model(config.model, allow_pickle=config.allow_pickle)
    result.parameters["base"] = count_parameters(model)
    fp = st.fingerprint("model", config.model)
    eval_cfg = config.eval.to_dict()

    def evaluate_stage(stage: str, upstream: str, model_name: str) -> None:
        if not config.runs(stage):
            return
        from ..evaluation.evaluate import evaluate

        sfp = st.fingerprint(stage, upstream, eval_cfg, data_dir)
        target = out / stage / "results.json"
        data = st.done(stage, sfp)
        if data is None:
            def work():
                res = evaluate(model, tok, config.eval, data_dir=data_dir, out=target, model_name=model_name, progress=progress)
                return {"accuracy": {t: r["accuracy"] for t, r in res.per_task.items()}, "average": res.average}

            data = st.run(stage, sfp, work)
        result.evals[SUMMARY_LABELS[stage]] = {**data["accuracy"], "average": data["average"]}

    evaluate_stage("eval_base", fp, config.model)
    # The recovery's teacher (kd) and the reference of its held-out KL (every objective): the unpruned base model.
    # One untouched copy, since pruning works in place and PEFT wraps the student in place.
    teacher = None

    if config.runs("prune"):
        from ..pruning.prune import prune, save_pruned

        fp = st.fingerprint("prune", fp, config.prune.to_dict())
        pruned_dir = out / "pruned"
        if st.done("prune", fp):
            teacher = model if config.runs("recover") else None  # the pruned model comes from disk: no copy needed
            model, tok = load_model(pruned_dir)
        else:
            teacher = copy.deepcopy(model) if config.runs("recover") else None
            def work():
                report = prune(model, tok, config.prune)
                save_pruned(model, tok, report, pruned_dir, overwrite=True, source=config.model)
                return {"report": report.to_dict()}

            st.run("prune", fp, work)
        result.sizes["pruned"] = dir_size(pruned_dir)
    result.parameters["pruned"] = count_parameters(model)
    evaluate_stage("eval_pruned", fp, str(out / "pruned") if config.runs("prune") else config.model)

    if config.runs("recover"):
        if teacher is None:  # no pruning: distil the base model into an adapter on a copy of itself
            teacher = copy.deepcopy(model)
        model, fp = _recover_stage(config, st, fp, model, tok, train_data, progress, teacher)
        model, fp = _merge_stage(config, st, fp, model, tok)
        result.sizes["merged"] = dir_size(out / "merged")
        evaluate_stage("eval_recovered", fp, str(out / "merged"))

    if config.runs("export"):
        from .export import export

        efp = st.fingerprint("export", fp, config.export.to_dict())
        export_path = out / ("export" if config.export.format == "hf" else "model.gguf")
        if not st.done("export", efp):
            from .card import card_from_dir

            card = {"base_model": config.model, "evaluation": result.evals, "parameters": result.parameters,
                    "recover": config.recover.to_dict() if config.runs("recover") else None,
                    **card_from_dir(out / "pruned"), **card_from_dir(out / "merged")}
            st.run("export", efp, lambda: {"path": str(export(model, tok, config.export, export_path, overwrite=True, card=card))})
        result.sizes["export"] = dir_size(export_path)

    result.stages = st.timings
    result.model, result.tokenizer = model, tok
    write_summary(result)
    return result


def _recover_stage(config, st: _Stages, fp: str, model, tok, train_data, progress: bool, teacher=None):
    from peft import PeftModel

    from ..recovery.trainer import recover

    fp = st.fingerprint("recover", fp, config.recover.to_dict(), train_data)
    rec_dir = st.out / "recovery"
    if st.done("recover", fp):
        return PeftModel.from_pretrained(model, rec_dir / "adapter"), fp
    # An earlier run of these very settings crashed mid-way: continue from its checkpoints instead of starting over.
    resume = st.interrupted("recover", fp) and any((rec_dir / "checkpoints").glob("step-*"))
    holder = {}

    def work():
        data = None if config.recover.text else train_data  # a text file replaces the records
        res = recover(model, tok, data, config.recover, rec_dir, resume=resume, overwrite=not resume,
                      progress=progress, source=str(st.out / "pruned") if config.runs("prune") else config.model,
                      teacher=teacher)
        holder["model"] = res.model
        return {"best_val_loss": res.best_val_loss, "best_step": res.best_step, "effective_scale": res.effective_scale}

    st.run("recover", fp, work)
    return holder["model"], fp


def _merge_stage(config, st: _Stages, fp: str, model, tok):
    from ..models import load_model
    from ..recovery.merge import merge, save_merged

    fp = st.fingerprint("merge", fp, config.merge.to_dict())
    merged_dir = st.out / "merged"
    if st.done("merge", fp):
        return load_model(merged_dir)[0], fp
    holder = {}

    def work():
        merged, report = merge(model, config=config.merge)
        save_merged(merged, tok, report, merged_dir, overwrite=True, source=str(st.out / "recovery" / "adapter"))
        holder["model"] = merged
        return {"report": report.to_dict()}

    st.run("merge", fp, work)
    return holder["model"], fp


def summary_table(result: PipelineResult) -> str:
    """Markdown: per-task accuracy of each evaluated model, then parameters, sizes and stage times."""
    labels = [k for k in ("base", "pruned", "recovered") if k in result.evals]
    lines = []
    if labels:
        lines += [f"Accuracy (%), {result.evaluation}:", ""]
        tasks = [t for t in next(iter(result.evals.values())) if t != "average"]
        lines += ["| task | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
        for t in [*tasks, "average"]:
            row = [f"{100 * result.evals[k].get(t, float('nan')):.1f}" for k in labels]
            lines.append(f"| {'**average**' if t == 'average' else t} | " + " | ".join(row) + " |")
        lines.append("")
    for name, n in result.parameters.items():
        lines.append(f"- parameters, {name}: {n:,} ({n / 1e6:.1f}M)")
    for name, b in result.sizes.items():
        lines.append(f"- size on disk, {name}: {b / 2**20:.1f} MiB")
    for stage, t in result.stages.items():
        lines.append(f"- time, {stage}: {t['seconds']:.1f} s{' (done earlier)' if t['skipped'] else ''}")
    return "\n".join(lines)


def write_summary(result: PipelineResult) -> None:
    """summary.json, summary.md and summary.png (accuracy per task for base, pruned and recovered)."""
    write_json(result.out / "summary.json", result.to_dict())
    (result.out / "summary.md").write_text(summary_table(result) + "\n")
    if result.evals:
        plot_summary(result.evals, result.out / "summary.png", result.evaluation)


def plot_summary(evals: dict, path: Path, evaluation: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(evals)
    tasks = [t for t in evals[labels[0]] if t != "average"] + ["average"]
    width = 0.8 / len(labels)
    fig, ax = plt.subplots(figsize=(1.1 * len(tasks) + 2, 4))
    for i, label in enumerate(labels):
        xs = [j + (i - (len(labels) - 1) / 2) * width for j in range(len(tasks))]
        ax.bar(xs, [100 * evals[label].get(t, 0.0) for t in tasks], width, label=label)
    ax.set_xticks(range(len(tasks)), tasks, rotation=30, ha="right")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("Accuracy before pruning, after pruning, after recovery" + (f" ({evaluation})" if evaluation else ""))
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
