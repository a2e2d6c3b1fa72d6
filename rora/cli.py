"""The `rora` command line: each command turns options (or --config YAML) into a stage config and calls one
API function. No logic lives here beyond that; heavy imports happen inside commands so `rora --help` is instant.
RoraError (and click's usage errors) become one line on stderr and exit code 2, never a traceback."""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import json
import os
import signal
import sys
import types
import typing

import click
from click.core import ParameterSource

from .config import (AUTO, DEVICE_HELP, EvalConfig, ExportConfig, GenerateConfig, MergeConfig, PipelineConfig, PruneConfig,
                     ReconstructConfig, RecoverConfig, device_problem)


def _fail(message: str) -> None:
    _close_progress_bars()
    one_line = message.replace("\r", "\\r").replace("\n", "\\n")  # a path may hold a newline
    click.echo(f"rora: error: {one_line}", err=True)
    sys.exit(2)


def _close_progress_bars() -> None:
    """A run that fails mid-way leaves its tqdm bar open; close it so the error is the last line on stderr."""
    tqdm = sys.modules.get("tqdm")
    if tqdm is not None:
        for bar in list(getattr(tqdm.tqdm, "_instances", ())):
            bar.close()
    sys.stdout.flush()


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process is, so that it cleans up exactly as Ctrl-C does."""


@contextlib.contextmanager
def _terminate_like_interrupt():
    def stop(signum, frame):
        raise _Terminated

    try:
        previous = signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread: leave the signal alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def handles_errors(fn):
    """Turn library exceptions into one clear stderr line and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from .errors import RoraError

        try:
            with _terminate_like_interrupt():
                return fn(*args, **kwargs)
        except RoraError as exc:
            _fail(str(exc))
        except KeyboardInterrupt as exc:
            how = "terminated" if isinstance(exc, _Terminated) else "interrupted"
            _fail(f"{how}; outputs in progress were discarded (re-run with --resume where supported)")
        except OSError as exc:  # the file system said no (full disk, read-only, permissions): name the path
            where = exc.filename or ""
            _fail(f"cannot access {where}: {exc.strerror or exc}" if where else f"{type(exc).__name__}: {exc}")

    return wrapper


# ---- options generated from the config dataclasses: each field's name, type, help and default live once, in
# rora.config, and every command that exposes the field shows the same option.
def _csv(value: str | None, kind: type = str) -> list | None:
    """'a, b' -> ['a', 'b'] (each converted to `kind`); None (not given) -> None; '' -> [] (given, naming nothing: the
    config decides)."""
    if value is None:
        return None
    try:
        return [kind(v.strip()) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of {kind.__name__} values") from None


def config_options(cls, *paths: str, required: tuple[str, ...] = ()):
    """Options --key-name for fields of the config class `cls`: a path is `key`, or `section.key` for a field of one
    of `cls`'s sections. The command receives each as `key`: None when not given, so the YAML's (or the dataclass's)
    value stays; the dataclass default is what --help shows."""
    fields = {path: _field(cls, path) for path in paths}

    def decorate(fn):
        @functools.wraps(fn)
        def command(**kwargs):
            ctx = click.get_current_context()
            for _, f, _ in fields.values():  # the default is only there for --help to show it
                if ctx.get_parameter_source(f.name) is ParameterSource.DEFAULT:
                    kwargs[f.name] = None
            return fn(**kwargs)

        for path in reversed(paths):
            command = _option(*fields[path], path in required)(command)
        return command

    return decorate


def _field(cls, path: str):
    """(the dataclass that declares the field at `path`, the field, its default there: a section's own, e.g. rora
    run's recover.lr auto)."""
    *section, key = path.split(".")
    owner = typing.get_type_hints(cls)[section[0]] if section else cls
    f = next(f for f in dataclasses.fields(owner) if f.name == key)
    if section:
        (outer,) = [g for g in dataclasses.fields(cls) if g.name == section[0]]
        return owner, f, getattr(outer.default_factory(), key)
    return owner, f, f.default_factory() if f.default is dataclasses.MISSING else f.default


class _NumberOrAuto(click.ParamType):
    """A float | str setting (recover.lr): a number, or a word the config checks (auto)."""

    name = "number|auto"

    def convert(self, value, param, ctx):
        try:
            return float(value)
        except (TypeError, ValueError):
            return value


def _option(owner, f: dataclasses.Field, default, required: bool):
    hint = typing.get_type_hints(owner)[f.name]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):  # X | None: None is the default, not a type
        kinds = [h for h in typing.get_args(hint) if h is not type(None)]
        hint = kinds[0] if len(kinds) == 1 else _NumberOrAuto()
    flag = "--" + f.name.replace("_", "-")
    kwargs = {"help": f.metadata["help"], "required": required}
    if hint is bool:
        flag = f"{flag}/--no-{flag[2:]}"
    elif typing.get_origin(hint) is list:  # comma-separated on the command line
        (inner,) = typing.get_args(hint)
        default = ",".join(map(str, default)) or None
        kwargs["callback"] = lambda ctx, param, value: _csv(value, inner)
    else:
        kwargs["type"] = hint
    if not required and default is not None:
        kwargs.update(default=default, show_default=True)
    return click.option(flag, f.name, **kwargs)


