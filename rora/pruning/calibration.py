"""Calibration text for pruning: a small built-in corpus, or records from recovery-format training data.

A pool of texts is drawn in a seeded order; `prune()` takes the first `num_samples` for importance and the next
`holdout_samples` for the held-out loss, so the two never overlap. Sources:
  * `builtin`: the paragraphs below (general English prose written for this project, no licence strings attached),
    one sample each. Enough for the defaults (10 + 8); ask for more and you get a DataError naming the limit.
  * a text source (rora.sources.text.TextSource: a .txt/.jsonl file, a save_to_disk directory, parquet/arrow/jsonl
    shards, a dataset directory or hub id, with `?split=..&field=..&config=..`): its first (num_samples +
    holdout_samples) * seq_len tokens, packed into sequences of seq_len (EOS between documents), in a seeded order;
  * a JSON file: a list of `{"instruction", "input", "output"}` records (the LLM-Adapters / recovery format), or a
    directory holding `<task>/train.json` files of that format. A record becomes one plain text: instruction, input
    (when present) and output on separate lines. Importance needs representative language, not the prompt template.
Each text is tokenized on its own and cut to `seq_len` tokens (LLM-Pruner uses fixed-length chunks of a corpus;
per-record samples keep records whole and need no corpus concatenation).
"""
from __future__ import annotations

import random

import torch

from ..errors import DataError
from ..sources.text import TextSource, names_records, read_records, record_text, text_sequences

BUILTIN = (
    "The river town woke slowly. Fishermen pushed their boats into the grey water while the baker lit his ovens, "
    "and by the time the church bell rang seven the smell of bread had reached every street along the harbour.",
    "Photosynthesis is the process by which green plants use sunlight, water and carbon dioxide to make sugar. "
    "Oxygen is released as a by-product, which is why forests and ocean algae matter so much for the air we breathe.",
    "To change a flat tyre, first park on level ground and switch on the hazard lights. Loosen the wheel nuts a "
    "little before lifting the car with the jack, then remove them completely and swap the wheel for the spare.",
    "She opened the letter with trembling hands. It was from her brother, who had left for the mountains ten years "
    "earlier and never written once. The first line said only that he was sorry, and that he was coming home.",
    "A prime number has exactly two divisors, one and itself. Two is the only even prime, because every other even "
    "number can be divided by two. Euclid proved more than two thousand years ago that there are infinitely many primes.",
    "The committee met on Tuesday to discuss the new library budget. Most members agreed that the children's section "
    "needed more books, but they argued for an hour about whether the longer opening hours were worth the cost.",
    "Water boils at one hundred degrees Celsius at sea level, but at lower temperatures high in the mountains, "
    "because the air pressure is lower there. That is why pasta takes longer to cook at a mountain hut.",
    "When you learn a new language, short daily practice works better than long sessions once a week. Reading simple "
    "stories, repeating phrases aloud and speaking with patient friends all help the words stay in memory.",
    "The old lighthouse keeper kept a logbook of every ship that passed. Over forty years he filled thirty notebooks "
    "with names, flags and weather, and today historians use them to study trade along the northern coast.",
    "Bees communicate the direction of flowers with a dance. A worker returning to the hive moves in a figure of "
    "eight, and the angle of the straight part tells the others where to fly relative to the sun.",
    "If a recipe calls for two cups of flour and you want to make half as much, use one cup. If it asks for three "
    "eggs, you may need to beat them together first and then measure out half of the mixture.",
    "The train was late again, so Marco sat on the platform bench and watched the pigeons. A woman beside him was "
    "reading a thick novel, and every few minutes she laughed quietly at something on the page.",
    "The heart pumps blood through two circuits. One carries blood to the lungs to collect oxygen, and the other "
    "sends that oxygen-rich blood to the muscles and organs before it returns to the heart again.",
    "Good software is easy to change. Small functions with clear names, tests that check real behaviour, and "
    "comments that explain why a choice was made all help the next person who has to read the code.",
    "Autumn arrived early that year. The maple trees along the avenue turned red in the first week of September, "
    "and the children collected the fallen leaves into great piles before jumping into them.",
    "A thermometer measures temperature, a barometer measures air pressure, and a hygrometer measures humidity. "
    "Weather stations combine these readings with wind speed to forecast rain, storms and sunny days.",
    "The museum's new exhibition tells the story of ancient trade routes. Visitors can see spices, silk, coins and "
    "pottery that travelled thousands of kilometres by camel and by ship before reaching distant markets.",
    "Saving money is easier with a plan. Write down what you earn and what you spend each month, set aside a fixed "
    "amount first, and decide in advance how much you can afford for meals out and entertainment.",
    "The moon has no light of its own; it reflects the light of the sun. As it travels around the earth we see "
    "different parts of its lit side, which is why it seems to grow and shrink over about a month.",
    "Grandfather repaired clocks in a small workshop behind the house. He let me hold the tiny screws with tweezers "
    "and taught me to listen to the tick, because a healthy clock, he said, sounds calm and even.",
    "Vaccines train the immune system to recognise a germ without causing the disease. When the real germ appears "
    "later, the body already knows how to fight it and can respond much faster.",
    "The football match ended in a draw after the home team scored in the final minute. Supporters sang all the way "
    "to the station, and the coach said afterwards that the players had never given up.",
    "Glass is made by heating sand, soda and lime until they melt into a thick liquid. As it cools it becomes hard "
    "but stays transparent, and skilled workers can blow or press it into bottles, windows and lenses.",
    "On the first day of school the teacher asked everyone to write down one thing they hoped to learn. The answers "
    "ranged from long division to how volcanoes work, and she pinned every card to the wall.",
    "A map uses a scale to show distance. If one centimetre on the map stands for one kilometre on the ground, a "
    "road drawn five centimetres long is about five kilometres in real life.",
    "The kitten hid under the sofa for two days after arriving. On the third morning it crept out, sniffed the dog "
    "carefully, and then fell asleep in a patch of sunlight on the kitchen floor.",
    "Electric current flows when there is a closed loop between the two ends of a battery. A switch opens or closes "
    "that loop, which is how a torch turns its bulb on and off.",
    "Many cities are planting trees along their streets to cool the air in summer. Shade reduces the temperature of "
    "pavements and buildings, and the leaves also catch dust and give birds a place to nest.",
)


