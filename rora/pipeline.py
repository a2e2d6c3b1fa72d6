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
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .artifacts import check_output, count_parameters, dir_size, read_json, write_json
from .config import PipelineConfig
from .errors import ConfigError, OutputError, OutputExistsError
from .evaluation.stats import accuracy_table, gap_closed, outcomes_from_records, paired_difference

SUMMARY_LABELS = {"eval_base": "base", "eval_pruned": "pruned", "eval_recovered": "recovered"}


@dataclass
class PipelineResult:
    """What a pipeline run produced: accuracies per evaluated model, parameters, sizes, time per stage."""

    out: Path
    evals: dict = field(default_factory=dict)  # "base" | "pruned" | "recovered" -> {task: accuracy, "average": ...}
    outcomes: dict = field(default_factory=dict)  # the same labels -> {task: [0/1 per example]}, to recompute anything
    heldout: dict = field(default_factory=dict)  # the same labels -> {"loss", "kl", "tokens"} on held-out text
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
            **evaluation_statistics(self.outcomes),
            "heldout": self.heldout,
            **heldout_statistics(self.heldout),
            "outcomes": self.outcomes,
            "parameters": self.parameters,
            "sizes": self.sizes,
            "stages": self.stages,
            "evaluation": self.evaluation,
        }


