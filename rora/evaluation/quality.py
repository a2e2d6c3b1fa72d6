"""Generation quality: can the model still write? Accuracy and log-likelihood figures cannot tell: a recovery can
raise them while the model's own text degenerates into "Yes, yes, yes, ...".

The model continues a fixed set of held-out prompts greedily for a fixed number of tokens:
  * text: the OPENINGS below, general English written for this project (not in any training, calibration or test
    data), continued as plain text;
  * task: the evaluation prompts of held-out training records (the recovery's validation split; their answers are
    never read), so the model writes as the suite asks it to.
Each continuation is scored by
  * repetition: the share of its word 4-grams that repeat an earlier 4-gram of the same continuation (0 for text
    that never repeats itself; near 1 for a loop);
  * distinct-2: distinct word bigrams over all bigrams, across all continuations (Li et al., 2016): low when the
    model writes the same few phrases whatever the prompt;
  * reference perplexity: the perplexity of the written tokens, given their prompt, under a reference model (the
    unpruned one): high when the text is unlike anything the original model would write.
Words are lowercased runs of letters and digits, and each punctuation mark, so "Yes, yes, yes" is three repeats of
"yes ,". Figures are pooled over the continuations (sums of counts, then the ratio), and reported with their counts.
"""
from __future__ import annotations

import math
import re
from typing import Sequence

from ..errors import ConfigError
from .stats import ratio_se
from .tasks import eval_prompt

OPENINGS = (
    "The first thing I noticed when I moved to the city was",
    "Before the invention of the printing press, books were",
    "The best way to keep a vegetable garden healthy through a dry summer is",
    "On the morning of the storm, the harbour master walked down to the pier and",
    "Volcanoes form where",
    "My grandmother never wrote down her recipes. Instead, she",
    "The main difference between a virus and a bacterium is that",
    "When the last bus had left, the small village square",
    "A good teacher does not simply give answers; she",
    "The engineers tested the new bridge by",
    "Most people who learn to play the piano as adults find that",
    "The letter arrived three weeks late, and when Anna finally opened it,",
    "Bees find their way back to the hive by",
    "The old lighthouse keeper kept a notebook in which he",
    "To make bread without yeast, you can",
    "In the middle of the nineteenth century, most families in the countryside",
    "The reason the sky turns red at sunset is",
    "After the match, the coach gathered the players in the changing room and",
    "A museum is more than a building full of objects; it",
    "The small shop on the corner had sold the same three things for forty years:",
    "Learning a second language as a child",
    "When the power went out across the whole town, people",
    "The river that runs through the valley was once",
    "Good sleep matters for memory because",
    "He had never flown before, so when the plane began to move he",
    "The first step in repairing a bicycle tyre is to",
    "Desert plants survive long periods without rain by",
    "On the last day of school, the children",
    "Trade between distant cities grew quickly once",
    "The problem with building a house on sand is that",
    "She opened the door of the empty flat and saw that",
    "A healthy breakfast should include",
    "The committee met every Thursday to decide",
    "Whales and dolphins are mammals, which means that",
    "The village football team had not won a game in two years, until",
    "Before you paint a wooden fence, it is important to",
    "The ancient city was built on a hill so that",
    "My neighbour has a dog that",
    "Winter in the mountains is hard for the animals that live there, because",
    "The train was delayed by an hour, so the passengers",
    "Maps drawn five hundred years ago often showed",
    "The simplest way to save money each month is",
    "When the two friends met again after twenty years, they",
    "Rainforests are important to the whole planet because",
    "The new library opened in the spring, and within a month",
    "A compass works because",
    "The fisherman pulled in his net and found, among the fish,",
    "Most of the world's fresh water is",
)
NGRAM = 4  # repetition counts repeated 4-grams
DISTINCT = 2  # distinct-2
_WORDS = re.compile(r"\w+|[^\w\s]")


def words(text: str) -> list[str]:
    """Lowercased words and punctuation marks: the units repetition and distinct-2 count."""
    return _WORDS.findall(text.lower())


def ngrams(units: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(units[i:i + n]) for i in range(len(units) - n + 1)]


def repetition(texts: Sequence[str], n: int = NGRAM) -> dict:
    """Repeated n-grams (each occurrence after a continuation's first of it) over all n-grams, per continuation,
    pooled: {"repetition", "se", "repeated", "ngrams"}; repetition is None without any n-gram. `se`, the standard
    error over continuations (stats.ratio_se), is None with fewer than two continuations or no n-gram."""
    grams = [ngrams(words(t), n) for t in texts]
    total = sum(len(g) for g in grams)
    per_text = [len(g) - len(set(g)) for g in grams]
    se = ratio_se(per_text, [len(g) for g in grams])
    return {"repetition": sum(per_text) / total if total else None,
            "se": None if math.isnan(se) else se, "repeated": sum(per_text), "ngrams": total}


