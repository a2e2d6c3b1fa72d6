"""Data loading for rora's offline lm-eval tasks: `<data_dir>/<task>/lmeval_<split>.jsonl` (the original dataset
schema, as lm-eval's own hub tasks read it). data_dir comes from lm-eval metadata (`--metadata
'{"data_dir": "..."}'` or TaskManager(metadata=...)) or from $RORA_DATA_DIR.

The doc-processing functions are lm-eval's own (hellaswag's preprocess, winogrande's partial evaluation), imported
rather than copied so the offline tasks cannot drift from the hub tasks.
"""
import functools
import json
import os
from pathlib import Path

import datasets
from lm_eval.tasks.hellaswag.utils import process_docs as hellaswag_process_docs  # noqa: F401
from lm_eval.tasks.winogrande.preprocess_winogrande import (  # noqa: F401
    doc_to_choice as winogrande_doc_to_choice,
    doc_to_target as winogrande_doc_to_target,
    doc_to_text as winogrande_doc_to_text,
)


def _load(task, split, data_dir=None, rora_limit=None, rora_sample=None, rora_seed=0, **_):
    root = data_dir or os.environ.get("RORA_DATA_DIR")
    if not root:
        raise ValueError(
            f"rora lm-eval task {task}: set RORA_DATA_DIR or pass --metadata '{{\"data_dir\": DIR}}' "
            f"(expected DIR/{task}/lmeval_{split}.jsonl)"
        )
    path = Path(root).expanduser() / task / f"lmeval_{split}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (expected <data_dir>/{task}/lmeval_{split}.jsonl)")
    with path.open(encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    if rora_limit:  # lm-eval's --limit takes the first N docs anyway; building only those is faster
        records = records[: int(rora_limit)]
    elif rora_sample:  # likewise only the sampled docs (rora's --sample), so HellaSwag's 10k are not preprocessed
        from rora.evaluation.data import sample_indices

        records = [records[i] for i in sample_indices(len(records), int(rora_sample), int(rora_seed), task)]
    return datasets.DatasetDict({split: datasets.Dataset.from_list(records)})


# One named loader per task: the task YAMLs point at them with `custom_dataset: !function`.
load_boolq = functools.partial(_load, "boolq", "validation")
load_piqa = functools.partial(_load, "piqa", "validation")
load_social_i_qa = functools.partial(_load, "social_i_qa", "validation")
load_hellaswag = functools.partial(_load, "hellaswag", "validation")
load_winogrande = functools.partial(_load, "winogrande", "validation")
load_arc_easy = functools.partial(_load, "ARC-Easy", "test")
load_arc_challenge = functools.partial(_load, "ARC-Challenge", "test")
load_openbookqa = functools.partial(_load, "openbookqa", "test")