class _Rora(click.Group):
    """Click's usage errors (a missing option, an unknown flag) are bad input too: one line, exit code 2."""

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            return super().main(*args, standalone_mode=False, **kwargs)
        except click.ClickException as exc:
            ctx = getattr(exc, "ctx", None)
            _fail(exc.format_message() + (f" (see {ctx.command_path} --help)" if ctx is not None else ""))
        except click.Abort:
            _fail("interrupted")


@click.group(cls=_Rora, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="rora")
def main():
    """rora: prune LLaMA-family models and recover their accuracy with RoRA adapters.

    \b
    Stages:  prune -> recover -> eval -> merge -> export   (or all at once: rora run)
    Look:    rora info MODEL, rora generate MODEL --prompt TEXT
    Models:  a hub id, a local HF directory, a .gguf file, an LLM-Pruner checkpoint (--allow-pickle),
             or the embedded alias smollm2-135m.
    """
    # transformers' per-file "Loading weights" bars would bury the one line a user needs among our own progress bars.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def prose_option(fn):
    return click.option("--prose", default="auto", show_default=True,
                        help="Held-out prose for the loss, perplexity and KL to the unpruned model: auto (WikiText-2 "
                             "when the hub answers, offline the BoolQ validation passages in RORA_DATA_DIR), a "
                             ".txt/.jsonl file, or none.")(fn)


def prose_lines(figures: dict) -> list[str]:
    """'prose before/after' lines of a report's {"before", "after"} (or {"after"}) held-out prose figures."""
    lines = []
    for key in ("before", "after"):
        p = (figures or {}).get(key)
        if p:
            kl = "" if p.get("kl") is None else f", KL {p['kl']:.3f}"
            lines.append(f"prose {key:<8} loss {p['loss']:.3f}, perplexity {p['perplexity']:.1f}{kl} "
                         f"({p['tokens']:,} tokens: {p['source']})")
    return lines


def device_option(fn):
    def check(ctx, param, value):
        for problem in device_problem("--device", value):
            raise click.BadParameter(problem.removeprefix("--device "), ctx, param)
        return value

    return click.option("--device", default=AUTO, show_default=True, callback=check, help=DEVICE_HELP)(fn)


def model_argument(fn):
    fn = click.argument("model")(fn)
    fn = click.option("--allow-pickle", is_flag=True, help="Allow loading pickled weights (an LLM-Pruner checkpoint, pytorch_model.bin, adapter_model.bin). Only for files you trust.")(fn)
    return fn


@main.command()
@model_argument
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@handles_errors
def info(model, allow_pickle, as_json):
    """Show MODEL's architecture: layers, per-layer heads and MLP widths, parameters, dtype, tokenizer."""
    from .models import describe, load_model

    m, tok = load_model(model, allow_pickle=allow_pickle)
    summary = describe(m, tok)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    click.echo(format_info(summary))


def format_info(s: dict) -> str:
    lines = [
        f"model          {s['model']}",
        f"architecture   {s['architecture']} ({'uniform' if s['uniform'] else 'non-uniform'} layers)",
        f"layers         {s['layers']}",
        f"hidden size    {s['hidden_size']}   head_dim {s['head_dim']}",
        f"attention      {s['num_attention_heads']} query heads over {s['num_key_value_heads']} KV heads (max per layer)",
        f"MLP width      {s['intermediate_size']} (max per layer)",
        f"parameters     {s['parameters']:,} ({s['parameters'] / 1e6:.1f}M)",
        f"dtype          {s['dtype']}",
    ]
    if "tokenizer" in s:
        t = s["tokenizer"]
        lines.append(f"tokenizer      {t['class']}, {t['vocab_size']} tokens, eos {t['eos_token']!r}, pad {t['pad_token']!r}")
    from .architecture import layer_runs

    lines.append("per layer      layer: q_heads/kv_heads mlp")
    lines += [f"  {span:>12}: {q}/{kv} {mlp}" for span, (q, kv, mlp) in layer_runs(s["per_layer"])]
    return "\n".join(lines)


