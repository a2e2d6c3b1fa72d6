"""The `lm-eval` protocol: zero-shot multiple-choice log-likelihood through lm-eval-harness, on the in-memory model.

lm-eval builds the requests and computes the metrics and standard errors; the log-likelihoods come from rora's
engine (the `rora-hf` backend, lmeval_backend.py: the same numbers, about 2x faster on a CPU) or, with engine="lm-eval",
from lm-eval's own HF backend. A task runs offline on the YAMLs shipped in lmeval_tasks/ (rora_<task>, over
`<data_dir>/<task>/lmeval_<split>.jsonl`); without a data directory it runs lm-eval's own hub task. The shipped
YAMLs work from the command line too:

    RORA_DATA_DIR=DIR python -m rora.evaluation.lmeval_backend run --model rora-hf --model_args pretrained=... \\
        --include_path $(python -c 'import rora.evaluation.lmeval_bridge as b; print(b.LMEVAL_DIR)') \\
        --tasks rora_commonsense
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

from ..artifacts import DATA_LIMIT, read_text
from ..errors import DataError, detail
from .data import sample_indices
from .tasks import Task

LMEVAL_DIR = Path(__file__).parent / "lmeval_tasks"


def task_source(task: Task, data_dir: Path | None) -> tuple[str, str]:
    """(lm-eval task name, 'offline' | 'hub') for one rora task. A data directory must hold the task's file."""
    if data_dir is None:
        return task.lmeval_hub_task, "hub"
    path = data_dir / task.name / task.lmeval_file
    if not path.is_file():
        raise DataError(f"{path} not found: the lm-eval protocol reads <data_dir>/{task.name}/{task.lmeval_file} "
                        "(the original dataset's records, one JSON object per line)")
    offline_size(task, data_dir)  # UTF-8 text of a sane size, checked before any compute
    return task.lmeval_task, "offline"


def run_lmeval(model, tokenizer, tasks: list[Task], *, data_dir: Path | None, limit: int | None = None,
               sample: int | None = None, seed: int = 0, batch_size: int = 16, engine: str = "rora",
               precision: str = "auto") -> dict[str, dict]:
    """Per task: acc, acc_norm and their standard errors, the LLM-Pruner metric's value as `accuracy`, n, seconds,
    and per-example records. `limit`: the first N examples; `sample`: a seeded random N (sample_indices);
    `precision`: the rora engine's (numerics.matmul_precision)."""
    from lm_eval.evaluator import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from .lmeval_backend import RoraLM

    sources = {t.name: task_source(t, data_dir) for t in tasks}  # every file checked before any compute
    need_hub = any(kind == "hub" for _, kind in sources.values())
    with _quiet_lmeval():
        meta = {"data_dir": str(data_dir) if data_dir else None, "rora_limit": limit, "rora_sample": sample,
                "rora_seed": seed if sample is not None else None}
        manager = TaskManager(include_path=str(LMEVAL_DIR), include_defaults=need_hub,
                              metadata={k: v for k, v in meta.items() if v is not None} or None)
        # A sample's indices into each task's docs. Offline tasks build only those docs (the loader draws the same
        # sample_indices), so their doc_ids count within the sample; hub tasks are built whole and subset here.
        subsets = {}
        if sample is not None:
            for task in tasks:
                name, kind = sources[task.name]
                size = offline_size(task, data_dir) if kind == "offline" else _task_size(name, manager)
                subsets[task.name] = sample_indices(size, sample, seed, task.name)
        extra = {"precision": precision} if engine == "rora" else {}
        backend = {"rora": RoraLM, "lm-eval": HFLM}[engine]
        lm = backend(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(model.device), **extra)
    out = {}
    for task in tasks:
        name, kind = sources[task.name]
        start = time.perf_counter()
        try:
            with _quiet_lmeval():
                # acc and acc_norm aggregate by mean, whose standard error lm-eval computes in closed form: any
                # bootstrap_iters > 0 turns it on and no bootstrap runs (0 would switch the stderr off).
                res = simple_evaluate(model=lm, tasks=[name], task_manager=manager, limit=limit, log_samples=True,
                                      samples={name: subsets[task.name]} if sample is not None and kind == "hub"
                                      else None,
                                      bootstrap_iters=1000, random_seed=0, numpy_random_seed=0, torch_random_seed=0)
        except Exception as exc:  # lm-eval raises plain errors for missing data (offline hub, bad files)
            hint = "" if kind == "offline" else " (no data directory given, so lm-eval's hub task was tried)"
            raise DataError(f"lm-eval task {name} failed{hint}: {type(exc).__name__}: {detail(exc)}") from exc
        seconds = time.perf_counter() - start
        metrics = res["results"][name]
        samples = res["samples"][name]
        out[task.name] = {
            "accuracy": metrics[f"{task.lmeval_metric},none"],
            "metric": task.lmeval_metric,
            "acc": metrics.get("acc,none"),
            "acc_norm": metrics.get("acc_norm,none"),
            "acc_stderr": metrics.get("acc_stderr,none"),
            "acc_norm_stderr": metrics.get("acc_norm_stderr,none"),
            "stderr": metrics.get(f"{task.lmeval_metric}_stderr,none"),
            "n": len(samples),
            "seconds": seconds,
            "lmeval_task": name,
            "source": kind,
            "engine": engine,
            "records": [_record(task, s, subsets[task.name][s["doc_id"]] if sample is not None and kind == "offline"
                                else s["doc_id"]) for s in sorted(samples, key=lambda s: s["doc_id"])],
        }
    return out