def load_calibration(source: str, seed: int = 42) -> list[str]:
    """The pool of calibration texts for `source` ('builtin' or a path), shuffled with `seed`."""
    texts = list(BUILTIN) if source == "builtin" else [record_text(r) for r in read_records(source)]
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise DataError(f"calibration source {source!r} holds no text; give records with instruction/output text")
    random.Random(seed).shuffle(texts)
    return texts


def calibration_samples(tokenizer, config, texts: list[str] | None = None) -> tuple[list, list, str]:
    """(importance samples, held-out samples, what they are) for `config` (a PruneConfig): from `texts`, the
    builtin paragraphs or records (a text each, cut to seq_len), or from a text source (rora.sources.text.TextSource:
    its first (num_samples + holdout_samples) * seq_len tokens packed into sequences of seq_len, in a seeded order)."""
    n, need = config.num_samples, config.num_samples + config.holdout_samples
    source = config.calibration
    if texts is None and source != "builtin" and not names_records(source):
        seqs, what = text_sequences(TextSource.parse(source), tokenizer, config.seq_len, need, config.seed)
        ids = [torch.tensor([q], dtype=torch.long) for q in seqs[:need]]
        return ids[:n], ids[n:], what
    pool = load_calibration(source, config.seed) if texts is None else list(texts)
    calib, holdout = split_pool(pool, n, config.holdout_samples)
    what = source if texts is None else f"given ({len(pool)} texts)"
    return encode(tokenizer, calib, config.seq_len), encode(tokenizer, holdout, config.seq_len), what


def split_pool(texts: list[str], num_samples: int, holdout: int) -> tuple[list[str], list[str]]:
    """First `num_samples` texts for importance, the next `holdout` for the held-out loss (disjoint)."""
    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise DataError("calibration data is empty; pass texts, --calibration builtin, or a non-empty training file")
    need = num_samples + holdout
    if len(texts) < need:
        raise DataError(
            f"calibration data has {len(texts)} texts but num_samples ({num_samples}) + holdout_samples ({holdout}) "
            f"= {need} are needed; lower --num-samples / holdout_samples or give more data"
        )
    return texts[:num_samples], texts[num_samples:need]


def encode(tokenizer, texts: list[str], seq_len: int) -> list[torch.Tensor]:
    """Token ids of each text, cut to `seq_len`; texts too short to predict a token are an error."""
    out = []
    for text in texts:
        ids = tokenizer(text, truncation=True, max_length=seq_len, return_tensors="pt")["input_ids"]
        if ids.shape[1] < 2:
            raise DataError(f"calibration text {text[:40]!r} has fewer than 2 tokens; remove it or give longer text")
        out.append(ids)
    return out