@main.command()
@model_argument
@config_options(PruneConfig, "ratio")
@click.option("--out", required=True, help="Output directory for the pruned model.")
@config_options(PruneConfig, "mlp_ratio", "layers", "importance", "taylor", "gqa", "num_samples", "calibration",
                "channel_multiple", "seed")
@prose_option
@device_option
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="YAML with PruneConfig keys (flags win).")
@handles_errors
def prune(model, allow_pickle, out, prose, device, overwrite, config_file, **flags):
    """Prune whole attention heads and MLP channels of MODEL and save it to --out."""
    from .artifacts import check_output

    cfg = PruneConfig.from_yaml(config_file) if config_file else PruneConfig()
    cfg = cfg.replace(**flags)
    check_output(out, overwrite, inputs=[model, prose, *cfg.input_paths()])  # before any work: bad input writes nothing
    from .measure import Prose
    from .models import load_model
    from .pruning.prune import prune as prune_model, save_pruned
    from .registry import BUILTIN_CALIBRATION
    from .sources.text import check_calibration

    check_calibration(cfg.calibration, BUILTIN_CALIBRATION)  # a missing file or glob fails before the model loads

    held_out = Prose.load(prose)  # a bad --prose fails before the model loads
    m, tok = load_model(model, allow_pickle=allow_pickle, device=device)
    unpruned = copy.deepcopy(m) if held_out else None  # the KL's reference (pruning works in place)
    report = prune_model(m, tok, cfg)
    if held_out:
        report.prose = {"before": held_out.measure(unpruned, None, tok), "after": held_out.measure(m, unpruned, tok)}
    path = save_pruned(m, tok, report, out, overwrite=overwrite, source=model)
    click.echo(format_prune(report.to_dict(), path))
    if report.warning:
        click.echo(f"rora: warning: {report.warning}", err=True)


def _mlp_ratio(r: dict) -> str:
    """' (MLP channels 0.3)' where the prune's mlp_ratio differs from its ratio (older manifests have none)."""
    mlp = r["config"].get("mlp_ratio")
    return "" if mlp is None or mlp == r["requested_ratio"] else f" (MLP channels {mlp})"


def format_prune(r: dict, path) -> str:
    a = r["actual"]
    lines = [
        f"pruned         {r['importance']} importance, ratio {r['requested_ratio']}{_mlp_ratio(r)}, layers "
        f"{r['pruned_layers'][0]}-{r['pruned_layers'][-1]}" if r["pruned_layers"] else "pruned         nothing",
        f"parameters     {r['params_before']:,} -> {r['params_after']:,} ({a['parameters']:.1%} removed)",
        f"removed        {a['q_heads']:.1%} query heads, {a['kv_heads']:.1%} KV heads, {a['channels']:.1%} MLP channels"
        " (of the pruned layers)",
    ]
    if r["loss_before"] is not None:
        lines.append(
            f"held-out loss  {r['loss_before']:.4f} -> {r['loss_after']:.4f} "
            f"(perplexity {r['perplexity_before']:.2f} -> {r['perplexity_after']:.2f})"
        )
    lines += prose_lines(r.get("prose"))
    how = "standard (plain transformers loads it)" if r["standard_config"] else "per-layer shapes (load with rora)"
    lines.append(f"saved          {path}, config {how}")
    return "\n".join(lines)


@main.command()
@model_argument
@click.option("--teacher", required=True, help="The unpruned model MODEL was pruned from (any MODEL spec).")
@click.option("--out", required=True, help="Output directory for the reconstructed model.")
@config_options(ReconstructConfig, "method", "calibration")
@click.option("--data", help="Training records for --calibration records: JSON/JSONL file, directory of "
              "<task>/train.json, or hub id.")
@config_options(ReconstructConfig, "num_samples", "holdout_samples", "seq_len", "damping", "bias", "batch_size",
                "precision", "temperature", "seed")
