"""The commonsense suite as data: one `Task` row per task (file, answer pattern, labels, lm-eval choices), the
LLM-Adapters evaluation prompt, and the answer extraction that reproduces the reference script exactly.

Nothing here branches on a task name: the generate, score and lm-eval protocols read these rows.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from .. import registry
from ..errors import ConfigError

# LLM-Adapters commonsense_evaluate.py generate_prompt (empty input): one space after "request.", no indented blank
# line before "### Response:" (it differs from the training prompt). Pinned char for char by a test.
EVAL_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request. \n\n"
    "                ### Instruction:\n"
    "                {instruction}\n\n"
    "                ### Response:\n"
    "                "
)
RESPONSE_SPLIT = "### Response:"
# What the fine-tuned model is trained to write before its label ("the correct answer is answer3").
ANSWER_PREFIX = "the correct answer is "
_FORMAT = re.compile(r"Answer format: (\S+)")


@dataclass(frozen=True)
class Task:
    """One task of the suite.

    pattern: the reference's regex; the FIRST match in the response is the prediction (case-sensitive).
    labels: every label the pattern allows (the `score` protocol's candidates unless a record narrows them).
    lmeval_task: the offline task shipped in lmeval_tasks/ (over `<task>/lmeval_<split>.jsonl`);
    lmeval_hub_task: lm-eval's own task of the same split, used when no local lmeval file exists.
    lmeval_metric: LLM-Pruner's reported metric for this task (acc or acc_norm).
    """

    name: str
    pattern: str
    labels: tuple[str, ...]
    lmeval_task: str
    lmeval_hub_task: str
    lmeval_split: str
    lmeval_metric: str
    file: str = "test.json"

    @property
    def lmeval_file(self) -> str:
        return f"lmeval_{self.lmeval_split}.jsonl"


_ANSWERS = ("answer1", "answer2", "answer3", "answer4", "answer5")
_ANSWER_PATTERN = "answer1|answer2|answer3|answer4|answer5"

TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("boolq", "true|false", ("true", "false"), "rora_boolq", "boolq", "validation", "acc"),
        Task("piqa", "solution1|solution2", ("solution1", "solution2"), "rora_piqa", "piqa", "validation", "acc"),
        Task("social_i_qa", _ANSWER_PATTERN, _ANSWERS, "rora_social_i_qa", "social_iqa", "validation", "acc"),
        Task("hellaswag", "ending1|ending2|ending3|ending4", ("ending1", "ending2", "ending3", "ending4"),
             "rora_hellaswag", "hellaswag", "validation", "acc_norm"),
        Task("winogrande", "option1|option2", ("option1", "option2"), "rora_winogrande", "winogrande", "validation",
             "acc"),
        Task("ARC-Easy", _ANSWER_PATTERN, _ANSWERS, "rora_arc_easy", "arc_easy", "test", "acc"),
        Task("ARC-Challenge", _ANSWER_PATTERN, _ANSWERS, "rora_arc_challenge", "arc_challenge", "test", "acc_norm"),
        Task("openbookqa", _ANSWER_PATTERN, _ANSWERS, "rora_openbookqa", "openbookqa", "test", "acc_norm"),
    )
}
assert tuple(TASKS) == registry.TASKS.names()  # the registry names the tasks and their order


def get_task(name: str) -> Task:
    """The task row for `name`; unknown names list the known ones."""
    registry.TASKS.get(name)  # the one unknown-name message, with a did-you-mean
    return TASKS[name]


def parse_tasks(spec: str | list[str] | tuple[str, ...]) -> list[str]:
    """'all' or a comma list (or a list) -> task names in the given order; unknown names raise ConfigError."""
    names = [s.strip() for s in spec.split(",") if s.strip()] if isinstance(spec, str) else list(spec)
    if names == ["all"]:
        return list(TASKS)
    if not names:
        raise ConfigError(f"no task given; use 'all' or a comma list of: {', '.join(TASKS)}")
    return [get_task(n).name for n in names]


def eval_prompt(instruction: str) -> str:
    """The reference evaluation prompt for one record (all records of the suite have an empty `input`)."""
    return EVAL_PROMPT.format(instruction=instruction)


def response_of(decoded: str) -> str:
    """The reference's response: the text after the last "### Response:", stripped."""
    return decoded.split(RESPONSE_SPLIT)[-1].strip()


def extract_answer(task: Task | str, response: str) -> str:
    """The reference's prediction: the first match of the task's pattern (case-sensitive), or "" when none."""
    task = get_task(task) if isinstance(task, str) else task
    found = re.findall(task.pattern, response)
    return found[0] if found else ""


def record_labels(task: Task, instruction: str) -> tuple[str, ...]:
    """The labels one record allows: its "Answer format: a/b/c" line (SIQA has 3 answers, some ARC items 3 or 5),
    restricted to the task's labels; the task's labels when the line is missing."""
    found = _FORMAT.findall(instruction)
    if found:
        labels = tuple(x for x in found[-1].split("/") if x in task.labels)
        if labels:
            return labels
    return task.labels
