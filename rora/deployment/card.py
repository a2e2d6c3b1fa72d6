"""Model cards: a Markdown README for every export, saying what the model is and how it was made.

The card is rendered from a plain dict; every section is optional and only what is present is rendered:
    base_model   str                         the model that was pruned
    export       dict                        filled by export(): format, layout, dtype, parameters, size, loader,
                                             and for quantized GGUF the perplexity change and a recommendation
    shapes       list of {q_heads, kv_heads, intermediate} per layer
    prune        dict                        PruneConfig (or any pruning statistics: ratio, parameters, ...)
    pruning      dict                        a pruning report (statistics), rendered like `prune`
    merge        dict                        MergeReport.to_dict(): method, rank, alpha, effective scale, max diff
    recover      dict                        the recovery's config and report: method, rank, alpha, objective, ...
    parameters   {label: count}              e.g. {"base": 134515008, "pruned": 110000000}
    evaluation   {label: {task: accuracy}}   e.g. {"base": {"boolq": 0.61, "average": 0.5}, "recovered": {...}}; an
                                             accuracy may be {"accuracy", "se"} (evaluation.stats.accuracy_table),
                                             shown as "x ± se"
card_from_stages(path) fills base_model, pruning, recover and merge from the manifests of a stage output and of
every stage upstream of it.
"""
from __future__ import annotations

from pathlib import Path

from ..architecture import layer_runs
from ..artifacts import lineage

_RECOVERY_KEYS = ("method", "rank", "alpha", "effective_scale", "scaling_exponent", "objective", "target_modules",
                  "max_abs_diff")


def card_from_stages(path: str | Path) -> dict:
    """The card sections recorded by the stage output `path` and every stage upstream of it (the pruning report,
    the recovery's config and report, the merge report); {} for a model that is no stage output."""
    card = {}
    for manifest in lineage(path):  # nearest first: a stage repeated upstream is the older record
        if manifest.stage == "prune":
            # Per-layer lists and nested figures have their own sections; keep the card's tables to scalars.
            card.setdefault("pruning", {k: v for k, v in manifest.report.items() if not isinstance(v, (dict, list))})
            card.setdefault("base_model", manifest.source.get("model"))
        elif manifest.stage == "recover":
            card.setdefault("recover", {**manifest.config, **manifest.report})
        elif manifest.stage == "merge":
            card.setdefault("merge", manifest.report)
    return {k: v for k, v in card.items() if v is not None}


def render_card(card: dict) -> str:
    """The Markdown card for `card` (see the module docstring for the keys)."""
    export = card.get("export") or {}
    base = card.get("base_model")
    lines = ["---", "library_name: transformers", "tags: [rora, pruned, lora, llama]"]
    if base:
        lines.append(f"base_model: {base}")
    lines += ["---", "", f"# {export.get('name') or 'rora model'}", ""]
    made = [what for what, keys in (("structurally pruned", ("prune", "pruning")), ("recovered with a low-rank adapter "
            "merged into dense weights", ("merge", "recover"))) if any(card.get(k) for k in keys)]
    lines.append(
        f"{base or 'This model'}{', ' + ', then '.join(made) if made else ''}; exported by rora as {export.get('format', 'hf')}"
        + (f" ({export['layout']} layout, {export['dtype']})" if export.get("layout") else "") + "."
    )
    if export.get("loader"):
        lines += ["", "## How to load", "", export["loader"]]
    if export.get("recommendation"):  # quantized GGUF: its held-out perplexity change decides
        lines += ["", "## Which file to deploy", "", f"{export['recommendation']} (held-out perplexity "
                  f"{export.get('heldout_ppl_unquantized', 0):.4g} unquantized, {export.get('heldout_ppl', 0):.4g} here)."]
    lines += _table_section("Export", {k: v for k, v in export.items() if k not in ("loader", "name", "recommendation")})
    if card.get("shapes"):
        lines += ["", "## Per-layer shapes", "", "| layers | query heads | KV heads | MLP width |", "|---|---|---|---|"]
        lines += [f"| {span} | {q} | {kv} | {mlp} |" for span, (q, kv, mlp) in layer_runs(card["shapes"])]
    lines += _table_section("Pruning", card.get("pruning") or card.get("prune"))
    recovery = {**(card.get("recover") or {}), **(card.get("merge") or {})}  # the merge report is the authority
    lines += _table_section("Recovery", {k: recovery[k] for k in _RECOVERY_KEYS if recovery.get(k) is not None})
    if card.get("parameters"):
        lines += _table_section("Parameters", {k: f"{v:,}" for k, v in card["parameters"].items() if v is not None})
    if card.get("evaluation"):
        lines += ["", "## Evaluation (accuracy, %)", ""] + _eval_table(card["evaluation"])
    return "\n".join(lines) + "\n"


def _table_section(title: str, data: dict | None) -> list[str]:
    rows = [(k, v) for k, v in (data or {}).items() if isinstance(v, (str, int, float, bool, list)) and v is not None]
    if not rows:
        return []
    out = ["", f"## {title}", "", "| | |", "|---|---|"]
    for key, value in rows:
        if isinstance(value, float):
            value = f"{value:.6g}"
        elif isinstance(value, list):
            value = ", ".join(map(str, value)) if len(value) <= 12 else f"{len(value)} values"
        out.append(f"| {key} | {value} |")
    return out


def _eval_table(evaluation: dict) -> list[str]:
    labels = list(evaluation)
    tasks, averages = [], []  # averages ("average", "average w/o boolq") go last
    for scores in evaluation.values():
        for t in scores:
            group = averages if t.startswith("average") else tasks
            group += [] if t in group else [t]
    tasks += averages
    out = ["| task | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
    for task in tasks:
        cells = [evaluation[label].get(task) for label in labels]
        out.append(f"| {task} | " + " | ".join(_accuracy(c) for c in cells) + " |")
    return out


def _accuracy(cell) -> str:
    """A percentage; "x ± se" for {"accuracy", "se"} whose standard error is known (not NaN)."""
    if cell is None:
        return ""
    accuracy, se = (cell["accuracy"], cell.get("se")) if isinstance(cell, dict) else (cell, None)
    return f"{100 * accuracy:.1f}" + ("" if se is None or se != se else f" ± {100 * se:.1f}")
