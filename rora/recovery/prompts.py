"""LLM-Adapters' training prompt, character for character (../shared/PROTOCOL.md), and the prompt/response split.

The odd whitespace (two spaces after "request." without input, one with input, 16-space indents) is the
reference's and must stay: the published numbers were trained on exactly these strings.
"""
from __future__ import annotations

TRAIN_TEMPLATE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.  \n\n"
    "                ### Instruction:\n"
    "                {instruction}\n"
    "                \n"
    "                ### Response:\n"
    "                {output}"
)

TRAIN_TEMPLATE_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request. \n\n"
    "                ### Instruction:\n"
    "                {instruction}\n"
    "                \n"
    "                ### Input:\n"
    "                {input}\n"
    "                \n"
    "                ### Response:\n"
    "                {output}"
)


def training_prompt(instruction: str, input: str = "", output: str = "") -> str:
    """The full training text; with `output=""` it is the prompt part that precedes the response."""
    template = TRAIN_TEMPLATE_WITH_INPUT if input else TRAIN_TEMPLATE
    return template.format(instruction=instruction, input=input, output=output)


def split_prompt(instruction: str, input: str, output: str) -> tuple[str, str]:
    """(prompt, full text): the response is full[len(prompt):]."""
    return training_prompt(instruction, input, ""), training_prompt(instruction, input, output)
