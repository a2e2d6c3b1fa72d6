"""Free text generation: a model writes a continuation of each prompt, greedy or sampled (`rora generate`, and the
continuations that rora.evaluation.quality scores).

A prompt goes through the model's chat template (as one user turn) when asked, or by default when the tokenizer has
one. Prompts are written in batches, longest first, left-padded with an attention mask; `generate` derives each
row's positions from the mask, so a prompt in a batch sees what it sees alone. Streaming writes one prompt at a time
(a streamer follows one row).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from transformers import TextStreamer

from ..config import GenerateConfig
from ..errors import ConfigError, DataError
from ..writing import continue_ids, writing_settings
from .loglik import progress_bar


@dataclass
class Generation:
    """One prompt and what the model wrote after it."""

    prompt: str  # as given
    text: str  # the continuation, special tokens removed
    prompt_ids: list[int] = field(repr=False)  # what the model read (the chat template applied, if it was)
    new_ids: list[int] = field(repr=False)  # what it wrote, the end-of-text token included when it stopped on one
    stopped: bool  # it wrote an end-of-text token (else it ran out of max_new_tokens)

    def to_dict(self) -> dict:
        return {"prompt": self.prompt, "text": self.text, "new_tokens": len(self.new_ids), "stopped": self.stopped}


def read_prompts(path: str | Path) -> list[str]:
    """The prompts in a file: a .jsonl file holds one object per line with a "prompt" (or "text") string; any other
    file holds one prompt per line. Blank lines are skipped."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"prompts file not found: {path}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    numbered = [(n, line) for n, line in enumerate(lines, 1) if line.strip()]
    prompts = [_jsonl_prompt(path, n, line) for n, line in numbered] if path.suffix == ".jsonl" else \
        [line for _, line in numbered]
    if not prompts:
        raise DataError(f"{path} holds no prompts")
    return prompts


def _jsonl_prompt(path: Path, number: int, line: str) -> str:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} line {number} is not valid JSON: {exc.msg}") from None
    found = [row[k] for k in ("prompt", "text") if isinstance(row, dict) and isinstance(row.get(k), str)]
    if not found:
        raise DataError(f"{path} line {number} has no string \"prompt\" or \"text\" field")
    return found[0]


def gather_prompts(prompts: Sequence[str] = (), prompts_file: str | Path | None = None) -> list[str]:
    """The given prompts, then those of `prompts_file`; at least one, none blank."""
    found = list(prompts) + (read_prompts(prompts_file) if prompts_file else [])
    if not found:
        raise ConfigError("no prompt: give --prompt TEXT (repeatable) or --prompts-file FILE")
    check_prompts(found)
    return found


def check_prompts(prompts: Sequence[str]) -> None:
    for i, prompt in enumerate(prompts, 1):
        if not isinstance(prompt, str):
            raise DataError(f"prompt {i} is a {type(prompt).__name__}, not text")
        if not prompt.strip():
            raise DataError(f"prompt {i} is empty: give the text the model should continue")


def chat_enabled(tokenizer, chat: bool | None) -> bool:
    """Whether prompts go through the chat template: `chat`, or (None) whether the tokenizer has one."""
    has = bool(getattr(tokenizer, "chat_template", None))
    if chat and not has:
        raise ConfigError("--chat: this model's tokenizer has no chat template; use --no-chat")
    return has if chat is None else chat


def encode_prompt(tokenizer, prompt: str, chat: bool) -> list[int]:
    """The token ids the model reads for `prompt`: as a user turn of the chat template (its tokens already hold
    what the template adds), or the text tokenized as usual."""
    if chat:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                               tokenize=False)
        return tokenizer(prompt, add_special_tokens=False).input_ids
    return tokenizer(prompt).input_ids


@torch.inference_mode()
def generate_text(model, tokenizer, prompts: str | Sequence[str], config: GenerateConfig | dict | None = None, *,
                  stream: Callable[[str], None] | None = None, progress: bool = False) -> list[Generation]:
    """What `model` writes after each prompt: greedy when `config.temperature` is 0, else sampled (temperature,
    top_p, seeded: the same prompts, seed and batch size give the same text), at most `config.max_new_tokens`
    tokens, stopping at an end-of-text token. Through the chat template per `config.chat` (None: when the tokenizer
    has one). `stream`: called with each piece of text as it is written (prompts then run one at a time); the
    pieces of one prompt join to its Generation's text. Works on a PeftModel too."""
    config = GenerateConfig.coerce(config)
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    check_prompts(prompts)
    chat = chat_enabled(tokenizer, config.chat)
    encoded = [encode_prompt(tokenizer, p, chat) for p in prompts]
    settings, stops = writing_settings(model, tokenizer, config)
    bar = progress_bar(len(prompts), progress, "write")
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # the caller's RNG is left alone
        torch.manual_seed(config.seed)
        written = continue_ids(model, encoded, settings, stops, 1 if stream else config.batch_size,
                               streamer=(lambda: _Streamer(tokenizer, stream)) if stream else None, done=bar.update)
    bar.close()
    return [Generation(p, tokenizer.decode(new, skip_special_tokens=True), e, new, stopped)
            for p, e, (new, stopped) in zip(prompts, encoded, written)]


class _Streamer(TextStreamer):
    """transformers' TextStreamer (decodes as tokens arrive, releases text at word boundaries), its text sent to a
    callback instead of print."""

    def __init__(self, tokenizer, emit: Callable[[str], None]):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.emit = emit

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if text:
            self.emit(text)
