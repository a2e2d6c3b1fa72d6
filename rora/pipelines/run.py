"""run_pipeline(config): the stages in order, each writing its own directory, skipping what is already done.

    base model -> eval_base -> prune -> eval_pruned -> reconstruct -> eval_reconstructed -> recover -> merge
               -> eval_recovered -> export

The stages are the rows of STAGES: each names what its fingerprint covers, runs (inputs -> outputs and the record
kept in `<out>/stages/<stage>.json`) and, when an earlier run finished it, restores its outputs from disk. What
flows between them (the model, the base model as teacher and reference, the upstream fingerprint) is a _Flow.
Objects flow in memory from stage to stage; nothing is re-read from disk unless a stage was skipped because a
previous run already finished it. A stage is done when `<out>/stages/<stage>.json` exists and its fingerprint (a
hash of the stage's config and of every upstream fingerprint) matches the current config: change the rank and the
recovery, merge, evaluation and export stages rerun while pruning is kept. A recovery stage that crashed mid-way
resumes from its last checkpoint. That file is only bookkeeping (fingerprint, seconds, an evaluation's results):
what a stage did is in its own directory's manifest (artifacts.Manifest).

The recovered model is evaluated after merging: the merge stage proves (logits within 1e-4 in fp32) that the
merged model computes what the adapter model computes, and the merged model is faster to evaluate.
"""
from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..artifacts import (changed_inputs, check_apart, check_writable, count_parameters, dir_size, fingerprint,
                        is_stage_output, read_json, read_manifest, write_json)
from ..config import PipelineConfig
from ..errors import ConfigError, OutputError, OutputExistsError, RoraError
from ..evaluation.stats import accuracy_table, outcomes_from_records
from ..registry import BUILTIN_CALIBRATION, CALIBRATION_TEXTS, PIPELINE_STAGES
from .summary import evaluation_statistics, heldout_statistics, repetition_warning, write_summary

SUMMARY_LABELS = {"eval_base": "base", "eval_pruned": "pruned", "eval_reconstructed": "reconstructed",
                  "eval_recovered": "recovered"}
# Stages whose record holds the held-out figures (prose, records) of the model they made when its evaluation is
# skipped, so the summary still shows that stage's share of the gap.
MEASURED_LABELS = {"reconstruct": "reconstructed"}
EVAL_RECORD = {"accuracy": dict, "average": (int, float), "outcomes": dict}  # what an evaluation's record must hold