def distinct(texts: Sequence[str], n: int = DISTINCT) -> dict:
    """Distinct n-grams over all n-grams, across all continuations: {"distinct", "unique", "ngrams"}."""
    grams = [g for t in texts for g in ngrams(words(t), n)]
    return {"distinct": len(set(grams)) / len(grams) if grams else None, "unique": len(set(grams)),
            "ngrams": len(grams)}


def reference_nlls(reference, generations) -> list[float]:
    """Each continuation's summed negative log-likelihood of its written tokens, given its prompt, under
    `reference`."""
    from .loglik import pack, score_rows

    return [-s[0][0] for s in score_rows(reference, [pack([(g.prompt_ids, g.new_ids)]) for g in generations])]


def reference_perplexity(reference, generations) -> dict:
    """exp(mean negative log-likelihood) of the written tokens given their prompt under `reference`, pooled over
    every written token: {"perplexity", "nll", "tokens"}."""
    return _pooled_perplexity(generations, reference_nlls(reference, generations))


def _pooled_perplexity(generations, nlls: Sequence[float]) -> dict:
    """reference_perplexity from each continuation's summed negative log-likelihood (reference_nlls)."""
    tokens = sum(len(g.new_ids) for g in generations)
    nll = sum(nlls) / tokens
    return {"perplexity": math.exp(min(nll, 700.0)), "nll": nll, "tokens": tokens}


def quality_prompts(records: Sequence[dict] | None, n: int) -> list[dict]:
    """The held-out prompts, in a fixed order: up to `n` OPENINGS, then the evaluation prompts of the first `n`
    `records` (held-out training records; only their instruction is read). Each: {"set", "prompt", "text"}, where
    "text" is what the model reads and "prompt" what a reader is shown."""
    found = [{"set": "text", "prompt": o, "text": o} for o in OPENINGS[:n]]
    return found + [{"set": "task", "prompt": r["instruction"], "text": eval_prompt(r["instruction"])}
                    for r in list(records or ())[:n]]


def generation_quality(model, tokenizer, reference=None, records: Sequence[dict] | None = None, *, prompts: int = 12,
                       new_tokens: int = 48, batch_size: int = 8, progress: bool = False) -> dict:
    """Repetition, distinct-2 and reference perplexity of `model`'s greedy `new_tokens`-token continuations of the
    held-out prompts (quality_prompts(records, prompts)), overall and per set ("by_set"), with their counts and every
    continuation ("examples": set, prompt, text). `reference`: the model that scores the text (the unpruned model;
    None: `model` itself, as for the unpruned model); it must share `model`'s vocabulary. No chat template: the
    openings are continued as text, the task prompts are the suite's own."""
    from .loglik import decoder_and_head
    from .text import generate_text

    if reference is None:
        reference = model
    sizes = {decoder_and_head(m)[1].weight.shape[0] for m in (model, reference)}
    if len(sizes) > 1:
        raise ConfigError(f"the reference model's vocabulary ({sorted(sizes)}) differs from the model's: the "
                          "reference must use the same tokenizer (e.g. the unpruned model)")
    items = quality_prompts(records, prompts)
    written = generate_text(model, tokenizer, [i["text"] for i in items],
                            {"max_new_tokens": new_tokens, "chat": False, "batch_size": batch_size},
                            progress=progress)
    nlls = reference_nlls(reference, written)  # each continuation scored once; the sets pool their own
    sets = {name: [k for k, i in enumerate(items) if i["set"] == name] for name in ("text", "task")}
    by_set = {name: _figures([written[k] for k in ks], [nlls[k] for k in ks]) for name, ks in sets.items() if ks}
    return {**_figures(written, nlls), "new_tokens": new_tokens, "by_set": by_set,
            "examples": [{"set": i["set"], "prompt": i["prompt"], "text": g.text} for i, g in zip(items, written)]}


def _figures(generations, nlls) -> dict:
    texts = [g.text for g in generations]
    rep, dis, ppl = repetition(texts), distinct(texts), _pooled_perplexity(generations, nlls)
    return {"prompts": len(generations), "repetition": rep["repetition"], "repetition_se": rep["se"],
            "distinct_2": dis["distinct"], "reference_ppl": ppl["perplexity"],
            "counts": {"repeated_4grams": rep["repeated"], "4grams": rep["ngrams"], "distinct_bigrams": dis["unique"],
                       "bigrams": dis["ngrams"], "written_tokens": ppl["tokens"], "reference_nll": ppl["nll"]}}