@prose_option
@device_option
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
@click.option("--config", "config_file", type=click.Path(dir_okay=False),
              help="YAML with ReconstructConfig keys (flags win).")
@handles_errors
def reconstruct(model, allow_pickle, teacher, out, data, prose, device, overwrite, config_file, **flags):
    """Refit MODEL's remaining weights (each layer's o_proj and down_proj) in closed form so that every layer's
    output follows the unpruned --teacher's on calibration text; no training. Saves the model to --out."""
    from .artifacts import check_output

    cfg = (ReconstructConfig.from_yaml(config_file) if config_file else ReconstructConfig()).replace(**flags)
    check_output(out, overwrite, inputs=[i for i in (model, teacher, data) if i])  # before any work
    if cfg.calibration == "records" and not data:
        raise click.UsageError("--calibration records needs --data (the training records)")
    from .registry import CALIBRATION_TEXTS
    from .sources.text import check_calibration

    check_calibration(cfg.calibration, CALIBRATION_TEXTS.names())  # before the models load
    from .measure import Prose

    held_out = Prose.load(prose)  # a bad --prose fails before the models load
    from .models import load_model
    from .reconstruction.calibration import calibration_sequences
    from .reconstruction.reconstruct import reconstruct as reconstruct_model, save_reconstructed

    records = None
    if data:
        from .recovery.data import load_records

        records = load_records(data)
    m, tok = load_model(model, allow_pickle=allow_pickle, device=device)
    t_model, _ = load_model(teacher, allow_pickle=allow_pickle, device=device)
    ids, what = calibration_sequences(cfg, tok, teacher=t_model, records=records, progress=True)
    before = held_out.measure(m, t_model, tok) if held_out else None
    report = reconstruct_model(m, t_model, tok, cfg, sequences=ids, source=what)
    if held_out:
        report.prose = {"before": before, "after": held_out.measure(m, t_model, tok)}
    path = save_reconstructed(m, tok, report, out, overwrite=overwrite, source=model, teacher=teacher)
    click.echo(format_reconstruct(report.to_dict(), path))


def format_reconstruct(r: dict, path) -> str:
    from collections import Counter

    c = r["calibration"]
    rules = Counter(p["rule"] for p in r["projections"])
    before, after = r["heldout_before"], r["heldout_after"]
    lines = [
        f"calibration    {c['fit_tokens']:,} tokens to fit, {c['holdout_tokens']:,} held out ({c['source']})",
        f"refits         {len(r['projections'])} projections: " + ", ".join(f"{n} {k}" for k, n in rules.items()),
        f"output error   {r['error_removed']:.1%} of the held-out error removed (summed over the projections)",
        f"held-out KL    {before['kl']:.4f} -> {after['kl']:.4f} nats/token to the teacher "
        f"({after['tokens']:,} held-out calibration tokens)",
    ]
    lines += prose_lines(r.get("prose"))
    lines.append(f"saved          {path} ({r['seconds']:.0f} s)")
    return "\n".join(lines)


@main.command()
@model_argument
@click.option("--data", help="Training records: JSON/JSONL file, directory of <task>/train.json, or hub id.")
@click.option("--out", required=True, help="Output directory (adapter/, checkpoints/, metrics, manifest).")
@config_options(RecoverConfig, "objective")
@click.option("--teacher", help="Teacher model spec for kd (any MODEL spec, e.g. the unpruned model).")
@config_options(RecoverConfig, "kd_temperature", "kd_weight", "unlikelihood", "precision", "teacher_dtype", "text",
                "text_split", "text_field", "text_config", "max_text_tokens", "text_ratio", "synthetic", "synthetic_tokens", "synthetic_prompts",
                "on_policy", "on_policy_tokens", "on_policy_no_repeat",
                "method", "rank", "alpha", "scaling_exponent", "target_modules", "lr", "lr_probe_steps", "epochs", "max_steps",
                "batch_size", "micro_batch_size", "cutoff_len", "val_set_size", "max_train_examples", "warmup_steps",
                "eval_steps", "save_steps", "seed", "train_on_inputs", "gradient_checkpointing")