@dataclass
class PipelineResult:
    """What a pipeline run produced: accuracies per evaluated model, parameters, sizes, time per stage."""

    out: Path
    evals: dict = field(default_factory=dict)  # "base" | "pruned" | "recovered" -> {task: accuracy, "average": ...}
    outcomes: dict = field(default_factory=dict)  # the same labels -> {task: [0/1 per example]}, to recompute anything
    heldout: dict = field(default_factory=dict)  # the same labels -> {"loss", "kl", "tokens"} on held-out records
    prose: dict = field(default_factory=dict)  # the same labels -> {"loss", "perplexity", "kl", "tokens", ...}
    generation: dict = field(default_factory=dict)  # the same labels -> generation quality (quality.generation_quality)
    recovery: dict = field(default_factory=dict)  # the learning rate (and --lr auto's probes), the text trained on
    parameters: dict = field(default_factory=dict)
    sizes: dict = field(default_factory=dict)  # bytes on disk of the stage outputs
    stages: dict = field(default_factory=dict)  # stage -> {"seconds": float, "skipped": bool}
    evaluation: str = ""  # how the accuracies were measured, e.g. "lm-eval, first 40 examples per task"
    model: object = None  # the final (merged) model, in memory
    tokenizer: object = None

    def collect(self, label: str, record: dict) -> None:
        """An evaluation stage's record (or a MEASURED_LABELS stage's: held-out figures only), run now or read back
        from its done marker."""
        if "accuracy" in record:
            self.evals[label] = {**record["accuracy"], "average": record["average"]}
            self.outcomes[label] = record["outcomes"]
        if record.get("heldout"):
            self.heldout[label] = record["heldout"]
        if record.get("prose"):
            self.prose[label] = record["prose"]
        if record.get("generation"):
            self.generation[label] = record["generation"]

    def to_dict(self) -> dict:
        return {
            "out": str(self.out),
            "evals": self.evals,
            **evaluation_statistics(self.outcomes),
            "heldout": self.heldout,
            "prose": self.prose,
            **heldout_statistics(self.heldout, self.prose),
            "generation": self.generation,
            "generation_warning": repetition_warning(self.generation),
            "recovery": self.recovery,
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

    def record(self, name: str) -> dict | None:
        """stages/NAME.json; None when it is missing or unreadable (the stage then simply runs again)."""
        path = self.out / "stages" / f"{name}.json"
        try:
            data = read_json(path) if path.is_file() and not self.fresh else None
        except RoraError:
            self.say(f"[{name}] {path} is unreadable; not trusting it")
            return None
        return data if isinstance(data, dict) else None

    def done(self, stage: str, fp: str, output: Path | None = None, shape: dict | None = None) -> dict | None:
        """The record of an earlier run that finished this very stage (same fingerprint), when it holds the keys
        and types of `shape` and the stage's `output` is still what that run wrote; else None."""
        data = self.record(stage)
        if data is None or data.get("fingerprint") != fp:
            return None
        if not all(isinstance(data.get(k), types) for k, types in (shape or {}).items()):
            self.say(f"[{stage}] its record is malformed; running it again")
            return None
        if output is not None and not _intact(output, data.get("output_fingerprint")):
            self.say(f"[{stage}] {output} is gone or changed since it was written; running it again")
            return None
        self.say(f"[{stage}] done in an earlier run (fingerprint {fp}); skipping")
        self.timings[stage] = {"seconds": data.get("seconds", 0.0), "skipped": True}
        return data

    def interrupted(self, stage: str, fp: str) -> bool:
        """An earlier run started this very stage (same fingerprint) and did not finish it."""
        return (self.record(f"{stage}.started") or {}).get("fingerprint") == fp

    def run(self, stage: str, fp: str, fn: Callable[..., dict | None], *args, output: Path | None = None) -> dict:
        """`fn(*args)`, timed, between a started marker and the done marker that keeps its record (with the
        fingerprint of the `output` it wrote)."""
        self.say(f"[{stage}] running")
        write_json(self.out / "stages" / f"{stage}.started.json", {"fingerprint": fp})
        start = time.perf_counter()
        extra = fn(*args) or {}
        seconds = time.perf_counter() - start
        written = {"output_fingerprint": fingerprint(output)} if output is not None else {}
        write_json(self.out / "stages" / f"{stage}.json", {"fingerprint": fp, "seconds": seconds, **extra, **written})
        self.timings[stage] = {"seconds": seconds, "skipped": False}
        self.say(f"[{stage}] finished in {seconds:.1f} s")
        return extra


@dataclass
class _Context:
    """What every stage may read: the run's settings, where it writes, and the result it fills in."""

    config: PipelineConfig
    stages: _Stages
    data_dir: str | None  # evaluation data
    train_data: str | None  # recovery records
    records: list | None  # the recovery's records, read once (check_inputs)
    heldout: list | None  # held-out records for loss and KL (heldout_records)
    progress: bool
    result: PipelineResult

    @property
    def out(self) -> Path:
        return self.stages.out


@dataclass
class _Flow:
    """What flows from stage to stage: the current model, the untouched base model (the recovery's teacher and
    the reference of every held-out KL; None until a stage needs it) and the fingerprint of everything upstream."""

    model: object
    tokenizer: object
    fingerprint: str
    teacher: object = None


@dataclass(frozen=True)
class Stage:
    """One row of the pipeline: run(ctx, flow, fp) does the work and returns the record kept in
    stages/<name>.json; restore(ctx, flow, record) rebuilds the flow from the stage's outputs when an earlier run
    finished it. The fingerprint covers `settings(ctx)` and, through `flow.fingerprint`, everything upstream."""

    name: str
    settings: Callable[[_Context], list]
    run: Callable[[_Context, _Flow, str], dict]
    restore: Callable[[_Context, _Flow, dict], None] = lambda ctx, flow, record: None
    needs: tuple = ()  # other stages that must run for this one to
    changes_model: bool = True  # False for evaluations: later fingerprints do not depend on them
    output: Callable[[_Context], Path] | None = None  # what it writes: a record is trusted only with it intact
    output_label: str = ""  # the name under which the summary reports the output's size (none: not reported)


def run_pipeline(config: PipelineConfig, *, say: Callable[[str], None] = lambda msg: None, progress: bool = True,
                 overwrite: bool = False) -> PipelineResult:
    """Run every stage of `config` not in `config.skip`; returns the summary and the final model in memory.

    A rerun into the same `config.out` skips finished stages and resumes an interrupted recovery; an existing
    `out` that is not a rora run is refused unless `overwrite`, which also reruns every stage (each stage's
    output is replaced only once its new one is complete). Every input is checked before anything is written."""
    from ..models import load_model

    config = PipelineConfig.coerce(config)
    out = Path(config.out)
    data_dir = config.data_dir or os.environ.get("RORA_DATA_DIR")
    train_data = config.data or data_dir
    check_run_output(out, overwrite, inputs=[*config.input_paths(), data_dir])
    if config.runs("recover") and not train_data:
        raise ConfigError("pipeline.data is not set and RORA_DATA_DIR is empty: name the recovery training data")
    records = check_inputs(config, data_dir, train_data)
    result = PipelineResult(out=out, evaluation=describe_evaluation(config.eval))

    model, tok = load_model(config.model, allow_pickle=config.allow_pickle, device=config.device)
    st = _Stages(out, say, fresh=overwrite)  # only now, with every input known good, is anything created
    ctx = _Context(config, st, data_dir, train_data, records, heldout_records(config, records), progress, result)
    flow = _Flow(model, tok, st.fingerprint("model", config.model))
    result.parameters["base"] = count_parameters(model)
    for stage in STAGES:
        if _runs(config, stage):
            _run_stage(ctx, flow, stage)
    result.parameters["pruned"] = count_parameters(flow.model)  # merging adds no parameters
    result.stages = st.timings
    result.model, result.tokenizer = flow.model, flow.tokenizer
    write_summary(result)
    return result


def _run_stage(ctx: _Context, flow: _Flow, stage: Stage) -> None:
    fp = ctx.stages.fingerprint(stage.name, flow.fingerprint, *stage.settings(ctx))
    output = stage.output(ctx) if stage.output is not None else None
    record = ctx.stages.done(stage.name, fp, output, EVAL_RECORD if stage.name in SUMMARY_LABELS else None)
    if record is None:
        record = ctx.stages.run(stage.name, fp, stage.run, ctx, flow, fp, output=output)
    else:
        stage.restore(ctx, flow, record)
    if stage.changes_model:
        flow.fingerprint = fp
    label = SUMMARY_LABELS.get(stage.name) or MEASURED_LABELS.get(stage.name)
    if label:
        ctx.result.collect(label, record)
    if stage.output_label:
        ctx.result.sizes[stage.output_label] = dir_size(output)


def _intact(output: Path, recorded: str | None) -> bool:
    """Whether a finished stage's output is still what it wrote (a record of an older rora has no fingerprint:
    its output must exist), and what the output was made from is unchanged (its manifest's fingerprints)."""
    if not os.path.lexists(output) or (recorded is not None and fingerprint(output) != recorded):
        return False
    try:
        return not (is_stage_output(output) and changed_inputs(read_manifest(output)))
    except RoraError:  # a corrupt manifest: the stage writes a new one
        return False


def describe_evaluation(cfg) -> str:
    """How the accuracies were measured, for the summary's headline."""
    subset = (f"first {cfg.limit} examples per task" if cfg.limit else
              f"a random {cfg.sample} examples per task (seed {cfg.seed})" if cfg.sample else "all examples")
    scoring = "" if cfg.precision == "auto" else f", {cfg.precision} scoring"
    return f"{cfg.protocol}, {subset}{scoring}"


def heldout_records(config: PipelineConfig, records: list[dict] | None) -> list[dict] | None:
    """The recovery's validation records (carved from its training records, never a test set): the held-out text
    on which every evaluated model's whole-text loss and KL to the base model are measured. None without them."""
    if not records:
        return None
    from ..recovery.data import split_train_val

    rc = config.recover
    return split_train_val(records, rc.val_set_size, rc.seed, rc.max_train_examples)[1] or None


def _heldout(model, reference, tok, texts, cutoff_len: int) -> dict | None:
    if not texts:
        return None
    from ..measure import heldout_metrics
    from ..recovery.distill import record_examples

    found = heldout_metrics(model, reference, tok, record_examples(texts, tok, cutoff_len))
    return {**found, "kl": 0.0 if reference is None else found["kl"]}  # the base model is its own reference


def check_run_output(out: Path, overwrite: bool = False, inputs=()) -> None:
    """A rora run (it holds stages/) or an empty directory may be run into again; anything else needs --overwrite."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} is a file; a run needs a directory")
    ours = out.is_dir() and ((out / "stages").is_dir() or not any(out.iterdir()))
    if out.exists() and not ours and not overwrite:
        raise OutputExistsError(f"{out} already exists and is not a rora run; pass --overwrite to run into it "
                                "(or choose another --out)")
    check_apart(out, inputs)  # a run writes into `out`, never replaces it whole
    check_writable(out)


def check_inputs(config: PipelineConfig, data_dir, train_data) -> list[dict] | None:
    """Fail on missing or malformed training and evaluation data before the first stage, not after three.
    Returns the training records when recovery runs (None otherwise), so they are read once."""
    records = None
    if config.runs("recover") or (config.runs("reconstruct") and config.reconstruct.calibration == "records"):
        from ..recovery.data import load_records

        records = load_records(train_data)
    check_text_sources(config)
    if any(config.runs(s) for s in SUMMARY_LABELS):
        from ..evaluation.data import load_examples, resolve_data_dir
        from ..evaluation.tasks import get_task

        resolved = resolve_data_dir(data_dir)
        if resolved is not None and config.eval.protocol != "lm-eval":  # lm-eval falls back to the hub per task
            for name in config.eval.tasks:
                load_examples(get_task(name), resolved, config.eval.limit)
    return records


def check_text_sources(config: PipelineConfig) -> None:
    """The text sources the stages will read (recovery text, pruning and reconstruction calibration) exist, match
    files, and are no hub ids while offline: checked before the first stage, without reading them."""
    from ..recovery.data import check_text
    from ..sources.text import check_calibration

    if config.runs("recover"):
        check_text(config.recover)
    if config.runs("prune"):
        check_calibration(config.prune.calibration, BUILTIN_CALIBRATION)
    if config.runs("reconstruct"):
        check_calibration(config.reconstruct.calibration, CALIBRATION_TEXTS.names())


# ---- the stages ------------------------------------------------------------------------------------------------

def _pruned(ctx: _Context) -> str:
    """The pruned model: the pruned directory, or the model itself when pruning is skipped."""
    return str(ctx.out / "pruned") if ctx.config.runs("prune") else ctx.config.model


def _recovery_base(ctx: _Context) -> str:
    """The model the adapter trains on: the reconstructed directory when reconstruction runs, else the pruned one."""
    return str(ctx.out / "reconstructed") if _runs(ctx.config, STAGE["reconstruct"]) else _pruned(ctx)


def _runs(config: PipelineConfig, stage: "Stage") -> bool:
    return config.runs(stage.name) and all(config.runs(n) for n in stage.needs)


def _evaluate(ctx: _Context, flow: _Flow, fp: str, label: str) -> dict:
    """Accuracy on the suite; loss, perplexity and KL to the base model (none for the base itself) on held-out
    prose and on the held-out records; and the quality of the model's own writing on held-out prompts, scored by
    the base model."""
    from ..evaluation.evaluate import evaluate

    names = {"base": ctx.config.model, "pruned": _pruned(ctx), "reconstructed": str(ctx.out / "reconstructed"),
             "recovered": str(ctx.out / "merged")}
    reference = None if label == "base" else flow.teacher
    res = evaluate(flow.model, flow.tokenizer, ctx.config.eval, data_dir=ctx.data_dir,
                   out=_eval_dir(label)(ctx) / "results.json", model_name=names[label], progress=ctx.progress,
                   reference=reference, reference_name=ctx.config.model, heldout_records=ctx.heldout)
    return {"accuracy": {t: r["accuracy"] for t, r in res.per_task.items()}, "average": res.average,
            "outcomes": outcomes_from_records(res.records), "prose": res.prose,
            "heldout": _heldout(flow.model, reference, flow.tokenizer, ctx.heldout, ctx.config.recover.cutoff_len),
            "generation": res.generation}


def _eval_dir(label: str) -> Callable[[_Context], Path]:
    return lambda ctx: ctx.out / f"eval_{label}"


def _eval_settings(ctx: _Context) -> list:
    rc = ctx.config.recover
    return [ctx.config.eval.to_dict(), ctx.data_dir, "outcomes", [ctx.train_data, rc.val_set_size, rc.seed, rc.cutoff_len]]


def _prune(ctx: _Context, flow: _Flow, fp: str) -> dict:
    from ..pruning.prune import prune, save_pruned

    # The recovery's teacher and the held-out KL's reference: one untouched copy, since pruning works in place.
    if any(ctx.config.runs(n) for n in ("reconstruct", "recover", "eval_pruned", "eval_reconstructed")):
        flow.teacher = copy.deepcopy(flow.model)
    report = prune(flow.model, flow.tokenizer, ctx.config.prune)
    if report.warning:
        ctx.stages.say(f"[prune] warning: {report.warning}")
    save_pruned(flow.model, flow.tokenizer, report, ctx.out / "pruned", overwrite=True, source=ctx.config.model)
    return {}  # the report is in the pruned directory's manifest


def _load_pruned(ctx: _Context, flow: _Flow, record: dict) -> None:
    from ..models import load_model

    flow.teacher = flow.model  # the pruned model comes from disk: the base model in memory needs no copy
    flow.model, flow.tokenizer = load_model(ctx.out / "pruned", device=ctx.config.device)


def _reconstruct(ctx: _Context, flow: _Flow, fp: str) -> dict:
    from ..reconstruction.calibration import calibration_sequences
    from ..reconstruction.reconstruct import reconstruct, save_reconstructed

    cfg = ctx.config.reconstruct
    records = _train_records(ctx) if cfg.calibration == "records" else None
    ids, what = calibration_sequences(cfg, flow.tokenizer, teacher=flow.teacher, records=records,
                                      progress=ctx.progress)
    report = reconstruct(flow.model, flow.teacher, flow.tokenizer, cfg, sequences=ids, source=what,
                         progress=ctx.progress)
    save_reconstructed(flow.model, flow.tokenizer, report, ctx.out / "reconstructed", overwrite=True,
                       source=_pruned(ctx), teacher=ctx.config.model)
    return _measured(ctx, flow)  # the report is in the reconstructed directory's manifest


def _measured(ctx: _Context, flow: _Flow, record: dict | None = None) -> dict:
    """When the reconstructed model's evaluation is skipped: its held-out figures against the base model, prose as
    its evaluation would measure it (eval.prose, eval.prose_documents) and the held-out records. They depend on
    settings the stage's fingerprint leaves out, so a stage read back (`record`) is measured again only when those
    changed."""
    from ..measure import Prose

    rc = ctx.config.recover
    settings = ctx.stages.fingerprint("measured", ctx.config.eval.prose, ctx.config.eval.prose_documents,
                                      ctx.data_dir, ctx.train_data, rc.val_set_size, rc.seed, rc.max_train_examples,
                                      rc.cutoff_len)
    if ctx.config.runs("eval_reconstructed") or (record or {}).get("measured_with") == settings:
        return {}
    prose = Prose.load(ctx.config.eval.prose, ctx.config.eval.prose_documents, ctx.data_dir)
    return {"prose": prose.measure(flow.model, flow.teacher, flow.tokenizer) if prose else None,
            "heldout": _heldout(flow.model, flow.teacher, flow.tokenizer, ctx.heldout, rc.cutoff_len),
            "measured_with": settings}


def _train_records(ctx: _Context) -> list[dict]:
    """The recovery's training records (its validation records left out): what reconstruction may calibrate on."""
    from ..recovery.data import split_train_val

    rc = ctx.config.recover
    return split_train_val(ctx.records, rc.val_set_size, rc.seed, rc.max_train_examples)[0]


def _load_reconstructed(ctx: _Context, flow: _Flow, record: dict) -> None:
    from ..models import load_model

    flow.model = load_model(ctx.out / "reconstructed", device=ctx.config.device)[0]
    record.update(_measured(ctx, flow, record))


def _teacher(flow: _Flow):
    """Without pruning, the base model is distilled into an adapter on a copy of itself (PEFT wraps in place)."""
    if flow.teacher is None:
        flow.teacher = copy.deepcopy(flow.model)
    return flow.teacher


def _recover(ctx: _Context, flow: _Flow, fp: str) -> dict:
    from ..models import load_model, resolve_device
    from ..recovery.trainer import recover

    config = ctx.config
    # An earlier run of these very settings crashed mid-way: continue from its checkpoints (if it left any) instead
    # of starting over. Either way the new run replaces an older recovery only once it is complete.
    rc = config.recover
    records = ctx.train_data if rc.text is None or rc.text_ratio is not None else None  # --text alone replaces them
    teacher = _teacher(flow)
    dtype = next(teacher.parameters()).dtype
    res = recover(flow.model, flow.tokenizer, records, rc, ctx.out / "recovery",
                  resume=ctx.stages.interrupted("recover", fp), overwrite=True, progress=ctx.progress,
                  source=_recovery_base(ctx), teacher=teacher)
    device = resolve_device(config.device)  # training went where accelerate chose: back where the run's models are
    flow.model = res.model.to(device)
    # The trainer casts the teacher in place to teacher_dtype (bf16 on a GPU); the figures after it are measured
    # against the base model as loaded, as the figures before it were.
    same = next(teacher.parameters()).dtype == dtype
    flow.teacher = teacher.to(device) if same else load_model(config.model, allow_pickle=config.allow_pickle,
                                                               device=device)[0]
    ctx.result.recovery = {"objective": rc.describe_objective(res.objective), "lr": res.lr, "lr_auto": res.lr_auto,
                           "text": res.text, "on_policy": res.on_policy}
    return {"recovery": ctx.result.recovery}  # the other figures are in the recovery directory's manifest


def _load_adapter(ctx: _Context, flow: _Flow, record: dict) -> None:
    from ..models import load_adapter

    ctx.result.recovery = record.get("recovery") or {}
    _teacher(flow)
    flow.model = load_adapter(flow.model, ctx.out / "recovery" / "adapter")  # eval's and merge's loader and pickle rule


def _merge(ctx: _Context, flow: _Flow, fp: str) -> dict:
    from ..recovery.merge import merge, save_merged

    flow.model, report = merge(flow.model, config=ctx.config.merge)
    save_merged(flow.model, flow.tokenizer, report, ctx.out / "merged", overwrite=True, source=_recovery_base(ctx),
                adapter=ctx.out / "recovery" / "adapter")
    return {}  # the report is in the merged directory's manifest


def _load_merged(ctx: _Context, flow: _Flow, record: dict) -> None:
    from ..models import load_model

    flow.model = load_model(ctx.out / "merged", device=ctx.config.device)[0]


def _export_path(ctx: _Context) -> Path:
    return ctx.out / ("export" if ctx.config.export.format == "hf" else "model.gguf")


def _export(ctx: _Context, flow: _Flow, fp: str) -> dict:
    from ..deployment import export
    from ..deployment.card import card_from_stages

    config, result = ctx.config, ctx.result
    # The final model's stage directory: its manifest and those upstream of it give the card's records.
    merged = config.runs("merge") and config.runs("recover")
    source = str(ctx.out / "merged") if merged else _recovery_base(ctx)
    evaluation = {label: accuracy_table(o) for label, o in result.outcomes.items()}  # with standard errors
    card = {**card_from_stages(source), "base_model": config.model, "evaluation": evaluation,
            "parameters": result.parameters}
    return {"path": str(export(flow.model, flow.tokenizer, config.export, _export_path(ctx), overwrite=True, card=card,
                               source=source))}


STAGES = (
    Stage("eval_base", _eval_settings, functools.partial(_evaluate, label="base"), changes_model=False,
          output=_eval_dir("base")),
    Stage("prune", lambda ctx: [ctx.config.prune.to_dict()], _prune, _load_pruned,
          output=lambda ctx: ctx.out / "pruned", output_label="pruned"),
    Stage("eval_pruned", _eval_settings, functools.partial(_evaluate, label="pruned"), changes_model=False,
          output=_eval_dir("pruned")),
    Stage("reconstruct", lambda ctx: [ctx.config.reconstruct.to_dict(), ctx.train_data
                                      if ctx.config.reconstruct.calibration == "records" else None],
          _reconstruct, _load_reconstructed, needs=("prune",), output=lambda ctx: ctx.out / "reconstructed",
          output_label="reconstructed"),
    Stage("eval_reconstructed", _eval_settings, functools.partial(_evaluate, label="reconstructed"),
          needs=("prune", "reconstruct"), changes_model=False, output=_eval_dir("reconstructed")),
    Stage("recover", lambda ctx: [ctx.config.recover.to_dict(), ctx.train_data], _recover, _load_adapter,
          output=lambda ctx: ctx.out / "recovery"),
    Stage("merge", lambda ctx: [ctx.config.merge.to_dict()], _merge, _load_merged, needs=("recover",),
          output=lambda ctx: ctx.out / "merged", output_label="merged"),
    Stage("eval_recovered", _eval_settings, functools.partial(_evaluate, label="recovered"), needs=("recover",),
          changes_model=False, output=_eval_dir("recovered")),
    Stage("export", lambda ctx: [ctx.config.export.to_dict()], _export, output=_export_path, output_label="export"),
)
assert tuple(s.name for s in STAGES) == tuple(PIPELINE_STAGES.names())  # the registry names them for validation
STAGE = {s.name: s for s in STAGES}
