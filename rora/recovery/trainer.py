"""recover(): train a LoRA/RoRA/DoRA adapter on a (pruned) causal LM with a plain PyTorch loop on accelerate.

Objectives (config.objective): `sft`, cross-entropy on the response tokens; `kd`, distillation from a teacher (the
unpruned model) over every token of each text, computed in chunks of positions (distill.py); `kd+sft`, both.

Why a custom loop rather than HF Trainer: the loss runs the LM head only on positions that carry a label (the
response tokens), which on a 49k-token vocabulary is a large share of the compute; micro-batches are
length-grouped so little work goes to padding; and the adapters' dropout samples only the dropped positions
(dropout.py). Everything else is standard: AdamW, warmup + linear/cosine decay, gradient accumulation, bf16
autocast on GPU (fp32 on CPU; config.precision), data parallel under `accelerate launch`.

Output directory (only the main process writes). The run trains in the hidden sibling `.OUT.partial` and becomes
OUT only when it is complete, so an existing OUT (--overwrite) is kept until then; a killed run leaves the
sibling, with its checkpoints, for --resume:
    adapter/                 the best adapter (lowest held-out objective: response loss, KL, or both), PEFT format
    checkpoints/step-N/      latest checkpoint, written atomically: adapter, optimizer, scheduler, RNG, data position
    checkpoints/best/        the best adapter so far (what adapter/ becomes at the end)
    checkpoints/probe/       --lr auto: the best probe so far and every finished probe's figures, until the run's
                             first step checkpoint (rora.recovery.lr_auto)
    metrics.jsonl, loss.png  per-step training metrics and evaluations, the loss curve
    rora.json                manifest (artifacts.Manifest): base model and data, resolved config, scales per
                             module, results, provenance

On-policy distillation (config.on_policy > 0, rora.recovery.on_policy): at every step the student writes greedy
continuations of training prompts, and the step adds them as one more micro-batch, the KL to the teacher on each
written token.

--lr auto probes a few learning rates, each for a few steps from the same initial adapter (rora.recovery.lr_auto),
then continues from the winning probe's state: the run is exactly the run at that learning rate.

Determinism: the data order is a pure function of (seed, epoch) and the dropout RNG is reseeded from
(seed, step, process) at every step, so a run resumed from a checkpoint replays exactly what the uninterrupted
run would have done (bit-identical on CPU).
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..artifacts import (ADAPTER_DIR, MARKER, alive, atomic_dir, check_apart, check_output, claim, is_mine,
                         is_recovery, read_json, read_marker, remove_owned, replace_dir, write_json, write_stage_manifest)
from ..config import AUTO, RecoverConfig
from ..models import adopt, check_loaded, peft_wrapping
from ..numerics import model_signature
from ..errors import ConfigError, DataError, OutputError, OutputExistsError, TrainingError, detail
from .data import (IGNORE_INDEX, Example, check_text, collate, count_steps, load_records, mix, prepare, prepare_text,
                   step_plan, text_source)
from .distill import (DistillLoss, StudentLoss, batch_sums, check_objective, check_positions, check_teacher, labelled_ce,
                      prepare_teacher, teacher_dtype)
from . import sharding
from .dropout import use_sparse_dropout
from .lr_auto import LrSearch
from .on_policy import step_prompts, write_examples
from .methods import ADAPTER_NAME, effective_scale, module_scales, peft_config, scaling_exponent
from .synthetic import synthetic_texts

STATE_FILE = "trainer_state.json"
PROBE_CHECKPOINT = "probe"  # checkpoints/probe: the best --lr auto probe so far, until the run's first step checkpoint


@dataclass
class RecoverResult:
    """What recover() returns; `model` is the PeftModel with the best adapter loaded."""

    model: Any
    adapter_dir: Path | None
    best_val_loss: float | None
    best_step: int | None
    effective_scale: float
    steps: int
    train_tokens: int
    tokens_per_second: float
    dropped_too_long: int
    metrics_path: Path | None
    module_scales: dict[str, float] = field(default_factory=dict)
    objective: str = "sft"
    val_metrics: dict = field(default_factory=dict)  # the best step's held-out figures (val_kl, val_text_loss, ...)
    prose: dict | None = None  # loss, perplexity, KL to the teacher, tokens on held-out prose (when measured)
    lr: float | None = None  # the learning rate trained with (--lr auto: the one chosen)
    lr_auto: dict | None = None  # --lr auto: the grid, each probe's figures, the choice and its cost
    text: dict | None = None  # the text trained on: its source, revision or fingerprint, documents and tokens
    on_policy: dict | None = None  # on-policy distillation: continuations per step, new tokens, KL on the written tokens

    def to_dict(self) -> dict:
        return {
            "adapter_dir": str(self.adapter_dir) if self.adapter_dir else None,
            "best_val_loss": self.best_val_loss,
            "best_step": self.best_step,
            "effective_scale": self.effective_scale,
            "steps": self.steps,
            "train_tokens": self.train_tokens,
            "tokens_per_second": self.tokens_per_second,
            "dropped_too_long": self.dropped_too_long,
            "metrics_path": str(self.metrics_path) if self.metrics_path else None,
            "objective": self.objective,
            "val_metrics": self.val_metrics,
            "prose": self.prose,
            "lr": self.lr,
            "lr_auto": self.lr_auto,
            "text": self.text,
            "on_policy": self.on_policy,
        }


class NonFiniteLoss(TrainingError):
    """The training loss became NaN or infinite (the update was not applied)."""


# What a snapshot (and a checkpoint) holds besides the weights, optimizer and scheduler.
COUNTERS = ("step", "history", "train_tokens", "train_seconds", "best_val_loss", "best_step")


class LabelledTokenLoss(StudentLoss):
    """Summed cross-entropy over labelled positions of a PEFT-wrapped causal LM, and their count.

    The decoder runs on every position, but the LM head (hidden x vocab) only on positions whose next-token label
    is not IGNORE_INDEX. Wrapping this in a module keeps DDP/FSDP hooks intact under `accelerate launch`.
    """

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor):
        causal_lm = self.peft_model.get_base_model()
        hidden = causal_lm.get_decoder()(input_ids=input_ids, use_cache=False).last_hidden_state
        return labelled_ce(causal_lm, hidden, labels)


def recover(model, tokenizer, data, config: RecoverConfig | None = None, out=None, *, resume: bool = False,
            overwrite: bool = False, progress: bool = True, source: str | None = None, teacher=None,
            teacher_tokenizer=None, prose=None) -> RecoverResult:
    """Train an adapter on `model` with `data` as `config` says; write the run to `out` (optional).

    `data`: a JSON/JSONL file (LLM-Adapters or Alpaca format), a directory of <task>/train.json, a hub dataset
    id, or a list of records. The run trains in `partial_dir(out)` and replaces `out` when complete.
    `resume=True` continues an interrupted run from its latest checkpoint (same config, data and base model
    required; with no interrupted run it starts one, but never over an existing `out` without `overwrite`);
    see `check_recover_output` for what is refused before any work. `source` (the model spec) and `data`, when it
    is a path or hub id, are recorded in the manifest. The model is wrapped in place by PEFT. A plain dict is
    accepted as `config`.

    `teacher`: a causal LM with the student's vocabulary (e.g. the unpruned model), required by the kd objectives;
    with `sft` it is optional and only adds held-out KL to the metrics. It is frozen and moved, in place, to the
    training device in `config.teacher_dtype`. `teacher_tokenizer`, when given, must equal `tokenizer`.
    `prose` (a rora.measure.Prose): the recovered model's loss, perplexity and KL to the teacher on held-out prose,
    in the result and the manifest.
    """
    from peft import get_peft_model

    adopt(model, tokenizer)  # a model pruned elsewhere gets a config that tells the truth (what merge/export save)
    if teacher is not None:
        check_loaded(teacher, teacher_tokenizer, "teacher")
    config = RecoverConfig.coerce(config).with_objective(teacher is not None)
    out = Path(out) if out is not None else None
    check_objective(config, teacher is not None)
    if teacher is not None:
        check_teacher(teacher, model, tokenizer, teacher_tokenizer)
    for role, lm in (("model", model), ("teacher", teacher)):
        if lm is not None:
            check_positions(lm, config.cutoff_len, role)
    if out is not None:
        check_recover_output(out, resume, overwrite, inputs=[source, data if isinstance(data, (str, os.PathLike)) else None,
                                                            config.text])
    lora_config = peft_config(config, model)
    tokenized = None if config.synthetic else _training_data(data, tokenizer, config)
    accelerator = sharding.accelerator(config.precision)
    if teacher is not None:
        teacher = prepare_teacher(teacher, accelerator.device, teacher_dtype(config.teacher_dtype))
    if tokenized is None:
        with accelerator.main_process_first():  # the main process writes the texts to the cache, the others read them
            tokenized = _training_data(data, tokenizer, config, teacher, progress and accelerator.is_main_process)
    accelerator.wait_for_everyone()  # every process has checked `out` before the main one writes to it
    accumulation = config.batch_size // config.micro_batch_size
    if accumulation % accelerator.num_processes:
        raise ConfigError(
            f"batch_size/micro_batch_size = {accumulation} micro-batches per step cannot be split over "
            f"{accelerator.num_processes} processes; make it a multiple of the process count"
        )
    total_steps = count_steps(len(tokenized.train), config)
    if config.lr == AUTO and not tokenized.val:
        raise ConfigError("--lr auto compares its probes on the validation split, which is empty (every validation "
                          "example is longer than cutoff_len); raise --cutoff-len or --val-set-size")
    identity = {"config": config.to_dict(), "data_fingerprint": tokenized.fingerprint,
                "model_fingerprint": model_signature(model)}
    if teacher is not None:
        identity["teacher"] = model_signature(teacher)
    work = partial_dir(out) if out is not None else None
    state = _load_state(work, identity) if resume and work is not None else None
    if work is not None and accelerator.is_main_process:
        if state is None:
            remove_owned(work)  # nothing to resume in it, and check_recover_output proved it rora's: start clean
            (work / "checkpoints").mkdir(parents=True)
        claim(work)  # its marker is the lock: this process trains into it now
    accelerator.wait_for_everyone()

    torch.manual_seed(config.seed)  # PEFT's random init of lora_A: same seed, same adapter, on every process
    with peft_wrapping():
        peft_model = get_peft_model(model, lora_config, adapter_name=ADAPTER_NAME)
    use_sparse_dropout(peft_model)  # same distribution as nn.Dropout, a fraction of its cost on CPU
    if config.gradient_checkpointing:
        peft_model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    search = LrSearch.start(config, effective_scale(config), total_steps) if config.lr == AUTO else None
    lr = search.grid[0] if search is not None else config.lr  # each probe sets its own
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=config.weight_decay)
    scheduler = _scheduler(optimizer, config, total_steps)
    if config.objective == "sft":
        loss_module = LabelledTokenLoss(peft_model)
    else:
        loss_module = DistillLoss(peft_model, teacher, config.kd_temperature, config.kd_chunk_size,
                                  sft=config.objective == "kd+sft", no_repeat=config.on_policy_no_repeat,
                                  unlikelihood=config.unlikelihood)
    wrapped, optimizer = accelerator.prepare(loss_module, optimizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    run = _Run(config=config, out=work, acc=accelerator, peft_model=peft_model, loss_module=loss_module,
               wrapped=wrapped, optimizer=optimizer, scheduler=scheduler, data=tokenized, pad_id=pad_id,
               identity=identity, total_steps=total_steps, progress=progress, teacher=teacher, search=search,
               writing=_writing(model, tokenizer, config) if config.on_policy else None)
    if state is not None:
        _restore(run, state)
    try:
        run.train()
        result = run.finish({"model": source, "data": data if isinstance(data, (str, os.PathLike)) else None,
                             **({"text": config.text} if config.text else {})}, prose, tokenizer)
    except BaseException:
        # A failed run with a checkpoint stays resumable; one without leaves nothing behind. (A partial run that
        # failed before this point has no checkpoint either: the next run into `out` removes it.)
        if work is not None and accelerator.is_main_process and _latest_checkpoint(work) is None:
            remove_owned(work)
        raise
    if out is not None:
        if accelerator.is_main_process:
            replace_dir(work, out)
            (out / MARKER).unlink()  # a finished run is no partial one
        accelerator.wait_for_everyone()
        result.adapter_dir, result.metrics_path = out / ADAPTER_DIR, out / "metrics.jsonl"
    return result


def _restore(run, ckpt: Path) -> None:
    from safetensors import SafetensorError

    try:
        run.restore(ckpt)
    except (OSError, KeyError, ValueError, RuntimeError, SafetensorError) as exc:
        raise TrainingError(f"cannot resume from {ckpt}: the checkpoint is corrupt ({detail(exc)}); "
                            "start again with --overwrite") from None


def partial_dir(out: Path) -> Path:
    """Where a run into `out` trains until it is complete (see the module docstring)."""
    return out.with_name(f".{out.name}.partial")


def check_recover_output(out, resume: bool = False, overwrite: bool = False, inputs=()) -> Path:
    """Refuse, before any work, a run into `out` that could lose data: `out` or its partial sibling overlapping
    an input, an existing `out` without --overwrite, a partial sibling that is not rora's (no marker), an
    interrupted run (a checkpoint in the partial sibling) without --resume or --overwrite, a run another live
    process is training, and --resume where there is nothing of rora's to resume. Deletes nothing."""
    out = Path(out)
    partial = partial_dir(out)
    check_output(out, overwrite=True, inputs=inputs)  # writable, not the working directory, not an input
    check_apart(partial, inputs)
    if os.path.lexists(partial):
        owner = read_marker(partial)
        if owner is None:
            raise OutputError(f"{partial} is in the way: a run into {out} trains there, but it holds no rora marker "
                              f"({MARKER}), so it is not rora's to reuse or delete; move it away or choose another --out")
        if alive(owner) and not is_mine(owner):
            raise OutputError(f"another rora process (pid {owner['pid']}) is training into {out}; wait for it or "
                              "choose another --out")
        if _latest_checkpoint(partial) is not None:
            if resume or overwrite:
                return out
            raise OutputExistsError(
                f"{out} has an interrupted run ({partial}); pass --resume to continue it or --overwrite to start again")
    if out.exists() and not overwrite:
        if not resume:
            raise OutputExistsError(f"{out} already exists; pass --overwrite to replace it (or choose another --out)")
        what = "a finished recovery run" if is_recovery(out) else "not an interrupted rora recovery run"
        raise OutputExistsError(f"nothing to resume: {out} is {what}; pass --overwrite to train again (or choose another --out)")
    return out