@prose_option
@click.option("--resume", is_flag=True, help="Continue the interrupted run into --out from its latest checkpoint.")
@click.option("--overwrite", is_flag=True, help="Start again: replace --out (once the new run is complete) and any interrupted run.")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="YAML with RecoverConfig keys (flags win).")
@handles_errors
def recover(model, allow_pickle, data, out, teacher, prose, resume, overwrite, config_file, **flags):
    """Train a RoRA/LoRA/DoRA adapter on MODEL with --data (or --text, or --synthetic with a --teacher); the best
    adapter lands in --out/adapter.

    The run trains in .OUT.partial beside --out and takes the place of --out when it completes."""
    from .recovery.distill import check_objective, teacher_dtype

    cfg = RecoverConfig.from_yaml(config_file) if config_file else RecoverConfig()
    cfg = cfg.replace(**flags).with_objective(teacher is not None)
    check_objective(cfg, teacher is not None)  # before loading anything
    from .recovery.data import check_text

    check_text(cfg)
    from .models import load_model
    from .recovery.trainer import check_recover_output, recover as recover_adapter

    check_recover_output(out, resume, overwrite, inputs=[model, data, teacher, *cfg.input_paths()])  # before loading

    from .measure import Prose

    held_out = Prose.load(prose)  # a bad --prose fails before the models load
    m, tok = load_model(model, allow_pickle=allow_pickle)
    t_model, t_tok = load_model(teacher, allow_pickle=allow_pickle, dtype=teacher_dtype(cfg.teacher_dtype)) if teacher else (None, None)
    result = recover_adapter(m, tok, data, cfg, out, resume=resume, overwrite=overwrite, source=model,
                             teacher=t_model, teacher_tokenizer=t_tok, prose=held_out)
    click.echo(format_recover(result.to_dict(), cfg))


def format_recover(r: dict, cfg) -> str:
    from .recovery.lr_auto import describe as describe_lr_auto
    from .recovery.on_policy import describe as describe_on_policy
    from .sources.text import describe_read

    best = "n/a (no validation)" if r["best_val_loss"] is None else f"{r['best_val_loss']:.4f} at step {r['best_step']}"
    figure = {"sft": "val loss", "kd": "val KL", "kd+sft": "val objective"}[cfg.objective]
    held = r.get("val_metrics") or {}
    return "\n".join([
        f"method         {cfg.method} rank {cfg.rank} alpha {cfg.resolved_alpha:g} (scale {r['effective_scale']:.4g})",
        f"objective      {cfg.describe_objective()}",
        f"steps          {r['steps']}   tokens {r['train_tokens']:,}   {r['tokens_per_second']:.1f} tokens/s",
        "learning rate  " + (describe_lr_auto(r["lr_auto"]) if r.get("lr_auto") else f"{r['lr']:g}"),
        *([f"text           {describe_read(r['text'])}"] if r.get("text") else []),
        *([f"on-policy      {describe_on_policy(r['on_policy'])}"] if r.get("on_policy") else []),
        f"best {figure:<9} {best}",
        *([f"held-out       whole-text loss {held['val_text_loss']:.4f}"
           + (f", KL to the teacher {held['val_kl']:.4f}" if "val_kl" in held else "")] if held else []),
        *prose_lines({"after": r.get("prose")}),
        f"dropped        {r['dropped_too_long']} examples longer than cutoff_len={cfg.cutoff_len}",
        f"adapter        {r['adapter_dir']}",
        f"metrics        {r['metrics_path']}",
    ])


def adapter_option(fn):
    return click.option("--adapter", type=click.Path(file_okay=False), help="A PEFT adapter directory (or a recovery "
                        "directory) to load onto MODEL; not needed when MODEL is a recovery directory.")(fn)


def load_with_adapter(model, adapter, allow_pickle: bool, device: str | None = None):
    """(StageInput, model, tokenizer): MODEL with its adapter on, a recovery directory standing for both."""
    from .artifacts import resolve_input
    from .models import load_adapter, load_model

    source = resolve_input(model, adapter)
    m, tok = load_model(source.model, allow_pickle=source.trusts(allow_pickle), device=device)
    if source.adapter:
        m = load_adapter(m, source.adapter, allow_pickle=allow_pickle)
    return source, m, tok


@main.command("eval")
@model_argument
@adapter_option
@config_options(EvalConfig, "tasks", "protocol", "limit", "sample", "seed", "engine", "precision", "batch_size",
                "prose", "prose_documents", "generation", "generation_prompts", "generation_tokens")
@click.option("--reference", help="The unpruned model (any MODEL spec): the KL to it on the held-out prose, and the "
              "perplexity that scores the generated text; default: the unpruned model a stage output was made from.")
