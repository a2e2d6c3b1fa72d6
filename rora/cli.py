"""The `rora` command line: each command turns options (or --config YAML) into a stage config and calls one
API function. No logic lives here beyond that; heavy imports happen inside commands so `rora --help` is instant.
RoraError (and click's usage errors) become one line on stderr and exit code 2, never a traceback."""
from __future__ import annotations

import functools
import json
import sys

import click


def _fail(message: str) -> None:
    click.echo(f"rora: error: {message}", err=True)
    sys.exit(2)


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


def model_argument(fn):
    fn = click.argument("model")(fn)
    fn = click.option("--allow-pickle", is_flag=True, help="Allow loading a pickled (LLM-Pruner) checkpoint. Only for files you trust.")(fn)
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
    lines.append("per layer      layer: q_heads/kv_heads mlp")
    groups = []  # run-length encode identical consecutive layers so 30 layers stay readable
    for i, p in enumerate(s["per_layer"]):
        key = (p["q_heads"], p["kv_heads"], p["intermediate"])
        if groups and groups[-1][2] == key:
            groups[-1][1] = i
        else:
            groups.append([i, i, key])
    for start, end, (q, kv, mlp) in groups:
        span = f"{start}" if start == end else f"{start}-{end}"
        lines.append(f"  {span:>12}: {q}/{kv} {mlp}")
    return "\n".join(lines)