def offline_size(task: Task, data_dir: Path) -> int:
    """Examples in an offline task's file (its non-empty lines), without building the lm-eval task; DataError
    naming the file when it is not UTF-8 text or too large."""
    text = read_text(data_dir / task.name / task.lmeval_file, DataError, DATA_LIMIT)
    return sum(1 for line in text.splitlines() if line.strip())


def _task_size(name: str, manager) -> int:
    from lm_eval.tasks import get_task_dict

    return len(get_task_dict([name], manager)[name].eval_docs)


def _record(task: Task, sample: dict, index: int) -> dict:
    """One example: the chosen choice under the task's metric, the gold choice, both metrics."""
    lls = [r[0] for r in sample["filtered_resps"]]
    choices = [a[1][1:] if a[1].startswith(" ") else a[1] for a in sample["arguments"]]  # drop the " " delimiter
    if len(set(choices)) == 1:  # partial evaluation (winogrande): the choices are the contexts
        choices = [a[0] for a in sample["arguments"]]
    if task.lmeval_metric == "acc_norm":  # lm-eval normalizes by the choice's length in characters
        keyed = [ll / max(len(c), 1) for ll, c in zip(lls, choices)]
    else:
        keyed = lls
    pred = max(range(len(keyed)), key=lambda i: (keyed[i], -i))
    gold = sample["target"]
    return {
        "task": task.name,
        "index": index,  # the example's position in the task's file
        "response": choices[pred],
        "prediction": pred,
        "answer": gold,
        "correct": bool(sample[task.lmeval_metric]),
        "acc": sample.get("acc"),
        "acc_norm": sample.get("acc_norm"),
        "loglikelihoods": lls,
    }


class _quiet_lmeval:
    """lm-eval logs every task build at INFO/WARNING, and datasets draws a bar for every document map; keep rora's
    output to the engine's progress bar and the results table."""

    def __enter__(self):
        import datasets

        self.loggers = [logging.getLogger(n) for n in ("lm_eval", "lm-eval")]
        self.levels = [lg.level for lg in self.loggers]
        for lg in self.loggers:
            lg.setLevel(logging.ERROR)
        self.bars = datasets.is_progress_bar_enabled()
        datasets.disable_progress_bars()

    def __exit__(self, *exc):
        import datasets

        for lg, level in zip(self.loggers, self.levels):
            lg.setLevel(level)
        if self.bars:
            datasets.enable_progress_bars()