def _training_data(data, tokenizer, config: RecoverConfig, teacher=None, progress: bool = False):
    """Tokenized training data: records (`data`), plain text (`config.text`, or texts the teacher writes with
    `config.synthetic`, continuing the records' prompts or general openings), or both mixed at
    `config.text_ratio` of the training tokens."""
    if config.text is not None and data is not None and config.text_ratio is None:
        raise DataError("give training records (--data) or text (--text), not both (unless --text-ratio mixes them)")
    text = None
    if config.text is not None:
        check_text(config)
        text = prepare_text(text_source(config), tokenizer, config)
    elif config.synthetic:
        prompts_from = load_records(data) if data is not None and config.synthetic_prompts == "records" else None
        text = prepare_text(synthetic_texts(teacher, tokenizer, prompts_from, config, progress), tokenizer, config)
    if text is not None and config.text_ratio is None:
        return text
    if data is None:
        raise DataError("no training data: give records (--data), a text file (--text) or --synthetic N")
    records = prepare(data, tokenizer, config)
    return records if text is None else mix(text, records, config.text_ratio)


def _writing(model, tokenizer, config: RecoverConfig) -> tuple:
    """How the student writes its on-policy continuations: greedy, config.on_policy_tokens new tokens, no chat
    template (the prompts are token ids from the training data)."""
    from ..config import GenerateConfig
    from ..writing import writing_settings

    return writing_settings(model, tokenizer, GenerateConfig(max_new_tokens=config.on_policy_tokens, temperature=0.0))