@click.option("--data-dir", type=click.Path(), help="Directory of <task>/test.json (default: $RORA_DATA_DIR, else download).")
@click.option("--out", required=True, type=click.Path(dir_okay=False),
              help="Results JSON; a .md table and <stem>.examples.jsonl are written beside it.")
@device_option
@click.option("--overwrite", is_flag=True, help="Replace existing result files.")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="YAML with EvalConfig keys (flags win).")
@handles_errors
def eval_(model, allow_pickle, adapter, reference, tasks, data_dir, out, device, overwrite, config_file, **flags):
    """Evaluate MODEL (optionally with --adapter; a recovery directory brings both) on the commonsense suite, on
    held-out prose, and the quality of its own writing; prints a Markdown table."""
    from .evaluation.evaluate import check_data, check_outputs
    from .evaluation.tasks import parse_tasks

    from .artifacts import resolve_input
    from .evaluation.data import resolve_data_dir

    cfg = EvalConfig.from_yaml(config_file) if config_file else EvalConfig()
    cfg = cfg.replace(tasks=parse_tasks(tasks) if tasks is not None else None, **flags)
    source = resolve_input(model, adapter)  # a recovery directory is its base model plus its adapter
    # before loading the model: bad input writes nothing, and no output overwrites what the command reads
    check_outputs(out, overwrite, inputs=[model, source.model, source.adapter, resolve_data_dir(data_dir),
                                          *cfg.input_paths()])
    from .evaluation.evaluate import evaluate

    check_data(cfg, data_dir)  # a missing --data-dir or task file fails before the model loads
    source, m, tok = load_with_adapter(model, adapter, allow_pickle, device)
    ref, ref_name = _reference(cfg, source, m, reference, allow_pickle, device)
    results = evaluate(m, tok, cfg, data_dir=data_dir, out=out, model_name=source.model, adapter=source.adapter,
                       reference=ref, reference_name=ref_name)
    click.echo(results.to_markdown())


def _reference(cfg: EvalConfig, source, model, spec: str | None, allow_pickle: bool, device: str):
    """(reference model, its name) for the prose KL and the generation figures: --reference, else the model MODEL
    was made from; the evaluated model itself when that is what it names (and it carries no adapter)."""
    if not cfg.generation and cfg.prose == "none":
        return None, None
    from .artifacts import root_model
    from .models import load_model

    spec = spec or root_model(source.model)
    if str(spec) == str(source.model) and source.adapter is None:
        return model, str(spec)
    return load_model(spec, allow_pickle=allow_pickle, device=device)[0], str(spec)


@main.command()
@model_argument
@adapter_option
@click.option("--prompt", "prompts", multiple=True, help="A text for the model to continue (repeatable).")
@click.option("--prompts-file", type=click.Path(dir_okay=False),
              help="Prompts, one per line; or a .jsonl file with a \"prompt\" (or \"text\") field per line.")
@config_options(GenerateConfig, "max_new_tokens", "temperature", "top_p", "seed", "chat", "batch_size")
@click.option("--stream/--no-stream", default=True, show_default=True,
              help="Print the text as it is written (one prompt at a time).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (settings, and per prompt its text, new tokens and "
              "whether it stopped on an end-of-text token) once everything is written.")
@device_option
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="YAML with GenerateConfig keys (flags win).")
@handles_errors
def generate(model, allow_pickle, adapter, prompts, prompts_file, stream, as_json, device, config_file, **flags):
    """Let MODEL (any MODEL spec or stage output; a recovery directory, or --adapter, brings its adapter) write a
    continuation of each prompt: greedy by default, sampled with --temperature. With several prompts, each text
    follows a [i/n] line naming its prompt."""
    from .evaluation.text import gather_prompts

    cfg = (GenerateConfig.from_yaml(config_file) if config_file else GenerateConfig()).replace(**flags)
    texts = gather_prompts(prompts, prompts_file)  # before loading the model: bad input costs nothing
    from .evaluation.text import chat_enabled, generate_text

    source, m, tok = load_with_adapter(model, adapter, allow_pickle, device)
    chat = chat_enabled(tok, cfg.chat)  # --chat on a model without a template fails before any writing
    if stream and not as_json:  # each prompt alone, its text printed as it comes
        for i, prompt in enumerate(texts):
            _heading(i, texts)
            (g,) = generate_text(m, tok, [prompt], cfg, stream=lambda piece: click.echo(piece, nl=False))
            click.echo()
            _note_if_empty(i, g)
        return
    found = generate_text(m, tok, texts, cfg)
    if as_json:
        click.echo(json.dumps({"model": source.model, "adapter": str(source.adapter) if source.adapter else None,
                               "chat": chat, "config": cfg.to_dict(), "outputs": [g.to_dict() for g in found]},
                              indent=2, ensure_ascii=False))
        return
    for i, g in enumerate(found):
        _heading(i, texts)
        click.echo(g.text)
        _note_if_empty(i, g)


