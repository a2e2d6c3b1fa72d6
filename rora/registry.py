"""Every name a config may hold, one table per kind: the methods, scorers, protocols, tasks, formats and dtypes.

Config validation, the CLI's help and the stage modules all read these tables, so a name is added or renamed in
one place; tests/test_registry.py checks that each stage module implements exactly its table's names. This module
imports nothing heavy (config.py imports it, and the stage modules import config).
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Iterable

from .errors import ConfigError


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """' (did you mean X?)' for the closest known name, or ''."""
    close = difflib.get_close_matches(str(name), list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


class Registry:
    """The names of one kind, in order, each with what the code needs to know about it (or None).

    `aliases` are further accepted names for an entry that listings leave out (gguf's float32 for f32)."""

    def __init__(self, kind: str, entries: dict[str, Any] | Iterable[str], aliases: dict[str, str] | None = None):
        self.kind = kind
        self._entries = dict(entries) if isinstance(entries, dict) else dict.fromkeys(entries)
        self.aliases = dict(aliases or {})

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def __contains__(self, name) -> bool:
        return name in self._entries or name in self.aliases

    def __iter__(self):
        return iter(self._entries)

    def items(self):
        return self._entries.items()

    def get(self, name: str) -> Any:
        """The entry for `name` (or its alias), or ConfigError with a did-you-mean and the known names."""
        if name not in self:
            raise ConfigError(f"unknown {self.kind} {name!r}{did_you_mean(name, self)}; "
                              f"known {self.kind}s: {', '.join(self)}")
        return self._entries[self.aliases.get(name, name)]

    __getitem__ = get

    def problem(self, key: str, value: str) -> list[str]:
        """[] when `value` is a name here, else the one message every config key gets for an unknown name."""
        if value in self:
            return []
        return [f"{key} must be one of {', '.join(self)}, got {value!r}{did_you_mean(value, self)}"]


@dataclass(frozen=True)
class Method:
    """An adapter method: its scaling exponent b (scale = alpha / r**b) and whether it is DoRA."""

    name: str
    scaling_exponent: float
    use_dora: bool = False
    description: str = ""

    @property
    def b(self) -> float:
        return self.scaling_exponent


METHODS = Registry("method", {m.name: m for m in (
    Method("lora", 1.0, description="LoRA: scale alpha/r (shrinks as the rank grows)"),
    Method("rora", 0.5, description="RoRA: scale alpha/sqrt(r) (rank-stabilized, PEFT use_rslora)"),
    Method("dora", 1.0, use_dora=True, description="DoRA: weight-decomposed LoRA, scale alpha/r"),
)})
OBJECTIVES = Registry("objective", ("auto", "sft", "kd", "kd+sft"))
TEACHER_DTYPES = Registry("teacher dtype", ("auto", "float32", "bfloat16", "float16"))
SCHEDULERS = Registry("scheduler", ("linear", "cosine"))
SYNTHETIC_PROMPTS = Registry("synthetic prompt source", ("records", "general"))



@dataclass(frozen=True)
class ReconstructMethod:
    """A reconstruction method: the rules its refits may choose among, per projection, on held-out calibration
    text ("unchanged" is always among them, so a refit never makes the held-out error worse)."""

    name: str
    rules: tuple[str, ...]
    description: str = ""

    @property
    def needs_bias(self) -> bool:
        return self.rules == ("bias",)


RECONSTRUCT_METHODS = Registry("reconstruction method", {m.name: m for m in (
    ReconstructMethod("bias", ("bias",), "FLAP-style compensation: the mean residual becomes an output bias"),
    ReconstructMethod("lstsq", ("bias", "lstsq"), "damped least squares of the weights with an output bias"),
)})
CALIBRATION_TEXTS = Registry("calibration text", ("teacher", "records"))  # or records or a text source
BUILTIN_CALIBRATION = ("builtin",)  # pruning's own paragraphs; else records or a text source

IMPORTANCE = Registry("importance scorer", ("l1", "l2", "random", "taylor", "obs", "obs-mlp"))
TAYLOR_VARIANTS = Registry("Taylor variant", ("vectorwise", "element1", "element2"))
GQA_MODES = Registry("GQA mode", ("within-group", "whole-group"))

# The commonsense suite, in the order of every table of results.
TASKS = Registry("task", ("boolq", "piqa", "social_i_qa", "hellaswag", "winogrande", "ARC-Easy", "ARC-Challenge",
                          "openbookqa"))
PROTOCOLS = Registry("protocol", ("generate", "score", "lm-eval"))
ENGINES = Registry("engine", ("rora", "lm-eval"))  # the lm-eval protocol's log-likelihoods: native or lm-eval's HFLM
# Matmul precision of the rora engine's scoring (eval.precision) and of training (recover.precision): auto (bfloat16
# autocast on GPU, the model's own float32 elsewhere), float32, bfloat16 (autocast, a CPU too)
PRECISIONS = Registry("precision", ("auto", "float32", "bfloat16"))

MERGE_DTYPES = Registry("merge dtype", ("float32", "float16", "bfloat16"))
COMPUTE_DTYPES = Registry("compute dtype", ("float64", "float32"))

# Each export format with its dtypes. The K-quants (q6_k ...) are llama.cpp's own quantizer only.
EXPORT_FORMATS = Registry("export format", {
    "hf": Registry("hf dtype", ("float32", "float16", "bfloat16")),
    "gguf": Registry("gguf dtype", ("f32", "f16", "q8_0", "q6_k", "q5_k_m", "q4_k_m"),
                     aliases={"float32": "f32", "float16": "f16"}),
})
LAYOUTS = Registry("layout", ("compact", "padded"))

PIPELINE_STAGES = Registry("stage", ("eval_base", "prune", "eval_pruned", "reconstruct", "eval_reconstructed", "recover",
                                     "merge", "eval_recovered", "export"))
