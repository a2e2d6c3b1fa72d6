"""The `rora` command line: each command turns options (or --config YAML) into a stage config and calls one
API function. No logic lives here beyond that; heavy imports happen inside commands so `rora --help` is instant.
RoraError (and click's usage errors) become one line on stderr and exit code 2, never a traceback."""
from __future__ import annotations

import functools
import json
import os
import sys

import click


def _fail(message: str) -> None:
    _close_progress_bars()
    click.echo(f"rora: error: {message}", err=True)
    sys.exit(2)


def _close_progress_bars() -> None:
    """A run that fails mid-way leaves its tqdm bar open; close it so the error is the last line on stderr."""
    tqdm = sys.modules.get("tqdm")
    if tqdm is not None:
        for bar in list(getattr(tqdm.tqdm, "_instances", ())):
            bar.close()
    sys.stdout.flush()


def handles_errors(fn):
    """Turn library exceptions into one clear stderr line and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from .errors import RoraError

        try:
            return fn(*args, **kwargs)
        except RoraError as exc:
            _fail(str(exc))
        except KeyboardInterrupt:
            _fail("interrupted; outputs in progress were discarded (re-run with --resume where supported)")
        except OSError as exc:  # the file system said no (full disk, read-only, permissions): name the path
            where = exc.filename or ""
            _fail(f"cannot access {where}: {exc.strerror or exc}" if where else f"{type(exc).__name__}: {exc}")

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="rora")
def main():
    """rora: prune LLaMA-family models and recover their accuracy with RoRA adapters.

    \b
    Stages:  prune -> recover -> eval -> merge -> export   (or all at once: rora run)
    Models:  a hub id, a local HF directory, a .gguf file, an LLM-Pruner checkpoint (--allow-pickle),
             or the embedded alias smollm2-135m.
    """
    # transformers' per-file "Loading weights" bars would bury the one line a user needs among our own progress bars.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


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
@click.option("--ratio", type=float, help="Fraction of heads/channels to remove in each pruned layer, in [0, 1).")
@click.option("--out", required=True, help="Output directory for the pruned model.")
@click.option("--layers", help="'uniform' (every layer alike, default) or START:END (e.g. 4:30, LLM-Pruner's default).")
@click.option("--importance", help="l1, l2, taylor (default) or random.")
@click.option("--taylor", help="Taylor variant: vectorwise (default), element1 or element2.")
@click.option("--gqa", help="within-group (query heads evenly per KV group, default) or whole-group.")
@click.option("--num-samples", type=int, help="Calibration samples for importance (default 10).")
@click.option("--calibration", help="'builtin' text, or training data: a JSON file or a dir of <task>/train.json.")
@click.option("--channel-multiple", type=int, help="Keep a multiple of N MLP channels per layer (32 suits llama.cpp's "
              "quantized GGUF; default 1).")
@click.option("--seed", type=int, help="Seed for sample order and random importance.")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="YAML with PruneConfig keys (flags win).")
@handles_errors
def prune(model, allow_pickle, ratio, out, overwrite, config_file, **flags):
    """Prune whole attention heads and MLP channels of MODEL and save it to --out."""
    from .artifacts import check_output
    from .config import PruneConfig

    cfg = PruneConfig.from_yaml(config_file) if config_file else PruneConfig()
    cfg = cfg.replace(ratio=ratio, **flags)
    check_output(out, overwrite, inputs=[model])  # before any work: bad input writes nothing
    from .models import load_model
    from .pruning.prune import prune as prune_model, save_pruned

    m, tok = load_model(model, allow_pickle=allow_pickle)
    report = prune_model(m, tok, cfg)
    path = save_pruned(m, tok, report, out, overwrite=overwrite, source=model)
    click.echo(format_prune(report.to_dict(), path))


def format_prune(r: dict, path) -> str:
    a = r["actual"]
    lines = [
        f"pruned         {r['importance']} importance, ratio {r['requested_ratio']}, layers "
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
    how = "standard (plain transformers loads it)" if r["standard_config"] else "per-layer shapes (load with rora)"
    lines.append(f"saved          {path}, config {how}")
    return "\n".join(lines)


def _csv(value):
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


@main.command()
@model_argument
@click.option("--data", help="Training records: JSON/JSONL file, directory of <task>/train.json, or hub id.")
@click.option("--out", required=True, help="Output directory (adapter/, checkpoints/, metrics, manifest).")
@click.option("--objective", help="auto (default: kd with a --teacher, else sft), sft (response cross-entropy), kd (distil --teacher on every token) or kd+sft.")
@click.option("--teacher", help="Teacher model spec for kd (any MODEL spec, e.g. the unpruned model).")
@click.option("--kd-temperature", type=float, help="Distillation temperature T (default 1; the KL is scaled by T^2).")
@click.option("--kd-weight", type=float, help="kd+sft: the KD term's share of the loss, in (0, 1) (default 0.5).")
@click.option("--teacher-dtype", help="auto (bfloat16 on GPU, float32 on CPU), float32, bfloat16 or float16.")
@click.option("--text", type=click.Path(dir_okay=False), help="Plain-text training data instead of --data: .txt, or "
                                                              ".jsonl with a 'text' field; packed to --cutoff-len.")
@click.option("--synthetic", type=int, help="Data-free: the teacher writes N training texts (continuing the --data "
                                            "prompts, or short seed prompts); cached for reruns.")
@click.option("--synthetic-tokens", type=int, help="New tokens the teacher samples per synthetic text (default 128).")
@click.option("--method", help="Adapter method: rora (alpha/sqrt(r), default), lora (alpha/r) or dora.")
@click.option("--rank", type=int, help="Adapter rank (default 32).")
@click.option("--alpha", type=float, help="Adapter alpha (default 2 * rank).")
@click.option("--scaling-exponent", type=float, help="b in scale = alpha / rank**b (default: the method's; 1 lora, 0.5 rora).")
@click.option("--target-modules", help="Comma-separated modules (default q_proj,k_proj,v_proj,up_proj,down_proj).")
@click.option("--lr", type=float, help="Learning rate (default 2e-4).")
@click.option("--epochs", type=float, help="Epochs (default 3).")
@click.option("--max-steps", type=int, help="Stop after this many optimizer steps (overrides --epochs).")
@click.option("--batch-size", type=int, help="Examples per optimizer step (default 16).")
@click.option("--micro-batch-size", type=int, help="Examples per forward pass (default 16).")
@click.option("--cutoff-len", type=int, help="Max tokens per example; longer ones are dropped and counted (default 256).")
@click.option("--val-set-size", type=int, help="Validation examples carved from the training data (default 120).")
@click.option("--max-train-examples", type=int, help="Use only the first N training examples (after the seeded shuffle).")
@click.option("--warmup-steps", type=int, help="Linear learning-rate warmup steps (default 100).")
@click.option("--eval-steps", type=int, help="Evaluate every N steps (default 80).")
@click.option("--save-steps", type=int, help="Checkpoint every N steps (default 80).")
@click.option("--seed", type=int, help="Seed for the split, data order and dropout (default 42).")
@click.option("--train-on-inputs", is_flag=True, default=None, help="Loss on the prompt tokens too (LLM-Adapters' default).")
@click.option("--gradient-checkpointing", is_flag=True, default=None, help="Recompute activations to save memory.")
@click.option("--resume", is_flag=True, help="Continue the interrupted run into --out from its latest checkpoint.")
@click.option("--overwrite", is_flag=True, help="Start again: replace --out (once the new run is complete) and any interrupted run.")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="YAML with RecoverConfig keys (flags win).")
@handles_errors
def recover(model, allow_pickle, data, out, target_modules, teacher, resume, overwrite, config_file, **flags):
    """Train a RoRA/LoRA/DoRA adapter on MODEL with --data (or --text, or --synthetic with a --teacher); the best
    adapter lands in --out/adapter.

    The run trains in .OUT.partial beside --out and takes the place of --out when it completes."""
    from .config import RecoverConfig
    from .recovery.distill import check_objective, teacher_dtype

    cfg = RecoverConfig.from_yaml(config_file) if config_file else RecoverConfig()
    cfg = cfg.replace(target_modules=_csv(target_modules), **flags).with_objective(teacher is not None)
    check_objective(cfg, teacher is not None)  # before loading anything
    from .models import load_model
    from .recovery.trainer import check_recover_output, recover as recover_adapter

    check_recover_output(out, resume, overwrite, inputs=[i for i in (model, data, teacher) if i])  # before loading the model

    m, tok = load_model(model, allow_pickle=allow_pickle)
    t_model, t_tok = load_model(teacher, allow_pickle=allow_pickle, dtype=teacher_dtype(cfg.teacher_dtype)) if teacher else (None, None)
    result = recover_adapter(m, tok, data, cfg, out, resume=resume, overwrite=overwrite, source=model,
                             teacher=t_model, teacher_tokenizer=t_tok)
    click.echo(format_recover(result.to_dict(), cfg))


def format_recover(r: dict, cfg) -> str:
    best = "n/a (no validation split)" if r["best_val_loss"] is None else f"{r['best_val_loss']:.4f} at step {r['best_step']}"
    figure = {"sft": "val loss", "kd": "val KL", "kd+sft": "val objective"}[cfg.objective]
    held = r.get("val_metrics") or {}
    return "\n".join([
        f"method         {cfg.method} rank {cfg.rank} alpha {cfg.resolved_alpha:g} (scale {r['effective_scale']:.4g})",
        f"objective      {cfg.objective}" + (f" (T={cfg.kd_temperature:g})" if cfg.objective != "sft" else ""),
        f"steps          {r['steps']}   tokens {r['train_tokens']:,}   {r['tokens_per_second']:.1f} tokens/s",
        f"best {figure:<9} {best}",
        *([f"held-out       whole-text loss {held['val_text_loss']:.4f}"
           + (f", KL to the teacher {held['val_kl']:.4f}" if "val_kl" in held else "")] if held else []),
        f"dropped        {r['dropped_too_long']} examples longer than cutoff_len={cfg.cutoff_len}",
        f"adapter        {r['adapter_dir']}",
        f"metrics        {r['metrics_path']}",
    ])


@main.command("eval")
@model_argument
@click.option("--adapter", type=click.Path(file_okay=False), help="A PEFT adapter directory (or a recovery directory) to "
              "load onto MODEL; not needed when MODEL is a recovery directory.")
@click.option("--tasks", help="'all' (default) or a comma list: boolq,piqa,social_i_qa,hellaswag,winogrande,"
                              "ARC-Easy,ARC-Challenge,openbookqa.")
@click.option("--protocol", help="generate (LLM-Adapters beam search + match), score (constrained log-likelihood, "
                                 "default) or lm-eval (lm-eval-harness zero-shot).")
@click.option("--limit", type=int, help="Evaluate the first N examples of each task (file order).")
@click.option("--sample", type=int, help="Evaluate a seeded random N examples of each task (instead of --limit).")
@click.option("--seed", type=int, help="Seed of --sample (default 0): the same N and seed give the same examples.")
@click.option("--engine", help="lm-eval protocol: rora (native log-likelihood engine, default; lm-eval's numbers, "
                               "faster) or lm-eval (lm-eval-harness's own HF backend).")
@click.option("--batch-size", type=int, help="Prompts (generate), examples (score) or rows (--engine lm-eval) per forward "
                                     "pass; the rora engine batches by a token budget.")
@click.option("--data-dir", type=click.Path(), help="Directory of <task>/test.json (default: $RORA_DATA_DIR, else download).")
@click.option("--out", required=True, type=click.Path(dir_okay=False),
              help="Results JSON; a .md table and <stem>.examples.jsonl are written beside it.")
@click.option("--overwrite", is_flag=True, help="Replace existing result files.")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="YAML with EvalConfig keys (flags win).")
@handles_errors
def eval_(model, allow_pickle, adapter, tasks, protocol, limit, sample, seed, engine, batch_size, data_dir, out,
          overwrite, config_file):
    """Evaluate MODEL (optionally with --adapter; a recovery directory brings both) on the commonsense suite;
    prints a Markdown table."""
    from .config import EvalConfig
    from .evaluation.evaluate import check_data, check_outputs
    from .evaluation.tasks import parse_tasks

    cfg = EvalConfig.from_yaml(config_file) if config_file else EvalConfig()
    cfg = cfg.replace(tasks=parse_tasks(tasks) if tasks else None, protocol=protocol, limit=limit, sample=sample,
                      seed=seed, engine=engine, batch_size=batch_size)
    check_outputs(out, overwrite)  # before loading the model: bad input writes nothing
    from .evaluation.evaluate import evaluate, load_adapter
    from .models import load_model

    check_data(cfg, data_dir)  # a missing --data-dir or task file fails before the model loads
    from .artifacts import resolve_input

    source = resolve_input(model, adapter)  # a recovery directory is its base model plus its adapter
    m, tok = load_model(source.model, allow_pickle=allow_pickle)
    if source.adapter:
        m = load_adapter(m, source.adapter, allow_pickle=allow_pickle)
    results = evaluate(m, tok, cfg, data_dir=data_dir, out=out, model_name=source.model, adapter=source.adapter)
    click.echo(results.to_markdown())


@main.command()
@click.argument("config_file", required=False, type=click.Path(dir_okay=False))
@click.option("--preset", help="A shipped preset: quickstart (the demo, CPU) or paper (Sheared-LLaMA-1.3B, GPU).")
@click.option("--model", help="Model spec to start from (overrides the config).")
@click.option("--out", help="Output directory; one subdirectory per stage.")
@click.option("--data", help="Recovery training data (file, directory of <task>/train.json, or hub id).")
@click.option("--data-dir", help="Evaluation data directory (default: $RORA_DATA_DIR, else the hub).")
@click.option("--ratio", type=float, help="Pruning ratio in [0, 1).")
@click.option("--method", help="Adapter method: rora, lora or dora.")
@click.option("--rank", type=int, help="Adapter rank.")
@click.option("--alpha", type=float, help="Adapter alpha (default 2 * rank).")
@click.option("--lr", type=float, help="Learning rate.")
@click.option("--max-steps", type=int, help="Cap recovery at this many optimizer steps.")
@click.option("--objective", help="Recovery objective: auto (default: kd, the unpruned model is the teacher), sft, kd or kd+sft.")
@click.option("--protocol", help="Evaluation protocol: score, generate or lm-eval.")
@click.option("--tasks", help="'all' (default) or comma-separated tasks.")
@click.option("--limit", type=int, help="Evaluate the first N examples per task.")
@click.option("--format", "export_format", help="Export format: hf or gguf.")
@click.option("--skip", help="Comma-separated stages to skip: eval_base, prune, eval_pruned, recover, merge, eval_recovered, export.")
@click.option("--allow-pickle", is_flag=True, default=None, help="Allow a pickled (LLM-Pruner) checkpoint as the model.")
@click.option("--overwrite", is_flag=True, help="Run into an --out that is not a rora run, and rerun every stage.")
@click.option("--print-config", is_flag=True, help="Print the resolved config as YAML and exit.")
@handles_errors
def run(config_file, preset, export_format, print_config, overwrite, **flags):
    """Prune -> evaluate -> recover -> merge -> evaluate -> export, in one resumable run.

    Settings come from CONFIG_FILE or --preset (defaults < YAML < flags). Each stage writes its own directory
    under --out; rerunning skips stages already done with the same settings and resumes an interrupted recovery.
    """
    from .config import PipelineConfig, load_preset
    from .evaluation.tasks import parse_tasks

    if config_file and preset:
        raise click.UsageError("give a CONFIG_FILE or --preset, not both")
    cfg = load_preset(preset) if preset else PipelineConfig.from_yaml(config_file) if config_file else PipelineConfig()
    cfg = cfg.replace(
        model=flags["model"], out=flags["out"], data=flags["data"], data_dir=flags["data_dir"],
        allow_pickle=flags["allow_pickle"], skip=_csv(flags["skip"]),
        prune=cfg.prune.replace(ratio=flags["ratio"]),
        recover=cfg.recover.replace(method=flags["method"], rank=flags["rank"], alpha=flags["alpha"], lr=flags["lr"],
                                    max_steps=flags["max_steps"], objective=flags["objective"]),
        eval=cfg.eval.replace(protocol=flags["protocol"], tasks=parse_tasks(flags["tasks"]) if flags["tasks"] else None,
                            limit=flags["limit"]),
        export=cfg.export.replace(format=export_format),
    )
    if print_config:
        import yaml

        click.echo(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        return
    from .pipeline import run_pipeline
    from .summary import summary_table

    result = run_pipeline(cfg, say=lambda msg: click.echo(msg, err=True), overwrite=overwrite)
    click.echo(summary_table(result))
    click.echo(f"\nsummary: {result.out / 'summary.md'}  chart: {result.out / 'summary.png'}")


@main.command()
@model_argument
@click.option("--adapter", type=click.Path(), help="PEFT adapter directory, or a recovery directory (RUN/recovery); "
              "not needed when MODEL is a recovery directory.")
@click.option("--out", required=True, help="Output directory for the merged model.")
@click.option("--dtype", help="Dtype of the merged weights: float32 (default), float16 or bfloat16. Merging is always fp32.")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="YAML with MergeConfig keys (flags win).")
@handles_errors
def merge(model, allow_pickle, adapter, out, dtype, overwrite, config_file):
    """Merge a LoRA/RoRA/DoRA adapter into MODEL; merged and verified in float64 (logits within 1e-4), then cast; nothing is written unless it matches.

    MODEL may be a recovery directory: its base model and its adapter are merged."""
    from .artifacts import check_output, resolve_input
    from .config import MergeConfig

    cfg = (MergeConfig.from_yaml(config_file) if config_file else MergeConfig()).replace(dtype=dtype)
    source = resolve_input(model, adapter, need_adapter=True)
    check_output(out, overwrite, inputs=[model, source.model, source.adapter])  # before any work: bad input writes nothing
    from .artifacts import dir_size
    from .models import load_model
    from .recovery.merge import merge as merge_adapter, save_merged

    m, tok = load_model(source.model, allow_pickle=allow_pickle)
    merged, report = merge_adapter(m, source.adapter, cfg, allow_pickle=allow_pickle)
    path = save_merged(merged, tok, report, out, overwrite=overwrite, source=source.model)
    r = report.to_dict()
    scale = f"scale {r['effective_scale']:.4g}" if isinstance(r["effective_scale"], float) else f"scales {r['effective_scale']}"
    click.echo("\n".join([
        f"merged         {r['method']} rank {r['rank']} alpha {r['alpha']:g} ({scale})",
        f"modules        {r['merged_modules']} ({', '.join(r['target_modules'])})",
        f"max logit diff {r['max_abs_diff']:.3g} vs adapter model (tolerance {r['tolerance']:g}, fp32)",
        f"saved          {path} ({r['dtype']}, {dir_size(path) / 1e6:.1f} MB)",
    ]))


@main.command()
@model_argument
@click.option("--format", "export_format", required=True, help="hf (safetensors directory) or gguf (one .gguf file).")
@click.option("--out", required=True, help="Output directory (hf) or .gguf file path (gguf).")
@click.option("--layout", help="Non-uniform models. compact (default): hf for rora.load_model only; gguf as llama.cpp's "
              "deci architecture (per-layer head counts), which llama.cpp runs and transformers' GGUF loader cannot. "
              "padded: zero-padded to one shape, same outputs; hf loads in plain transformers, gguf (llama) in llama.cpp, "
              "transformers and any runtime that needs uniform layers.")
@click.option("--dtype", help="hf: float32 (default), float16, bfloat16. gguf: f32, f16, q8_0; with llama-cpp-python "
              "installed (pip install 'rora[edge]') also q6_k, q5_k_m, q4_k_m, quantized by llama.cpp itself. "
              "Quantized GGUFs are reported with their held-out perplexity change.")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="YAML with ExportConfig keys (flags win).")
@handles_errors
def export(model, allow_pickle, export_format, out, layout, dtype, overwrite, config_file):
    """Export MODEL as a Hugging Face directory or a GGUF file, with a model card; verified by loading it back."""
    from .config import ExportConfig

    cfg = (ExportConfig.from_yaml(config_file) if config_file else ExportConfig()).replace(
        format=export_format, layout=layout, dtype=dtype)
    from .artifacts import check_output

    check_output(out, overwrite, inputs=[model])  # before loading the model: bad input writes nothing
    from .models import load_model
    from .export.card import card_from_stages
    from .export import export_model

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
