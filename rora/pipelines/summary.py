"""The summary of a pipeline run: accuracy ± standard error per model, paired differences, the share of the
pruning gap each stage closed, held-out prose and records (loss, perplexity, KL), the quality of each model's own
writing with example continuations; as summary.json, summary.md and summary.png."""
from __future__ import annotations

import math
import re
from pathlib import Path

from ..artifacts import atomic_file, write_json
from ..evaluation.stats import WITHOUT_PRIOR, accuracy_table, gap_closed, paired_difference


# Later model first: "reconstructed - pruned" is what reconstruction alone won back.
COMPARISONS = (("reconstructed", "pruned"), ("recovered", "pruned"), ("recovered", "base"), ("pruned", "base"))
AFTER_PRUNING = ("reconstructed", "recovered")  # the models whose share of the pruning gap is reported
AVERAGES = ("average", WITHOUT_PRIOR)
NAMES = {"average": "average accuracy", WITHOUT_PRIOR: "accuracy w/o BoolQ"}  # their columns in the gap table
# A recovered model that repeats itself this many times as much as the unpruned model gets a warning: its accuracy
# can look recovered while its own text degenerates.
REPETITION_LIMIT = 1.5
EXAMPLES, EXAMPLE_CHARS = 3, 160
_SETS = {"text": "text openings", "task": "task prompts"}  # the generation figures' prompt sets, as a reader reads them


def evaluation_statistics(outcomes: dict) -> dict:
    """Standard errors per model, paired differences between models scored on the same examples, and the share
    of the pruning gap in average accuracy (with and without BoolQ) that each later model closed: None where the
    gap itself (pruned - base, paired) is inside two standard errors, since a share of noise means nothing."""
    if not outcomes:
        return {}
    stats = {"accuracy": {label: accuracy_table(o) for label, o in outcomes.items()}, "comparisons": {}}
    for b, a in COMPARISONS:
        if a in outcomes and b in outcomes and list(outcomes[a]) == list(outcomes[b]):
            stats["comparisons"][f"{b} - {a}"] = paired_difference(outcomes[a], outcomes[b])
    acc = stats["accuracy"]
    gap = stats["comparisons"].get("pruned - base", {})
    if gap:
        stats["gap_closed"] = {
            label: {avg: gap_closed(*(acc[k][avg]["accuracy"] for k in ("base", "pruned", label)))
                    if gap[avg]["significant"] else None for avg in AVERAGES if avg in acc[label]}
            for label in AFTER_PRUNING if label in acc}
    return stats


def heldout_statistics(heldout: dict, prose: dict | None = None) -> dict:
    """The share of the pruning gap in held-out loss (the records') and in prose log-perplexity that each later
    model closed."""
    found = {}
    for key, figures in (("heldout_gap_closed", heldout), ("prose_gap_closed", prose or {})):
        if {"base", "pruned"} <= set(figures):
            found[key] = {label: gap_closed(*(figures[k]["loss"] for k in ("base", "pruned", label)))
                          for label in AFTER_PRUNING if label in figures}
    return found


def _pm(x: float, se: float, signed: bool = False) -> str:
    value = f"{100 * x:+.1f}" if signed else f"{100 * x:.1f}"
    return value if se != se else f"{value} ± {100 * se:.1f}"