def _heading(i: int, prompts: list[str]) -> None:
    """With several prompts, a line naming the prompt before its text (and a blank line between texts)."""
    if len(prompts) > 1:
        click.echo(("\n" if i else "") + f"[{i + 1}/{len(prompts)}] {prompts[i]}")


def _note_if_empty(i: int, g) -> None:
    """An empty line alone would look like a hang or a bug: say on stderr that the model wrote nothing readable."""
    if not g.text.strip():
        how = "ended its text at once" if g.stopped and len(g.new_ids) == 1 else \
            f"wrote {len(g.new_ids)} tokens of no visible text"
        click.echo(f"rora: note: prompt {i + 1}: the model {how}", err=True)


# rora run's short flags: fields of the pipeline (a top-level key or section.key); every other key takes --set.
RUN_FLAGS = ("model", "out", "data", "data_dir", "device", "prune.ratio", "recover.method", "recover.rank", "recover.alpha",
             "recover.lr", "recover.max_steps", "recover.objective", "recover.text", "recover.max_text_tokens",
             "recover.text_ratio", "eval.protocol", "eval.tasks", "eval.limit",
             "export.format", "skip", "allow_pickle")


@main.command()
@click.argument("config_file", required=False, type=click.Path(dir_okay=False))
@click.option("--preset", help="A shipped preset: quickstart (the demo, CPU) or paper (Sheared-LLaMA-1.3B, GPU).")
@config_options(PipelineConfig, *RUN_FLAGS)
@click.option("--set", "settings", multiple=True, metavar="SECTION.KEY=VALUE",
              help="Set any key, e.g. recover.rank=8, prune.channel_multiple=32 or skip=[prune] (a YAML value; a "
                   "top-level key has no section). Repeatable.")
@click.option("--overwrite", is_flag=True, help="Run into an --out that is not a rora run, and rerun every stage.")
@click.option("--print-config", is_flag=True, help="Print the resolved config as YAML and exit.")
@handles_errors
def run(config_file, preset, settings, print_config, overwrite, **flags):
    """Prune -> evaluate -> recover -> merge -> evaluate -> export, in one resumable run.

    Settings come from CONFIG_FILE or --preset, then --set, then the flags (defaults < YAML < --set < flags). Each
    stage writes its own directory under --out; rerunning skips stages already done with the same settings and
    resumes an interrupted recovery.
    """
    from .config import load_preset, parse_setting
    from .evaluation.tasks import parse_tasks

    if config_file and preset:
        raise click.UsageError("give a CONFIG_FILE or --preset, not both")
    cfg = load_preset(preset) if preset else PipelineConfig.from_yaml(config_file) if config_file else PipelineConfig()
    cfg = cfg.with_settings(dict(parse_setting(s) for s in settings))
    if flags["tasks"] is not None:
        flags["tasks"] = parse_tasks(flags["tasks"])
    given = {path: flags[path.rpartition(".")[2]] for path in RUN_FLAGS}
    cfg = cfg.with_settings({path: value for path, value in given.items() if value is not None})
    if print_config:
        import yaml

        click.echo(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        return
    from .pipelines.run import run_pipeline
    from .pipelines.summary import summary_table

    result = run_pipeline(cfg, say=lambda msg: click.echo(msg, err=True), overwrite=overwrite)
    click.echo(summary_table(result))
    click.echo(f"\nsummary: {result.out / 'summary.md'}  chart: {result.out / 'summary.png'}")


@main.command()
@model_argument
@click.option("--adapter", type=click.Path(), help="PEFT adapter directory, or a recovery directory (RUN/recovery); "
              "not needed when MODEL is a recovery directory.")
@click.option("--out", required=True, help="Output directory for the merged model.")
@config_options(MergeConfig, "dtype", "compute_dtype")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="YAML with MergeConfig keys (flags win).")
@handles_errors
def merge(model, allow_pickle, adapter, out, overwrite, config_file, **flags):
    """Merge a LoRA/RoRA/DoRA adapter into MODEL; merged and verified in --compute-dtype (logits within the
    tolerance), then cast to --dtype; nothing is written unless it matches.

    MODEL may be a recovery directory: its base model and its adapter are merged."""
    from .artifacts import check_output, resolve_input

    cfg = (MergeConfig.from_yaml(config_file) if config_file else MergeConfig()).replace(**flags)
    source = resolve_input(model, adapter, need_adapter=True)
    check_output(out, overwrite, inputs=[model, source.model, source.adapter])  # before any work: bad input writes nothing
    from .artifacts import dir_size
    from .models import load_model
    from .recovery.merge import merge as merge_adapter, save_merged

    m, tok = load_model(source.model, allow_pickle=source.trusts(allow_pickle))
    merged, report = merge_adapter(m, source.adapter, cfg, allow_pickle=allow_pickle)
    path = save_merged(merged, tok, report, out, overwrite=overwrite, source=source.model)
    r = report.to_dict()
    scale = f"scale {r['effective_scale']:.4g}" if isinstance(r["effective_scale"], float) else f"scales {r['effective_scale']}"
    click.echo("\n".join([
        f"merged         {r['method']} rank {r['rank']} alpha {r['alpha']:g} ({scale})",
        f"modules        {r['merged_modules']} ({', '.join(r['target_modules'])})",
        f"max logit diff {r['max_abs_diff']:.3g} vs adapter model (tolerance {r['tolerance']:g}, {r['compute_dtype']})",
        f"saved          {path} ({r['dtype']}, {dir_size(path) / 1e6:.1f} MB)",
    ]))