class _Stages:
    """Bookkeeping for done-markers and fingerprints."""

    def __init__(self, out: Path, say: Callable[[str], None], fresh: bool = False):
        self.out, self.say, self.fresh = out, say, fresh  # fresh: --overwrite, every stage runs again
        (out / "stages").mkdir(parents=True, exist_ok=True)
        self.timings: dict[str, dict] = {}

    def fingerprint(self, stage: str, *parts) -> str:
        blob = json.dumps([stage, *parts], sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def done(self, stage: str, fp: str) -> dict | None:
        marker = self.out / "stages" / f"{stage}.json"
        if marker.is_file() and not self.fresh:
            data = read_json(marker)
            if data.get("fingerprint") == fp:
                self.say(f"[{stage}] done in an earlier run (fingerprint {fp}); skipping")
                self.timings[stage] = {"seconds": data.get("seconds", 0.0), "skipped": True}
                return data
        return None

    def interrupted(self, stage: str, fp: str) -> bool:
        """An earlier run started this very stage (same fingerprint) and did not finish it."""
        started = self.out / "stages" / f"{stage}.started.json"
        return not self.fresh and started.is_file() and read_json(started).get("fingerprint") == fp

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


def run_pipeline(config: PipelineConfig, *, say: Callable[[str], None] = lambda msg: None, progress: bool = True,
                 overwrite: bool = False) -> PipelineResult:
    """Run every stage of `config` not in `config.skip`; returns the summary and the final model in memory.

    A rerun into the same `config.out` skips finished stages and resumes an interrupted recovery; an existing
    `out` that is not a rora run is refused unless `overwrite`, which also reruns every stage (each stage's
    output is replaced only once its new one is complete). Every input is checked before anything is written."""
    from .models import load_model

    config = PipelineConfig.coerce(config)
    out = Path(config.out)
    check_run_output(out, overwrite, inputs=[config.model, config.data, config.data_dir])
    data_dir = config.data_dir or os.environ.get("RORA_DATA_DIR")
    train_data = config.data or data_dir
    if config.runs("recover") and not train_data:
        raise ConfigError("pipeline.data is not set and RORA_DATA_DIR is empty: name the recovery training data")
    records = check_inputs(config, data_dir, train_data)
    result = PipelineResult(out=out, evaluation=describe_evaluation(config.eval))

    model, tok = load_model(config.model, allow_pickle=config.allow_pickle)
    st = _Stages(out, say, fresh=overwrite)  # only now, with every input known good, is anything created
    result.parameters["base"] = count_parameters(model)
    fp = st.fingerprint("model", config.model)
    eval_cfg = config.eval.to_dict()
    heldout_texts = heldout_records(config, records)
    heldout_key = [train_data, config.recover.val_set_size, config.recover.seed, config.recover.cutoff_len]

    def evaluate_stage(stage: str, upstream: str, model_name: str, reference=None) -> None:
        """Accuracy on the suite, and whole-text loss and KL to the base model (`reference`; None for the base
        itself) on the held-out records."""
        if not config.runs(stage):
            return
        from .evaluation.evaluate import evaluate

        sfp = st.fingerprint(stage, upstream, eval_cfg, data_dir, "outcomes", heldout_key)
        target = out / stage / "results.json"
        data = st.done(stage, sfp)
        if data is None:
            def work():
                res = evaluate(model, tok, config.eval, data_dir=data_dir, out=target, model_name=model_name, progress=progress)
                return {"accuracy": {t: r["accuracy"] for t, r in res.per_task.items()}, "average": res.average,
                        "outcomes": outcomes_from_records(res.records),
                        "heldout": _heldout(model, reference, tok, heldout_texts, config.recover.cutoff_len)}

            data = st.run(stage, sfp, work)
        label = SUMMARY_LABELS[stage]
        result.evals[label] = {**data["accuracy"], "average": data["average"]}
        result.outcomes[label] = data["outcomes"]
        if data.get("heldout"):
            result.heldout[label] = data["heldout"]

    evaluate_stage("eval_base", fp, config.model)
    # The recovery's teacher (kd) and the reference of its held-out KL (every objective): the unpruned base model.
    # One untouched copy, since pruning works in place and PEFT wraps the student in place.
    teacher = None

    if config.runs("prune"):
        from .pruning.prune import prune, save_pruned

        fp = st.fingerprint("prune", fp, config.prune.to_dict())
        pruned_dir = out / "pruned"
        if st.done("prune", fp):
            teacher = model  # the pruned model comes from disk: no copy needed
            model, tok = load_model(pruned_dir)
        else:
            teacher = copy.deepcopy(model) if config.runs("recover") or config.runs("eval_pruned") else None
            def work():
                report = prune(model, tok, config.prune)
                save_pruned(model, tok, report, pruned_dir, overwrite=True, source=config.model)
                return {"report": report.to_dict()}

            st.run("prune", fp, work)
        result.sizes["pruned"] = dir_size(pruned_dir)
    result.parameters["pruned"] = count_parameters(model)
    evaluate_stage("eval_pruned", fp, str(out / "pruned") if config.runs("prune") else config.model, teacher)

    if config.runs("recover"):
        if teacher is None:  # no pruning: distil the base model into an adapter on a copy of itself
            teacher = copy.deepcopy(model)
        model, fp = _recover_stage(config, st, fp, model, tok, train_data, progress, teacher)
        model, fp = _merge_stage(config, st, fp, model, tok)
        result.sizes["merged"] = dir_size(out / "merged")
        evaluate_stage("eval_recovered", fp, str(out / "merged"), teacher)

    if config.runs("export"):
        from .export import export

        efp = st.fingerprint("export", fp, config.export.to_dict())
        export_path = out / ("export" if config.export.format == "hf" else "model.gguf")
        if not st.done("export", efp):
            from .export.card import card_from_dir

            card = {"base_model": config.model, "evaluation": result.evals, "parameters": result.parameters,
                    "recover": config.recover.to_dict() if config.runs("recover") else None,
                    **card_from_dir(out / "pruned"), **card_from_dir(out / "merged")}
            st.run("export", efp, lambda: {"path": str(export(model, tok, config.export, export_path, overwrite=True, card=card))})
        result.sizes["export"] = dir_size(export_path)

    result.stages = st.timings
    result.model, result.tokenizer = model, tok
    write_summary(result)
    return result


def describe_evaluation(cfg) -> str:
    """How the accuracies were measured, for the summary's headline."""
    subset = (f"first {cfg.limit} examples per task" if cfg.limit else
              f"a random {cfg.sample} examples per task (seed {cfg.seed})" if cfg.sample else "all examples")
    return f"{cfg.protocol}, {subset}"


def heldout_records(config: PipelineConfig, records: list[dict] | None) -> list[dict] | None:
    """The recovery's validation records (carved from its training records, never a test set): the held-out text
    on which every evaluated model's whole-text loss and KL to the base model are measured. None without them."""
    if not records:
        return None
    from .recovery.data import split_train_val

    rc = config.recover
    return split_train_val(records, rc.val_set_size, rc.seed, rc.max_train_examples)[1] or None


def _heldout(model, reference, tok, texts, cutoff_len: int) -> dict | None:
    if not texts:
        return None
    from .recovery.distill import heldout_metrics

    found = heldout_metrics(model, reference, tok, texts, cutoff_len=cutoff_len)
    return {**found, "kl": 0.0 if reference is None else found["kl"]}  # the base model is its own reference


def check_run_output(out: Path, overwrite: bool = False, inputs=()) -> None:
    """A rora run (it holds stages/) or an empty directory may be run into again; anything else needs --overwrite."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} is a file; a run needs a directory")
    ours = out.is_dir() and ((out / "stages").is_dir() or not any(out.iterdir()))
    if out.exists() and not ours and not overwrite:
        raise OutputExistsError(f"{out} already exists and is not a rora run; pass --overwrite to run into it "
                                "(or choose another --out)")
    check_output(out, overwrite=True, inputs=[i for i in inputs if i])


def check_inputs(config: PipelineConfig, data_dir, train_data) -> list[dict] | None:
    """Fail on missing or malformed training and evaluation data before the first stage, not after three.
    Returns the training records when recovery runs (None otherwise), so they are read once."""
    records = None
    if config.runs("recover"):
        from .recovery.data import load_records

        records = load_records(train_data)
    if any(config.runs(s) for s in SUMMARY_LABELS):
        from .evaluation.data import load_examples, resolve_data_dir
        from .evaluation.tasks import get_task

        resolved = resolve_data_dir(data_dir)
        if resolved is not None and config.eval.protocol != "lm-eval":  # lm-eval falls back to the hub per task
            for name in config.eval.tasks:
                load_examples(get_task(name), resolved, config.eval.limit)
    return records


def _recover_stage(config, st: _Stages, fp: str, model, tok, train_data, progress: bool, teacher=None):
    from peft import PeftModel

    from .recovery.trainer import recover

    fp = st.fingerprint("recover", fp, config.recover.to_dict(), train_data)
    rec_dir = st.out / "recovery"
    if st.done("recover", fp):
        return PeftModel.from_pretrained(model, rec_dir / "adapter"), fp
    # An earlier run of these very settings crashed mid-way: continue from its checkpoints (if it left any) instead
    # of starting over. Either way the new run replaces an older recovery only once it is complete.
    resume = st.interrupted("recover", fp)
    holder = {}

    def work():
        data = None if config.recover.text else train_data  # a text file replaces the records
        res = recover(model, tok, data, config.recover, rec_dir, resume=resume, overwrite=True,
                      progress=progress, source=str(st.out / "pruned") if config.runs("prune") else config.model,
                      teacher=teacher)
        holder["model"] = res.model
        return {"best_val_loss": res.best_val_loss, "best_step": res.best_step, "effective_scale": res.effective_scale}

    st.run("recover", fp, work)
    return holder["model"], fp


def _merge_stage(config, st: _Stages, fp: str, model, tok):
    from .models import load_model
    from .recovery.merge import merge, save_merged

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


COMPARISONS = (("recovered", "pruned"), ("recovered", "base"), ("pruned", "base"))


def evaluation_statistics(outcomes: dict) -> dict:
    """Standard errors per model, paired differences between models scored on the same examples, and the share
    of the pruning gap in average accuracy that recovery closed."""
    if not outcomes:
        return {}
    stats = {"accuracy": {label: accuracy_table(o) for label, o in outcomes.items()}, "comparisons": {}}
    for b, a in COMPARISONS:
        if a in outcomes and b in outcomes and list(outcomes[a]) == list(outcomes[b]):
            stats["comparisons"][f"{b} - {a}"] = paired_difference(outcomes[a], outcomes[b])
    if {"base", "pruned", "recovered"} <= set(outcomes):
        avg = {k: stats["accuracy"][k]["average"]["accuracy"] for k in ("base", "pruned", "recovered")}
        stats["gap_closed"] = {"accuracy": gap_closed(avg["base"], avg["pruned"], avg["recovered"])}
    return stats


def heldout_statistics(heldout: dict) -> dict:
    """The share of the pruning gap in held-out loss that recovery closed (its KL is in `heldout` itself)."""
    if not {"base", "pruned", "recovered"} <= set(heldout):
        return {}
    return {"heldout_gap_closed": {"loss": gap_closed(*(heldout[k]["loss"] for k in ("base", "pruned", "recovered")))}}


def _pm(x: float, se: float, signed: bool = False) -> str:
    value = f"{100 * x:+.1f}" if signed else f"{100 * x:.1f}"
    return value if se != se else f"{value} ± {100 * se:.1f}"


def summary_table(result: PipelineResult) -> str:
    """Markdown: per-task accuracy ± standard error of each evaluated model and the paired differences (marked *
    beyond two standard errors), then the gap closed, parameters, sizes and stage times."""
    stats = evaluation_statistics(result.outcomes)
    lines = []
    if stats:
        acc, comps = stats["accuracy"], stats["comparisons"]
        labels = list(acc)
        tasks = list(acc[labels[0]])
        lines += [f"Accuracy (%, ± standard error), {result.evaluation}:", ""]
        head = ["task", *labels, *comps]
        lines += ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
        for t in tasks:
            row = [_pm(acc[k][t]["accuracy"], acc[k][t]["se"]) for k in labels]
            row += [_pm(c[t]["difference"], c[t]["se"], signed=True) + (" *" if c[t]["significant"] else "")
                    for c in comps.values()]
            lines.append(f"| {'**average**' if t == 'average' else t} | " + " | ".join(row) + " |")
        lines += ["", "Differences are paired (same examples); * marks those larger than two standard errors. "
                  "Anything without * is inside the noise."]
        if stats.get("gap_closed", {}).get("accuracy") is not None:
            lines.append(f"Share of the pruning gap in average accuracy closed by recovery: "
                         f"{100 * stats['gap_closed']['accuracy']:.0f}%.")
        lines.append("")
    if result.heldout:
        lines += ["Held-out text (the recovery's validation records), per token:", "",
                  "| model | whole-text loss | perplexity | KL to base (nats) |", "|---|---|---|---|"]
        for label, h in result.heldout.items():
            kl = "-" if h.get("kl") is None else f"{h['kl']:.3f}"
            lines.append(f"| {label} | {h['loss']:.3f} | {math.exp(min(h['loss'], 50)):.1f} | {kl} |")
        closed = heldout_statistics(result.heldout).get("heldout_gap_closed", {})
        if closed.get("loss") is not None:
            lines += ["", f"Share of the pruning gap in held-out loss closed by recovery: {100 * closed['loss']:.0f}%."]
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
    if result.outcomes:
        plot_summary(evaluation_statistics(result.outcomes)["accuracy"], result.out / "summary.png", result.evaluation)


def plot_summary(accuracy: dict, path: Path, evaluation: str = "") -> None:
    """Bars of accuracy per task and model, error bars of one standard error."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(accuracy)
    tasks = list(accuracy[labels[0]])
    width = 0.8 / len(labels)
    fig, ax = plt.subplots(figsize=(1.1 * len(tasks) + 2, 4))
    for i, label in enumerate(labels):
        xs = [j + (i - (len(labels) - 1) / 2) * width for j in range(len(tasks))]
        ys = [100 * accuracy[label][t]["accuracy"] for t in tasks]
        errs = [100 * accuracy[label][t]["se"] for t in tasks]
        ax.bar(xs, ys, width, yerr=errs, capsize=2, label=label)
    ax.set_xticks(range(len(tasks)), tasks, rotation=30, ha="right")
    ax.set_ylabel("accuracy (%), ± 1 standard error")
    ax.set_title("Before pruning, after pruning, after recovery" + (f"\n{evaluation}" if evaluation else ""),
                 fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