def _share(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def summary_table(result) -> str:
    """Markdown: per-task accuracy ± standard error of each evaluated model and the paired differences (marked *
    beyond two standard errors), the share of the pruning gap each stage closed, held-out prose and records,
    then parameters, sizes and stage times."""
    stats = evaluation_statistics(result.outcomes)
    held = heldout_statistics(result.heldout, result.prose)
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
            lines.append(f"| {f'**{t}**' if t in AVERAGES else t} | " + " | ".join(row) + " |")
        lines += ["", "Differences are paired (same examples); * marks those larger than two standard errors. "
                  "Anything without * is inside the noise."]
        lines.append("")
    closed = stats.get("gap_closed", {})
    if closed or held:
        lines += ["Share of the pruning gap closed (0% = pruned, 100% = back at the unpruned model):", "",
                  f"| model | {' | '.join(NAMES.values())} | prose log-perplexity | held-out records loss |",
                  "|---|---|---|---|---|"]
        for label in AFTER_PRUNING:
            cells = [*(closed.get(label, {}).get(avg) for avg in AVERAGES),
                     held.get("prose_gap_closed", {}).get(label), held.get("heldout_gap_closed", {}).get(label)]
            if any(c is not None for c in cells):
                lines.append(f"| {label} | " + " | ".join(_share(c) for c in cells) + " |")
        gap = stats["comparisons"].get("pruned - base", {}) if closed else {}
        noise = [NAMES[avg] for avg in AVERAGES if avg in gap and not gap[avg]["significant"]]
        if noise:
            lines += ["", f"({' and '.join(noise)}: '-', the pruned model's gap to the unpruned one is inside two "
                      "standard errors, and a share of noise means nothing.)"]
        lines.append("")
    if result.prose:
        first = next(iter(result.prose.values()))
        base = result.prose.get("base", {}).get("perplexity")
        lines += [f"Held-out prose ({first['source']}; {first['documents']} documents, never trained or calibrated "
                  "on), per token:", "",
                  "| model | loss | perplexity | x base | KL to base (nats) | tokens |", "|---|---|---|---|---|---|"]
        for label, p in result.prose.items():
            kl = "-" if p.get("kl") is None else f"{p['kl']:.3f}"
            ratio = f"{p['perplexity'] / base:.2f}" if base else "-"
            lines.append(f"| {label} | {p['loss']:.3f} | {p['perplexity']:.1f} | {ratio} | {kl} | {p['tokens']:,} |")
        lines.append("")
    if result.heldout:
        lines += ["Held-out records (the recovery's validation records), per token:", "",
                  "| model | whole-text loss | perplexity | KL to base (nats) | tokens |", "|---|---|---|---|---|"]
        for label, h in result.heldout.items():
            kl = "-" if h.get("kl") is None else f"{h['kl']:.3f}"
            lines.append(f"| {label} | {h['loss']:.3f} | {math.exp(min(h['loss'], 50)):.1f} | {kl} | "
                         f"{h.get('tokens', 0):,} |")
        lines.append("")
    if result.generation:
        lines += generation_lines(result.generation) + [""]
    lines += recovery_lines(result.recovery)
    for name, n in result.parameters.items():
        lines.append(f"- parameters, {name}: {n:,} ({n / 1e6:.1f}M)")
    for name, b in result.sizes.items():
        lines.append(f"- size on disk, {name}: {b / 2**20:.1f} MiB")
    for stage, t in result.stages.items():
        lines.append(f"- time, {stage}: {t['seconds']:.1f} s{' (done earlier)' if t['skipped'] else ''}")
    return "\n".join(lines)


def recovery_lines(recovery: dict) -> list[str]:
    """'- recovery objective: ...', '- learning rate: ...' (with --lr auto: the grid, every probe's held-out figure,
    the choice and its cost), '- recovery text: ...' (what was read of the text source) and '- on-policy
    distillation: ...'."""
    from ..recovery.lr_auto import describe
    from ..recovery.on_policy import describe as describe_on_policy
    from ..sources.text import describe_read

    lines = [f"- recovery objective: {recovery['objective']}"] if recovery.get("objective") else []
    if recovery.get("lr_auto"):
        lines.append(f"- learning rate: {describe(recovery['lr_auto'])}")
    elif recovery.get("lr") is not None:
        lines.append(f"- learning rate: {recovery['lr']:g}")
    if recovery.get("text"):
        lines.append(f"- recovery text: {describe_read(recovery['text'])}")
    if recovery.get("on_policy"):
        lines.append(f"- on-policy distillation: {describe_on_policy(recovery['on_policy'])}")
    return lines


def repetition_warning(generation: dict) -> str | None:
    """A plain warning when the recovered model repeats itself more than REPETITION_LIMIT times as much as the
    unpruned model on the same prompts, overall or on one prompt set (a model that answers the task prompts in a few
    words and stops writes few 4-grams there, so the overall figure is mostly its text openings'); the worst
    offence is named. None otherwise (or when the figures are missing)."""
    of_base, of_recovered = generation.get("base", {}), generation.get("recovered", {})
    pairs = [("", of_base.get("repetition"), of_recovered)]
    pairs += [(f" on the {_SETS.get(name, name)}", figures.get("repetition"),
               of_recovered.get("by_set", {}).get(name, {})) for name, figures in of_base.get("by_set", {}).items()]
    over = [(r["repetition"] / b if b else math.inf, where, b, r) for where, b, r in pairs
            if b is not None and r.get("repetition") is not None and r["repetition"] > REPETITION_LIMIT * b]
    if not over:
        return None
    _, where, base, recovered = max(over, key=lambda o: o[0])
    versus = f"{recovered['repetition'] / base:.2f}x the unpruned model's {100 * base:.1f}%" if base else \
        "where the unpruned model repeats none"
    return (f"Warning: the recovered model repeats itself{where}: {_repetition(recovered)}% of its 4-grams are "
            f"repeats, {versus} (the limit is {REPETITION_LIMIT:g}x). Its accuracy can look recovered while its own text "
            "degenerates: read the examples, or look with `rora generate`.")


def generation_lines(generation: dict) -> list[str]:
    """Markdown: repetition, distinct-2 and reference perplexity per model, the warning, and EXAMPLES continuations
    side by side (text openings first, then a task prompt)."""
    labels = list(generation)
    first = generation[labels[0]]
    names = list(first["by_set"])
    sets = ", ".join(f"{first['by_set'][n]['prompts']} {_SETS.get(n, n)}" for n in names)
    lines = [f"Generation: greedy continuations ({first['new_tokens']} new tokens) of held-out prompts ({sets}); "
             "perplexity of the written text under the unpruned model; tokens written per continuation (fewer: it "
             "ended the text itself):", "",
             f"| model | repetition (% of 4-grams) | {' / '.join(_SETS.get(n, n) for n in names)} | distinct-2 | "
             "reference perplexity | tokens written |", "|---|---|---|---|---|---|"]
    for label, g in generation.items():
        by_set = " / ".join(_repetition(g["by_set"].get(n, {})) for n in names)
        dis = "-" if g["distinct_2"] is None else f"{g['distinct_2']:.3f}"
        written = g.get("counts", {}).get("written_tokens")
        written = "-" if written is None else f"{written / g['prompts']:.1f}"
        lines.append(f"| {label} | {_repetition(g)} | {by_set} | {dis} | {g['reference_ppl']:.2f} | {written} |")
    warning = repetition_warning(generation)
    if warning:
        lines += ["", warning]
    examples = first["examples"]
    text = [k for k, e in enumerate(examples) if e["set"] == "text"]
    task = [k for k, e in enumerate(examples) if e["set"] == "task"]
    shown = (text[:EXAMPLES - 1] + task[:1]) if task else text[:EXAMPLES]
    lines += ["", "Example continuations:", "", "| prompt | " + " | ".join(labels) + " |",
              "|---" * (len(labels) + 1) + "|"]
    for k in shown:
        cells = [_cell(examples[k]["prompt"])] + [_cell(generation[label]["examples"][k]["text"]) for label in labels]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _percent(value, se=None) -> str:
    """A share as a percentage, with its standard error when known."""
    return "-" if value is None else f"{100 * value:.1f}" + ("" if se is None else f" ± {100 * se:.1f}")


def _repetition(figures: dict) -> str:
    """A generation figure set's repetition (± its standard error) as a percentage."""
    return _percent(figures.get("repetition"), figures.get("repetition_se"))


def _cell(text: str) -> str:
    """One line of a Markdown table cell: whitespace runs as one space, pipes escaped, long text cut."""
    text = re.sub(r"\s+", " ", text).strip()
    text = text if len(text) <= EXAMPLE_CHARS else text[:EXAMPLE_CHARS - 1] + "…"
    return text.replace("|", "\\|") or "(nothing)"


def write_summary(result) -> None:
    """summary.json, summary.md and summary.png (accuracy per task for base, pruned and recovered)."""
    write_json(result.out / "summary.json", result.to_dict())
    with atomic_file(result.out / "summary.md") as tmp:
        tmp.write_text(summary_table(result) + "\n")
    if result.outcomes:
        with atomic_file(result.out / "summary.png") as tmp:
            plot_summary(evaluation_statistics(result.outcomes)["accuracy"], tmp, result.evaluation)


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