def _scheduler(optimizer, config: RecoverConfig, total_steps: int):
    from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

    make = get_linear_schedule_with_warmup if config.scheduler == "linear" else get_cosine_schedule_with_warmup
    return make(optimizer, config.warmup_steps, total_steps)


def _step_seed(seed: int, step: int, process: int) -> int:
    return (seed * 1_000_003 + step * 1_009 + process) % (2**63)


def _n_targets(e: Example) -> int:
    return sum(1 for t in e.labels[1:] if t != IGNORE_INDEX)


@dataclass(eq=False)
class _Run:
    """The state of one training run: the loop, evaluation, checkpoints, metrics and final outputs. Built with
    keywords from what `recover` prepared; the counters below it are what a checkpoint saves and restores."""

    config: RecoverConfig
    out: Path | None  # the .partial work directory (None: in memory only)
    acc: object  # the accelerate.Accelerator
    peft_model: object
    loss_module: torch.nn.Module
    wrapped: torch.nn.Module  # loss_module as accelerate prepared it (DDP on several processes)
    optimizer: object
    scheduler: object
    data: object  # the tokenized train/val split
    pad_id: int
    identity: dict  # what a checkpoint must match to be resumed
    total_steps: int
    progress: bool
    teacher: object = None
    step: int = 0
    best_val_loss: float | None = None
    best_step: int | None = None
    best_weights: dict | None = None  # in memory when there is no output directory
    train_tokens: int = 0
    train_seconds: float = 0.0
    history: list = field(default_factory=list)
    search: LrSearch | None = None  # --lr auto
    writing: tuple | None = None  # on-policy: (transformers GenerationConfig, stop ids) the student writes with

    def __post_init__(self) -> None:
        cfg = self.config
        self.kd = cfg.objective != "sft"
        self.plan = step_plan([len(e) for e in self.data.train], cfg.micro_batch_size,
                              cfg.batch_size // cfg.micro_batch_size, self.total_steps, cfg.seed, cfg.group_by_length)
        # Where every --lr auto probe starts: the initial adapter and an optimizer without state.
        self.initial = self.snapshot() if self.search is not None else None

    # ---- the loop -------------------------------------------------------------------------------------------
    def train(self) -> None:
        if self.search is not None and not self.search.done:
            self.choose_lr()
        self.advance(self.total_steps)

    def advance(self, until: int, probe: float | None = None) -> None:
        """Train up to step `until`, evaluating and checkpointing on schedule; a `probe` (its learning rate) only
        trains, its step records tagged with it."""
        from tqdm.auto import tqdm

        acc, cfg = self.acc, self.config
        self.peft_model.train()
        bar = tqdm(total=until, initial=self.step, desc="recover" if probe is None else f"lr probe {probe:g}",
                   unit="step", disable=not (self.progress and acc.is_main_process), dynamic_ncols=True)
        while self.step < until:
            t0 = time.perf_counter()
            loss, tokens, parts = self.train_step(self.plan[self.step])
            self.train_seconds += time.perf_counter() - t0
            self.step += 1
            self.train_tokens += tokens
            tps = self.train_tokens / max(self.train_seconds, 1e-9)
            self.log({"step": self.step, "loss": loss, **parts, "lr": self.scheduler.get_last_lr()[0],
                      "tokens": tokens, "tokens_per_second": round(tps, 2), **({"probe": probe} if probe else {})})
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", **{k: f"{v:.4f}" for k, v in parts.items()}, tok_s=f"{tps:.0f}")
            if probe is not None:
                continue
            if self.data.val and cfg.eval_steps and (self.step % cfg.eval_steps == 0 or self.step == self.total_steps):
                self.evaluate()
            if self.out is not None and self.step % cfg.save_steps == 0 and self.step < self.total_steps:
                self.save_checkpoint()
        bar.close()

    # ---- --lr auto (rora.recovery.lr_auto) ----------------------------------------------------------------------
    def choose_lr(self) -> None:
        """Probe the search's learning rates one by one from the same start, keep the leading probe's state, and
        continue from it: its evaluation is the run's evaluation at that step. Each probe that finishes is saved
        (checkpoints/probe holds the best so far), so a killed run resumes the search where it stopped."""
        search = self.search
        best = self.snapshot() if search.results else None  # resumed: the restored state is the best probe so far
        if search.start_loss is None and not search.results:  # the model before training: what a probe must beat
            search.start_loss, _ = self.measure()
        while (lr := search.next_lr()) is not None:
            self.load_snapshot(self.initial, lr)
            result = self.probe(lr)
            search.results.append(result)
            if search.leader() is result:
                best = self.snapshot()
                if self.out is not None:
                    self.save_checkpoint(PROBE_CHECKPOINT)
            elif self.out is not None and self.acc.is_main_process:  # the saved state stays; its record grows
                state = self.out / "checkpoints" / PROBE_CHECKPOINT / STATE_FILE
                if state.is_file():  # before any probe has led there is none: a resumed run probes from the start
                    write_json(state, {**read_json(state, TrainingError), "lr_auto": search.to_dict()})
        lr = search.choose()
        self.load_snapshot(best)
        summary = search.summary()
        figure = next(r for r in search.results if r["lr"] == lr)
        self.best_val_loss, self.best_step = figure["val_loss"], self.step
        self.history.append({"step": self.step, "lr_auto": summary})
        if self.acc.is_main_process and self.out is not None:  # the losing probes' lines go; their figures stay
            (self.out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in self.history))
        self.save_best()
        if self.out is not None and self.step < self.total_steps:
            self.save_checkpoint()

    def probe(self, lr: float) -> dict:
        """Train `search.steps` steps at `lr` from the start; the held-out figures after them (val_loss None when
        the loss became non-finite), and what the probe cost."""
        start, steps = time.perf_counter(), self.search.steps
        try:
            self.advance(steps, probe=lr)
        except NonFiniteLoss:
            return {"lr": lr, "val_loss": None, "diverged_at": self.step + 1, "steps": self.step,
                    "seconds": time.perf_counter() - start, "tokens": self.train_tokens}
        val_loss, record = self.measure()
        self.log({"step": self.step, "probe": lr, "val_loss": val_loss, **record})
        return {"lr": lr, "val_loss": val_loss, **record, "steps": steps, "seconds": time.perf_counter() - start,
                "tokens": self.train_tokens}

    def snapshot(self) -> dict:
        """The training state, copied to host memory (a large adapter's optimizer state need not stay on the GPU
        twice): adapter, optimizer, scheduler and counters. Loading it back restores each tensor exactly."""
        return _on_cpu({"adapter": self.adapter_state(), "optimizer": self.optimizer.state_dict(),
                        "scheduler": self.scheduler.state_dict(), "counters": {k: getattr(self, k) for k in COUNTERS}})

    def load_snapshot(self, snap: dict, lr: float | None = None) -> None:
        """Return to `snap`; with `lr`, as a fresh run at that learning rate (a new schedule from step 0)."""
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(self.peft_model, snap["adapter"])
        self.optimizer.load_state_dict(copy.deepcopy(snap["optimizer"]))
        for k, v in copy.deepcopy(snap["counters"]).items():
            setattr(self, k, v)
        if lr is None:
            self.scheduler.load_state_dict(snap["scheduler"])
            return
        for group in self.optimizer.param_groups:  # what the scheduler scales, from the first step on
            group["lr"] = group["initial_lr"] = lr
        self.scheduler = _scheduler(getattr(self.optimizer, "optimizer", self.optimizer), self.config, self.total_steps)

    def train_step(self, micro_batches: list[list[int]]) -> tuple[float, int, dict]:
        """One optimizer step over this process's share of the step's micro-batches.

        Returns (objective, tokens, {"kl": KD term per token[, "sft": SFT term per labelled token]}). Each term is
        a mean over the whole step's tokens: KD over every position that predicts a token, SFT over the labels.
        """
        acc, train, cfg = self.acc, self.data.train, self.config
        torch.manual_seed(_step_seed(cfg.seed, self.step, acc.process_index))
        n_targets = max(1, sum(_n_targets(train[i]) for mb in micro_batches for i in mb))
        written = self.written_batch() if cfg.on_policy else []
        n_written = int(acc.reduce(torch.tensor(float(sum(map(_n_targets, written))), device=acc.device), "sum")) \
            if cfg.on_policy else 0  # every process's written tokens: one more collective, only when on
        if self.kd:
            n_kd = max(1, sum(len(train[i]) - 1 for mb in micro_batches for i in mb) + n_written)
            w = 1.0 if cfg.objective == "kd" else cfg.kd_weight
            coefs = (w / n_kd, (1.0 - w) / n_targets, 0.0)  # the unlikelihood sum is in the KD term already
        else:
            coefs = (1.0 / n_targets,)
        jobs = [([train[i] for i in mb], False) for mb in micro_batches[acc.process_index :: acc.num_processes]]
        jobs += [(written, True)] if written else []
        # each term's sum, the KD sum over written tokens, then the token count
        sums = torch.zeros(len(coefs) + 2, device=acc.device)
        for k, (batch, on_policy) in enumerate(jobs):
            ids, labels = (t.to(acc.device) for t in collate(batch, self.pad_id))
            last = k == len(jobs) - 1
            with contextlib.nullcontext() if last else acc.no_sync(self.wrapped):
                if self.kd:
                    terms = self.wrapped(ids, labels, torch.tensor([len(e) for e in batch], device=acc.device),
                                         written=on_policy)
                else:
                    terms = (self.wrapped(ids, labels)[0],)
                objective = sum(c * t for c, t in zip(coefs, terms))
                # DDP averages gradients over processes; scale so the result is the mean over the whole step's tokens.
                acc.backward(objective * acc.num_processes)
            found = [t.detach().float() for t in terms]
            sums += torch.stack([*found, found[0] if on_policy else torch.zeros_like(found[0]),
                                 torch.tensor(float(sum(map(len, batch))), device=acc.device)])
        totals = acc.reduce(sums, "sum")
        loss = sum(c * float(t) for c, t in zip(coefs, totals))
        parts = {}
        if self.kd:
            parts["kl"] = (float(totals[0]) - cfg.unlikelihood * float(totals[2])) / n_kd
            if cfg.unlikelihood:
                parts["unlikelihood"] = float(totals[2]) / n_kd
            if cfg.objective == "kd+sft":
                parts["sft"] = float(totals[1]) / n_targets
            if n_written:
                parts["written_kl"] = float(totals[-2]) / n_written
        if not math.isfinite(loss):
            last_ckpt = self.latest_checkpoint()
            raise NonFiniteLoss(
                f"loss became {loss} at step {self.step + 1}; the update was not applied. "
                + (f"The last good checkpoint is {last_ckpt}. " if last_ckpt else "")
                + "Lower --lr (or raise --warmup-steps) and start again with --overwrite."
            )
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss, int(totals[-1]), parts

    def written_batch(self) -> list[Example]:
        """This step's on-policy micro-batch (rora.recovery.on_policy): what the student, as it is now, writes."""
        cfg = self.config
        prompts = step_prompts(self.data.train, cfg.on_policy, cfg.seed, self.step, self.acc.process_index,
                               cfg.cutoff_len - cfg.on_policy_tokens)
        with sharding.whole_root(self.wrapped):
            written = write_examples(self.peft_model, prompts, *self.writing)
        self.peft_model.train()
        return written

    def on_policy_figures(self) -> dict | None:
        """On-policy distillation in figures: continuations and new tokens per step, the n-gram the teacher's target
        never repeats, and the KL to the teacher per written token at the first and the last step (each on what the
        student wrote at that step)."""
        cfg = self.config
        kls = [r["written_kl"] for r in self.history if "written_kl" in r]
        if not cfg.on_policy or not kls:
            return None
        return {"continuations": cfg.on_policy, "new_tokens": cfg.on_policy_tokens, "no_repeat": cfg.on_policy_no_repeat,
                "written_kl_first": kls[0], "written_kl_last": kls[-1]}

    def evaluate(self) -> float:
        """The held-out figures (measure), logged; keeps the best adapter."""
        val_loss, record = self.measure()
        self.log({"step": self.step, "val_loss": val_loss, **record})
        if self.best_val_loss is None or val_loss < self.best_val_loss:
            self.best_val_loss, self.best_step = val_loss, self.step
            self.save_best()
        return val_loss

    @torch.no_grad()
    def measure(self) -> tuple[float, dict]:
        """The objective's own held-out figure on the validation split, and the figures beside it.

        sft: mean loss per labelled token; kd: mean KL(teacher || student) per token at temperature 1; kd+sft: the
        weighted sum of the two. Beside it, for every objective: the response loss, the whole-text loss and (with a
        teacher) the KL, so runs of different objectives compare.
        """
        acc, val, cfg = self.acc, self.data.val, self.config
        self.peft_model.eval()
        order = sorted(range(len(val)), key=lambda i: len(val[i]))
        mb = cfg.micro_batch_size
        every = [order[s : s + mb] for s in range(0, len(order), mb)]
        batches = [(b, 1.0) for b in every[acc.process_index :: acc.num_processes]]
        if sharding.is_sharded(self.wrapped):  # each forward gathers shards with the other processes: same count
            batches += [(every[0], 0.0)] * (-(-len(every) // acc.num_processes) - len(batches))
        sums = torch.zeros(5, device=acc.device)
        student = self.peft_model.get_base_model()
        with sharding.whole_root(self.wrapped):
            for batch, weight in batches:
                examples = [val[i] for i in batch]
                ids, labels = (t.to(acc.device) for t in collate(examples, self.pad_id))
                lengths = torch.tensor([len(e) for e in examples], device=acc.device)
                with acc.autocast():
                    sums += weight * batch_sums(student, self.teacher, ids, labels, lengths, cfg.kd_chunk_size)
        sums = acc.reduce(sums, "sum")
        record = {"val_response_loss": float(sums[0] / sums[1].clamp(min=1)),
                  "val_text_loss": float(sums[2] / sums[3].clamp(min=1))}
        if self.teacher is not None:
            record["val_kl"] = float(sums[4] / sums[3].clamp(min=1))
        kl, resp = record.get("val_kl"), record["val_response_loss"]
        val_loss = (resp if cfg.objective == "sft" else kl if cfg.objective == "kd"
                    else cfg.kd_weight * kl + (1 - cfg.kd_weight) * resp)
        self.peft_model.train()
        return val_loss, record

    # ---- outputs ----------------------------------------------------------------------------------------------
    def log(self, record: dict) -> None:
        self.history.append(record)
        if self.out is not None and self.acc.is_main_process:
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def adapter_state(self) -> dict[str, torch.Tensor]:
        from peft import get_peft_model_state_dict

        return {k: v.detach().clone() for k, v in get_peft_model_state_dict(self.peft_model).items()}

    def adapter_weights(self) -> dict[str, torch.Tensor]:
        """The adapter's tensors by parameter name, whole on every process (under FSDP a collective: every process
        calls it); what `save_pretrained(state_dict=...)` writes in PEFT's format."""
        return {n: sharding.gathered(p.detach()) for n, p in self.peft_model.named_parameters() if p.requires_grad}

    def save_best(self) -> None:
        if self.out is None:
            self.best_weights = self.adapter_state()
            return
        weights = self.adapter_weights()
        if self.acc.is_main_process:
            with atomic_dir(self.out / "checkpoints" / "best", overwrite=True) as tmp:
                self.peft_model.save_pretrained(tmp / "adapter", state_dict=weights)
                write_json(tmp / "best.json", {"step": self.best_step, "val_loss": self.best_val_loss})
        self.acc.wait_for_everyone()

    def latest_checkpoint(self) -> Path | None:
        return _latest_checkpoint(self.out) if self.out is not None else None

    def save_checkpoint(self, name: str | None = None) -> None:
        """checkpoints/step-N (or checkpoints/`name`), atomically; then the older checkpoint is removed."""
        from safetensors.torch import save_file

        weights = self.adapter_weights()
        opt = self.optimizer.state_dict()
        tensors = {f"{i}.{k}": sharding.gathered(v) for i, s in opt["state"].items() for k, v in s.items()
                   if torch.is_tensor(v)}
        if self.acc.is_main_process:
            previous = self.latest_checkpoint()
            path = self.out / "checkpoints" / (name or f"step-{self.step}")
            with atomic_dir(path, overwrite=True) as tmp:
                self.peft_model.save_pretrained(tmp / "adapter", state_dict=weights)
                save_file({k: v.contiguous() for k, v in tensors.items()}, tmp / "optimizer.safetensors")
                rng = {"torch": torch.get_rng_state()}
                if torch.cuda.is_available():
                    rng.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
                save_file(rng, tmp / "rng.safetensors")
                write_json(tmp / STATE_FILE, {
                    **self.identity,
                    "step": self.step,
                    "total_steps": self.total_steps,
                    "data_position": {"next_step": self.step, "plan": "data.step_plan(seed, epoch)"},
                    "optimizer_param_groups": opt["param_groups"],
                    "scheduler": self.scheduler.state_dict(),
                    "best_val_loss": self.best_val_loss,
                    "best_step": self.best_step,
                    "train_tokens": self.train_tokens,
                    "train_seconds": self.train_seconds,
                    "history": self.history,
                    **({"lr_auto": self.search.to_dict()} if self.search is not None else {}),
                })
            if previous is not None and previous != path:
                shutil.rmtree(previous, ignore_errors=True)
        self.acc.wait_for_everyone()

    def restore(self, ckpt: Path) -> None:
        """Load a checkpoint's adapter, optimizer, scheduler and counters (all processes)."""
        from peft import set_peft_model_state_dict
        from peft.utils import load_peft_weights
        from safetensors.torch import load_file

        state = json.loads((ckpt / STATE_FILE).read_text())
        set_peft_model_state_dict(self.peft_model, load_peft_weights(str(ckpt / "adapter"), device="cpu"))
        tensors = load_file(ckpt / "optimizer.safetensors")
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        opt_state: dict[int, dict] = {}
        for key, value in tensors.items():
            index, name = key.split(".", 1)
            opt_state.setdefault(int(index), {})[name] = sharding.shard_like(value, params[int(index)])
        self.optimizer.load_state_dict({"state": opt_state, "param_groups": state["optimizer_param_groups"]})
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(load_file(ckpt / "rng.safetensors")["torch"])
        self.step = state["step"]
        self.best_val_loss, self.best_step = state["best_val_loss"], state["best_step"]
        self.train_tokens, self.train_seconds = state["train_tokens"], state["train_seconds"]
        self.history = state["history"]
        if self.search is not None:
            self.search = LrSearch.from_dict(state["lr_auto"])
        if self.acc.is_main_process:  # drop metrics logged after the checkpoint by the killed run
            (self.out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in self.history))
        self.acc.wait_for_everyone()

    def load_best(self) -> None:
        from peft import set_peft_model_state_dict
        from peft.utils import load_peft_weights

        if self.best_step is None:
            return  # no validation (no split, or eval_steps 0): the final weights are the result
        if self.out is None:
            set_peft_model_state_dict(self.peft_model, self.best_weights)
        else:
            weights = load_peft_weights(str(self.out / "checkpoints" / "best" / "adapter"), device="cpu")
            set_peft_model_state_dict(self.peft_model, weights)

    def finish(self, source: dict, prose=None, tokenizer=None) -> RecoverResult:
        """Load the best adapter; write adapter/, loss.png and the manifest (with `prose`, a rora.measure.Prose, the
        best adapter's figures on it); return the result."""
        self.load_best()
        self.peft_model.eval()
        with sharding.whole_root(self.wrapped):  # every process measures the same documents
            prose = prose.measure(self.peft_model, self.teacher, tokenizer) if prose is not None else None
        cfg, acc = self.config, self.acc
        scales = module_scales(self.peft_model)
        lr_auto = self.search.summary() if self.search is not None else None
        on_policy = self.on_policy_figures()
        tps = self.train_tokens / max(self.train_seconds, 1e-9)
        adapter_dir = metrics_path = None
        if self.out is not None:
            adapter_dir, metrics_path = self.out / ADAPTER_DIR, self.out / "metrics.jsonl"
            weights = self.adapter_weights()
            if acc.is_main_process:
                with atomic_dir(adapter_dir, overwrite=True) as tmp:
                    self.peft_model.save_pretrained(tmp, state_dict=weights)
                plot_losses(self.history, self.out / "loss.png")
                lora = self.peft_model.peft_config[ADAPTER_NAME]
                write_stage_manifest(self.out, "recover", source, cfg.to_dict(), {
                    "alpha": cfg.resolved_alpha,
                    "scaling_exponent": scaling_exponent(cfg),
                    "effective_scale": effective_scale(cfg),
                    "peft": {"lora_alpha": lora.lora_alpha, "use_rslora": lora.use_rslora, "use_dora": lora.use_dora},
                    "module_scales": scales,
                    "best_val_loss": self.best_val_loss,
                    "best_step": self.best_step,
                    "val_metrics": self.best_metrics(),
                    "teacher": self.identity.get("teacher"),
                    "steps": self.step,
                    "train_examples": len(self.data.train),
                    "val_examples": len(self.data.val),
                    "dropped_too_long": self.data.dropped_too_long,
                    "train_tokens": self.train_tokens,
                    "train_seconds": round(self.train_seconds, 3),
                    "tokens_per_second": round(tps, 2),
                    "num_processes": acc.num_processes,
                    "distributed": str(acc.distributed_type.value),  # NO, MULTI_CPU / MULTI_GPU (DDP), FSDP
                    "data_fingerprint": self.data.fingerprint,
                    "text": self.data.text,
                    "lr": self.lr,
                    "lr_auto": lr_auto,
                    "prose": prose,
                    "on_policy": on_policy,
                })
            acc.wait_for_everyone()
        return RecoverResult(
            model=self.peft_model, adapter_dir=adapter_dir, best_val_loss=self.best_val_loss, best_step=self.best_step,
            effective_scale=effective_scale(cfg), steps=self.step, train_tokens=self.train_tokens,
            tokens_per_second=tps, dropped_too_long=self.data.dropped_too_long, metrics_path=metrics_path,
            module_scales=scales, objective=cfg.objective, val_metrics=self.best_metrics(), prose=prose, lr=self.lr,
            lr_auto=lr_auto, text=self.data.text, on_policy=on_policy,
        )

    @property
    def lr(self) -> float:
        """The learning rate the run trained with: the config's, or the one --lr auto chose."""
        return self.search.lr if self.search is not None else self.config.lr

    def best_metrics(self) -> dict:
        """The held-out figures logged at the best step (from the history, so a resumed run has them too)."""
        found = [r for r in self.history if "val_loss" in r and r["step"] == self.best_step]
        return {k: v for k, v in found[-1].items() if k != "step"} if found else {}


def _on_cpu(value):
    """A deep copy of `value` (dicts, lists, tensors, plain values) with every tensor in host memory."""
    if torch.is_tensor(value):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: _on_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_on_cpu(v) for v in value)
    return copy.deepcopy(value)


