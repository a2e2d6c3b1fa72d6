"""evaluate(): the commonsense suite under one of three protocols, on an in-memory model (a PeftModel too).

    generate  LLM-Adapters: its prompt, 4-beam search, 32 new tokens, first pattern match == answer (the papers' way)
    score     the same prompt + "the correct answer is ", argmax log-likelihood over the record's allowed labels
    lm-eval   zero-shot lm-eval-harness multiple choice (LLM-Pruner's way), acc or acc_norm per task

With `config.generation` it also scores the model's own writing (rora.evaluation.quality): repetition, distinct-2
and perplexity under a reference model of its greedy continuations of held-out prompts.

With `out` (a JSON path) it writes the JSON, a Markdown table beside it (.md) and every example as JSONL
(`<stem>.examples.jsonl`: task, index, response, prediction, answer, correct) for error analysis.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from ..artifacts import atomic_file, check_output, provenance, to_json
from ..config import EvalConfig
from ..errors import ConfigError, ModelLoadError
from ..measure import Prose
from ..models import check_loaded
from .data import load_examples, resolve_data_dir, sample_indices
from .tasks import ANSWER_PREFIX, Task, eval_prompt, extract_answer, get_task, record_labels

PROTOCOLS = {
    "generate": "LLM-Adapters generation: eval prompt, {num_beams}-beam search, {max_new_tokens} new tokens, "
                "first match of the task pattern == answer",
    "score": "constrained log-likelihood: eval prompt + 'the correct answer is ', argmax over the allowed labels",
    "lm-eval": "lm-eval-harness zero-shot multiple choice; accuracy = LLM-Pruner's metric per task "
               "(acc or acc_norm)",
}


@dataclass
class EvalResults:
    """What an evaluation found. `per_task[task]` holds accuracy, n, protocol, seconds, examples_per_s (lm-eval adds
    acc, acc_norm, metric, source); `average` is the plain mean of the task accuracies; `records` one dict per
    example; `generation` the generation-quality figures (quality.generation_quality; None when not measured),
    their perplexity under the model named `reference`."""

    per_task: dict[str, dict]
    average: float
    protocol: str
    records: list[dict] = field(default_factory=list, repr=False)
    model: str | None = None
    adapter: str | None = None
    config: dict = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)
    prose: dict | None = None  # loss, perplexity, kl, tokens, documents, source on held-out prose (rora.measure.Prose)
    generation: dict | None = None
    reference: str | None = None

    def to_dict(self) -> dict:
        """The JSON summary (records excluded: they go to the .examples.jsonl file)."""
        return {
            "protocol": self.protocol,
            "protocol_description": PROTOCOLS[self.protocol].format(**self.config) if self.config else "",
            "model": self.model,
            "adapter": self.adapter,
            "average": self.average,
            "per_task": {t: {**r, "model": self.model, "adapter": self.adapter} for t, r in self.per_task.items()},
            "prose": self.prose,
            "generation": self.generation,
            "reference": self.reference,
            "config": self.config,
            "provenance": self.provenance,
        }

    def to_markdown(self) -> str:
        """A table: one row per task, then the average."""
        lmeval = self.protocol == "lm-eval"
        head = ["task", "n", "accuracy (%)"] + (["metric", "acc (%)", "acc_norm (%)"] if lmeval else []) + \
            ["seconds", "examples/s"]
        lines = [
            f"protocol: {self.protocol}; model: {self.model or '-'}; adapter: {self.adapter or '-'}",
            "",
            "| " + " | ".join(head) + " |",
            "|" + "|".join("---" for _ in head) + "|",
        ]
        for task, r in self.per_task.items():
            cells = [task, str(r["n"]), _pct(r["accuracy"])]
            if lmeval:
                cells += [r["metric"], _pct(r.get("acc")), _pct(r.get("acc_norm"))]
            cells += [f"{r['seconds']:.1f}", f"{r['examples_per_s']:.2f}"]
            lines.append("| " + " | ".join(cells) + " |")
        blank = [""] * (3 if lmeval else 0)
        lines.append("| " + " | ".join(["**average**", "", f"**{_pct(self.average)}**", *blank, "", ""]) + " |")
        if self.prose:
            p = self.prose
            kl = "" if p["kl"] is None else f", KL to the reference {p['kl']:.3f} nats/token"
            lines += ["", f"held-out prose: loss {p['loss']:.3f}, perplexity {p['perplexity']:.1f}{kl} "
                          f"({p['tokens']:,} tokens of {p['documents']} documents: {p['source']})"]
        if self.generation:
            g = self.generation
            lines += ["", f"generation: {g['prompts']} held-out prompts, {g['new_tokens']} greedy tokens each: "
                          f"repetition {_pct(g['repetition'])}{_pm(g.get('repetition_se'))}% of 4-grams, "
                          f"distinct-2 {_ratio(g['distinct_2'])}, "
                          f"perplexity {g['reference_ppl']:.2f} under {self.reference or 'the model itself'}"]
        return "\n".join(lines)


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def _pm(se) -> str:
    return "" if se is None else f" ± {100 * se:.2f}"


def _ratio(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def output_paths(out: str | Path) -> tuple[Path, Path, Path]:
    """(JSON, Markdown, per-example JSONL) for an --out path."""
    out = Path(out)
    return out, out.with_suffix(".md"), out.with_name(out.stem + ".examples.jsonl")


def check_outputs(out: str | Path, overwrite: bool = False, inputs=()) -> None:
    """Refuse existing outputs before any work, unless `overwrite`; outputs that overlap `inputs` (the model, the
    adapter, the data directory); and an --out that one of the other two outputs would overwrite (`--out r.md` is
    also the Markdown table's name)."""
    paths = output_paths(out)
    if len(set(paths)) < len(paths):
        raise ConfigError(f"--out {out} names the JSON results but is also where the Markdown table goes; "
                          f"use {Path(out).with_suffix('.json')}")
    for path in paths:
        check_output(path, overwrite, inputs)


def check_data(config: EvalConfig, data_dir=None) -> None:
    """Fail on a missing task file or a --sample larger than a task before a model is loaded (evaluate checks
    again; this is for the CLI, so that bad input costs nothing)."""
    from .lmeval_bridge import offline_size, task_source

    data_dir = resolve_data_dir(data_dir)
    if data_dir is None:  # downloaded or hub data: checked when it is fetched
        return
    for task in (get_task(name) for name in config.tasks):
        if config.protocol != "lm-eval":
            load_examples(task, data_dir, config.limit, sample=config.sample, seed=config.seed)
            continue
        task_source(task, data_dir)
        if config.sample is not None:  # the offline files hold one example per line
            sample_indices(offline_size(task, data_dir), config.sample, config.seed, task.name)


def evaluate(model, tokenizer, config: EvalConfig | None = None, *, data_dir=None, out=None, model_name=None,
             adapter=None, progress: bool = True, overwrite: bool = True, reference=None, reference_name=None,
             heldout_records=None) -> EvalResults:
    """Evaluate `model` on `config.tasks` under `config.protocol`; write the outputs when `out` is given.

    data_dir: holds `<task>/test.json` (and `<task>/lmeval_<split>.jsonl` for lm-eval); default $RORA_DATA_DIR,
    else the data is downloaded. `limit` keeps the first N examples of each task, `sample` a seeded random N
    (`seed`). Existing outputs are replaced unless `overwrite=False` (the CLI's default, checked before the model
    is loaded). `config.prose` adds the loss and perplexity on held-out prose, and with `reference` (the unpruned
    model) the KL to it.
    Generation quality (`config.generation`): `reference` scores the written text (the unpruned model; None: `model`
    itself), named `reference_name` in the outputs; `heldout_records` (held-out training records, never a test set)
    add task prompts to the shipped text openings.
    """
    check_loaded(model, tokenizer)
    config = EvalConfig.coerce(config)
    tasks = [get_task(name) for name in config.tasks]
    if tokenizer is None:
        raise ModelLoadError("the model has no tokenizer, and every protocol needs one; load a model directory or "
                             "GGUF file that includes its tokenizer")
    data_dir = resolve_data_dir(data_dir)
    if out is not None:
        check_outputs(out, overwrite, inputs=[data_dir])
    prose = Prose.load(config.prose, config.prose_documents, data_dir)  # a bad prose file fails before the compute
    model.eval()
    if config.protocol == "lm-eval":
        per_task, records = _run_lmeval(model, tokenizer, tasks, data_dir, config)
    else:
        # Load (and check) every task's data before spending any compute.
        examples = {t.name: load_examples(t, data_dir, config.limit, sample=config.sample, seed=config.seed)
                    for t in tasks}
        per_task, records = {}, []
        for task in tasks:
            start = time.perf_counter()
            recs = _RUNNERS[config.protocol](model, tokenizer, task, examples[task.name], config, progress)
            per_task[task.name] = _summary(recs, config.protocol, time.perf_counter() - start)
            records += recs
    average = sum(r["accuracy"] for r in per_task.values()) / len(per_task)
    results = EvalResults(
        per_task=per_task, average=average, protocol=config.protocol, records=records,
        model=model_name or getattr(getattr(model, "config", None), "name_or_path", None) or None,
        adapter=str(adapter) if adapter is not None else None,
        config={**config.to_dict(), "data_dir": str(data_dir) if data_dir else None}, provenance=provenance(),
        prose=prose.measure(model, reference, tokenizer) if prose else None,
    )
    if config.generation:
        from .quality import generation_quality

        results.generation = generation_quality(
            model, tokenizer, reference, heldout_records, prompts=config.generation_prompts,
            new_tokens=config.generation_tokens, batch_size=config.batch_size, progress=progress)
        results.reference = (reference_name or "the reference model") if reference is not None else results.model
    if out is not None:
        write_results(results, out)
    return results


def _summary(records: list[dict], protocol: str, seconds: float) -> dict:
    n = len(records)
    correct = sum(r["correct"] for r in records)
    return {"accuracy": correct / n, "n": n, "correct": correct, "protocol": protocol, "seconds": seconds,
            "examples_per_s": n / seconds if seconds > 0 else float("inf")}


def run_generate(model, tokenizer, task: Task, examples: list[dict], config: EvalConfig, progress: bool) -> list[dict]:
    """Per-example records under the generate protocol."""
    from .generate import generate_responses

    prompts = [eval_prompt(r["instruction"]) for r in examples]
    responses = generate_responses(model, tokenizer, prompts, num_beams=config.num_beams,
                                   max_new_tokens=config.max_new_tokens, batch_size=config.batch_size,
                                   progress=progress)
    out = []
    for rec, response in zip(examples, responses):
        pred = extract_answer(task, response)
        out.append({"task": task.name, "index": rec["index"], "response": response, "prediction": pred,
                    "answer": rec["answer"], "correct": pred == rec["answer"]})
    return out


def run_score(model, tokenizer, task: Task, examples: list[dict], config: EvalConfig, progress: bool) -> list[dict]:
    """Per-example records under the score protocol (argmax label; all label log-likelihoods kept)."""
    from .score import argmax, loglikelihoods

    labels = [record_labels(task, r["instruction"]) for r in examples]
    requests = [(eval_prompt(r["instruction"]) + ANSWER_PREFIX, labs) for r, labs in zip(examples, labels)]
    scores = loglikelihoods(model, tokenizer, requests, batch_size=config.batch_size, progress=progress,
                            precision=config.precision)
    out = []
    for rec, labs, lls in zip(examples, labels, scores):
        pred = labs[argmax(lls)]
        out.append({"task": task.name, "index": rec["index"], "response": ANSWER_PREFIX + pred, "prediction": pred,
                    "answer": rec["answer"], "correct": pred == rec["answer"],
                    "loglikelihoods": dict(zip(labs, lls))})
    return out


_RUNNERS = {"generate": run_generate, "score": run_score}


def _run_lmeval(model, tokenizer, tasks, data_dir, config):
    from .lmeval_bridge import run_lmeval

    found = run_lmeval(model, tokenizer, tasks, data_dir=data_dir, limit=config.limit, sample=config.sample,
                       seed=config.seed, batch_size=config.batch_size, engine=config.engine,
                       precision=config.precision)
    per_task, records = {}, []
    for name, r in found.items():
        records += r.pop("records")
        per_task[name] = {**r, "protocol": "lm-eval",
                          "examples_per_s": r["n"] / r["seconds"] if r["seconds"] > 0 else float("inf")}
    return per_task, records


def write_results(results: EvalResults, out: str | Path) -> None:
    """The JSON summary, the Markdown table and the per-example JSONL: all three written, then all three put in
    place, so a failure (a full disk) replaces none of them."""
    import contextlib
    import json

    texts = (to_json(results.to_dict()), results.to_markdown() + "\n",
             "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in results.records))
    with contextlib.ExitStack() as stack:
        for path, text in zip(output_paths(out), texts):
            stack.enter_context(atomic_file(path)).write_text(text)