@main.command()
@model_argument
@config_options(ExportConfig, "format", required=("format",))
@click.option("--out", required=True, help="Output directory (hf) or .gguf file path (gguf).")
@config_options(ExportConfig, "layout", "dtype")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="YAML with ExportConfig keys (flags win).")
@handles_errors
def export(model, allow_pickle, out, overwrite, config_file, **flags):
    """Export MODEL as a Hugging Face directory or a GGUF file, with a model card; verified by loading it back."""
    cfg = (ExportConfig.from_yaml(config_file) if config_file else ExportConfig()).replace(**flags)
    from .artifacts import check_output
    from .deployment import export_model, export_paths

    for path in export_paths(out, cfg.format):  # before loading the model: bad input writes nothing
        check_output(path, overwrite, inputs=[model])
    from .models import load_model
    from .deployment.card import card_from_stages

    m, tok = load_model(model, allow_pickle=allow_pickle)
    card = card_from_stages(model)  # the pruning and recovery records of a stage output, and what it came from
    card.setdefault("base_model", getattr(m.config, "name_or_path", None) or model)
    r = export_model(m, tok, cfg, out, overwrite=overwrite, card=card, source=model).to_dict()
    overhead = f" (+{r['overhead']:.1%} padding)" if r["layout"] == "padded" else ""
    click.echo("\n".join([
        f"exported       {r['format']} {r['layout']} {r['dtype']}",
        f"parameters     {r['parameters']:,}{overhead}",
        f"max logit diff {r['max_abs_diff']:.3g} vs source, read back by {r['verified_with']}",
        f"size on disk   {r['size_bytes'] / 1e6:.1f} MB",
        f"saved          {r['path']} (card: {r['card']})",
    ] + _edge_lines(r)))
    if (r.get("quality") or {}).get("warning"):
        click.echo(f"rora: warning: {r['quality']['warning']}", err=True)


def _edge_lines(r: dict) -> list[str]:
    """What llama.cpp said about a GGUF export, the quantization's perplexity change, and skipped checks."""
    lines = []
    if r.get("architecture"):
        lines.append(f"architecture   {r['architecture']}")
    if r.get("llamacpp"):
        e = r["llamacpp"]
        lines.append(f"llama.cpp      max logit diff {e['max_abs_diff']:.3g}, greedy tokens {e['greedy_match']}/"
                     f"{len(e['greedy_tokens'])} equal to the source ({e['version']})")
    if r.get("quality"):
        q = r["quality"]
        lines.append(f"perplexity     {q['reference_ppl']:.4g} (f32) -> {q['ppl']:.4g} ({q['increase']:+.2%}) on "
                     f"{q['tokens']} held-out tokens, in {q['engine']}")
    return lines + [f"note           {n}" for n in r.get("notes") or []]