def _latest_checkpoint(out: Path) -> Path | None:
    """The newest step checkpoint; before the first, the best --lr auto probe so far (if any)."""
    found = [p for p in (out / "checkpoints").glob("step-*") if (p / STATE_FILE).is_file()]
    probe = out / "checkpoints" / PROBE_CHECKPOINT
    fallback = probe if (probe / STATE_FILE).is_file() else None
    return max(found, key=lambda p: int(p.name.split("-")[1]), default=fallback)


def _load_state(out: Path, identity: dict) -> Path | None:
    """The checkpoint to resume from, after checking it was made with the same config, data and base model."""
    ckpt = _latest_checkpoint(out) if out.is_dir() else None
    if ckpt is None:
        return None
    state = read_json(ckpt / STATE_FILE, TrainingError)
    if not isinstance(state, dict) or not all(k in state for k in ("config", "data_fingerprint", "step", "history")):
        raise TrainingError(f"{ckpt / STATE_FILE} is incomplete or not a rora checkpoint; start again with --overwrite")
    old, new = state["config"], identity["config"]
    changed = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    if state["data_fingerprint"] != identity["data_fingerprint"]:
        changed.append("training data differs")
    if state.get("teacher") != identity.get("teacher"):
        changed.append("teacher differs")
    if state.get("model_fingerprint") != identity["model_fingerprint"]:
        changed.append("the base model differs")
    if changed:
        raise TrainingError(
            f"cannot resume from {ckpt}: it was made with a different config ({'; '.join(changed)}); "
            "use the original settings, or --overwrite to start again"
        )
    return ckpt


def plot_losses(history: list[dict], path: Path) -> None:
    """Training and validation objective against the step; beside it the held-out whole-text loss and KL, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in history if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in history if "val_loss" in r]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
    if train:
        ax.plot(*zip(*train), label="train", lw=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("objective (per token)")
    ax.legend()
    for key, label in (("val_text_loss", "whole-text loss"), ("val_kl", "KL(teacher || model)")):
        points = [(r["step"], r[key]) for r in history if key in r]
        if points:
            ax2.plot(*zip(*points), "o-", label=label)
    ax2.set_xlabel("step")
    ax2.set_ylabel("held-out, nats per token")
    if ax2.lines:
        ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
