"""One dataclass per stage, with validation in __post_init__ and a YAML round trip.

Precedence is defaults < YAML < flags: the CLI loads YAML with `from_dict`, then applies flags with `replace`
(rora run: `with_settings`, for its --set section.key=value before its flags).
Every problem of a config is collected before raising, so a user fixes them in one go.

Each field's metadata holds its help text ("help", which the CLI's options show) and, for a field that holds names,
the registry table they must come from ("names", rora.registry).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .artifacts import read_text
from .errors import ConfigError, detail
from .registry import (BUILTIN_CALIBRATION, CALIBRATION_TEXTS, COMPUTE_DTYPES, ENGINES, EXPORT_FORMATS, GQA_MODES,
                       IMPORTANCE, LAYOUTS, MERGE_DTYPES, METHODS, OBJECTIVES, PIPELINE_STAGES, PRECISIONS,
                       PROTOCOLS, RECONSTRUCT_METHODS, SCHEDULERS, SYNTHETIC_PROMPTS, TASKS, TAYLOR_VARIANTS,
                       TEACHER_DTYPES, Registry, did_you_mean)


def setting(default: Any, help: str, names: Registry | None = None, *, maximum: float | None = None,
            input: bool = False):
    """A config field with its help text and, for a name-valued field, its registry table. A list or dataclass
    default becomes a factory, so instances never share it. `maximum`: the largest value accepted (a count that
    sizes an allocation is bounded before anything is allocated). `input`: the field names a file or directory the
    stage reads, which no output may overwrite (input_paths)."""
    metadata = {"help": help, **({"names": names} if names is not None else {}),
                **({"maximum": maximum} if maximum is not None else {}), **({"input": True} if input else {})}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    if isinstance(default, type) or isinstance(default, functools.partial):  # a section: a config per instance
        return field(default_factory=default, metadata=metadata)
    return field(default=default, metadata=metadata)


def _listing(names: typing.Iterable[str]) -> str:
    """'a, b or c', for help texts."""
    *rest, last = names
    return f"{', '.join(rest)} or {last}" if rest else last


def _check_type(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_check_type(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin in (list, tuple):
        (inner, *_) = typing.get_args(hint) or (Any,)
        return isinstance(value, (list, tuple)) and all(_check_type(v, inner) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return isinstance(value, hint)
    return isinstance(value, hint) if isinstance(hint, type) else True


AUTO = "auto"  # the value of a setting that rora chooses itself (recover.lr)
DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")  # where the models of a command or run are put (models.resolve_device)
DEVICE_HELP = "Where the models run: auto (the GPU when this machine has one, else the CPU), cpu, cuda, cuda:N or mps."


def device_problem(key: str, value: str) -> list[str]:
    return [] if DEVICE.fullmatch(value) else [f"{key} must be auto, cpu, cuda, cuda:N or mps, got {value!r}"]

# Counts bounded before anything is allocated: a step plan holds one entry per optimizer step.
MAX_STEPS = 10**7
BIG = 2**20  # tokens, texts or samples: far beyond any real run, far below what would exhaust memory
MAX_TEXT_TOKENS = 10**10  # a token budget: packed tokens are held in memory (about 40 bytes each), read as they stream


class StageConfig:
    """Mixin for the stage dataclasses: type checks, problem collection, dict and YAML round trip.

    EXCLUSIVE: pairs of keys of which one may be set; a layer that sets one (flags over YAML or a preset) clears
    the other, so the later layer wins instead of the two clashing."""

    EXCLUSIVE: tuple = ()

    def problems(self) -> list[str]:
        """Stage-specific checks; subclasses extend. Each entry names the key."""
        return []

    def out_of_bounds(self, positive=(), non_negative=()) -> list[str]:
        """'<section>.<key> must be > 0' for each of `positive` that is not (>= 0 for `non_negative`); a key left
        unset (None) passes."""
        found = []
        for keys, op, ok in ((positive, ">", lambda v: v > 0), (non_negative, ">=", lambda v: v >= 0)):
            found += [f"{self.section}.{k} must be {op} 0, got {getattr(self, k)}" for k in keys
                      if getattr(self, k) is not None and not ok(getattr(self, k))]
        return found

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        found = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, tuple):  # YAML gives lists; keep one representation
                value = list(value)
                object.__setattr__(self, f.name, value)
            if not _check_type(value, hints[f.name]):
                found.append(f"{self.section}.{f.name}: expected {_type_name(hints[f.name])}, got {value!r}")
            elif isinstance(value, float) and not math.isfinite(value):  # NaN and inf pass every `x <= 0` check
                found.append(f"{self.section}.{f.name} must be a finite number, got {value}")
        if not found:
            found = [p for f in dataclasses.fields(self) if "names" in f.metadata
                     for value in _as_list(getattr(self, f.name))
                     for p in f.metadata["names"].problem(f"{self.section}.{f.name}", value)]
            found += [f"{self.section}.{f.name} must be <= {f.metadata['maximum']:g}, got {getattr(self, f.name)}"
                      for f in dataclasses.fields(self) if "maximum" in f.metadata
                      and getattr(self, f.name) is not None and getattr(self, f.name) > f.metadata["maximum"]]
            found += self.problems()
        if found:
            raise ConfigError("invalid config: " + "; ".join(found))

    @property
    def section(self) -> str:
        return getattr(type(self), "SECTION", type(self).__name__)

    @classmethod
    def from_dict(cls, data: dict | None):
        """Build from a plain dict (YAML section); unknown keys are errors with a did-you-mean."""
        data = dict(data or {})
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = [k for k in data if k not in names]
        if unknown:
            section = getattr(cls, "SECTION", cls.__name__)
            raise ConfigError(
                "; ".join(f"unknown key {section}.{k}{did_you_mean(k, names)}" for k in unknown)
                + f" (known keys: {', '.join(names)})"
            )
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        kwargs = {}
        for k, v in data.items():
            hint = hints[k]
            sub = _dataclass_in(hint)
            if sub is not None and isinstance(v, dict):  # a section: the keys it gives over the section's defaults
                kwargs[k] = sub.from_dict({**_changed_defaults(fields[k], sub), **v})
            else:
                kwargs[k] = _numeric_string(v, hint)
        return cls(**kwargs)

    @classmethod
    def coerce(cls, value):
        """`value` as this config: None gives the defaults, a dict goes through from_dict, anything else but an
        instance is a ConfigError (the API's config arguments accept all three)."""
        if value is None:
            return cls()
        if isinstance(value, dict):
            return cls.from_dict(value)
        if not isinstance(value, cls):
            raise ConfigError(f"expected a {cls.__name__} (or a dict of its keys), got {type(value).__name__}")
        return value

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def from_yaml(cls, path: str | Path):
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        data = load_yaml(read_text(path, ConfigError, CONFIG_LIMIT), str(path))
        if data is not None and not isinstance(data, dict):
            raise ConfigError(f"{path} must hold a mapping of keys to values, not {type(data).__name__}")
        return cls.from_dict(data)

    def replace(self, **changes):
        """A copy with the non-None `changes` applied (how CLI flags override YAML)."""
        changes = {k: v for k, v in changes.items() if v is not None}
        return dataclasses.replace(self, **{**{k: None for k in self.cleared_by(changes)}, **changes})

    @classmethod
    def cleared_by(cls, keys) -> list[str]:
        """The keys that setting `keys` clears: the other of each EXCLUSIVE pair one of them sets alone."""
        keys = set(keys)
        return [b for pair in cls.EXCLUSIVE for a, b in (pair, pair[::-1]) if a in keys and b not in keys]

    def input_paths(self) -> list[str]:
        """The values of the fields that name what the stage reads (setting(input=True)), sections included."""
        found = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, StageConfig):
                found += value.input_paths()
            elif f.metadata.get("input") and value is not None:
                found.append(value)
        return found


CONFIG_LIMIT = 2**20  # bytes of a YAML config: the shipped presets are 2 KB


class _NoAliases(yaml.SafeLoader):
    """safe_load without aliases: a few lines of nested aliases expand to billions of values once anything walks
    them (a "billion laughs" bomb), and no rora config needs one."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            raise yaml.composer.ComposerError(None, None, "aliases (*name) are not allowed in a rora config",
                                              self.peek_event().start_mark)
        return super().compose_node(parent, index)


def load_yaml(text: str, where: str) -> Any:
    """The YAML value of `text` (a config file, a --set value); ConfigError naming `where` when it is not valid
    YAML, uses an alias or is nested too deeply."""
    try:
        return yaml.load(text, Loader=_NoAliases)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where} is not valid YAML: {detail(exc)}") from None
    except RecursionError:
        raise ConfigError(f"{where} is not a rora config: nested too deeply") from None


def _numeric_string(value: Any, hint: Any) -> Any:
    """YAML 1.1 reads `2e-4` (no dot) as a string; a float field takes any string that is a plain number."""
    if isinstance(value, str) and _check_type(1.5, hint):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _changed_defaults(f: dataclasses.Field, section: type) -> dict:
    """The keys where a section field's default (rora run's recover section: lr auto) differs from the section
    class's own defaults."""
    if f.default_factory is dataclasses.MISSING:
        return {}
    own, given = section().to_dict(), f.default_factory().to_dict()
    return {k: v for k, v in given.items() if own[k] != v}


def calibration_typo(section: str, value: str, words) -> list[str]:
    """A calibration setting close to one of its words (teachr) that names no existing path: a typo, not a dataset
    id to stream."""
    near = did_you_mean(value, words)
    if value in words or not near or Path(value).expanduser().exists():
        return []
    return [f"{section}.calibration {value!r} is neither {' nor '.join(words)} nor a file, directory or dataset{near}"]


def _as_list(value) -> list:
    return value if isinstance(value, list) else [value]


def _dataclass_in(hint: Any):
    for h in (hint, *typing.get_args(hint)):
        if isinstance(h, type) and dataclasses.is_dataclass(h):
            return h
    return None


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


@dataclass
class PruneConfig(StageConfig):
    """Structured pruning (LLM-Pruner's method): whole attention heads and MLP channels."""

    SECTION = "prune"
    ratio: float = setting(0.2, "Fraction of heads/channels to remove in each pruned layer, in [0, 1).")
    mlp_ratio: float | None = setting(None, "Fraction of MLP channels to remove in each pruned layer, in [0, 1), "
                                            "when it differs from the heads' (ratio); unset: ratio.")
    importance: str = setting("taylor", f"Importance scorer: {_listing(IMPORTANCE)}. obs ranks units by what a "
                                        "least-squares refit can make up for (the demo's, which keeps every head), "
                                        "obs-mlp does so for MLP channels and leaves heads to Taylor; both need "
                                        "thousands of tokens of a corpus (--calibration, --num-samples 64).",
                              IMPORTANCE)
    taylor: str = setting("vectorwise", f"Taylor variant (LLM-Pruner's): {_listing(TAYLOR_VARIANTS)}.", TAYLOR_VARIANTS)
    layers: str = setting("uniform", "'uniform' (every layer alike) or START:END (e.g. 4:30, LLM-Pruner's default).")
    attention: bool = setting(True, "Prune attention heads.")
    mlp: bool = setting(True, "Prune MLP intermediate channels.")
    gqa: str = setting("within-group", "within-group (query heads evenly per KV group) or whole-group (whole KV groups).",
                       GQA_MODES)
    calibration: str = setting("builtin", "'builtin' text, training records (a JSON file or a dir of "
                                          "<task>/train.json), or a text source as for recover --text (options as "
                                          "SPEC?split=..&field=..&config=..; its first num_samples + holdout_samples "
                                          "sequences of seq_len tokens).", input=True)
    num_samples: int = setting(10, "Calibration samples for importance.", maximum=BIG)
    seq_len: int = setting(128, "Calibration sequence length in tokens.", maximum=BIG)
    holdout_samples: int = setting(8, "Held-out samples (disjoint from calibration) for the loss before/after.",
                                   maximum=BIG)
    # 32 fits llama.cpp's quantization blocks: a width that is not a multiple of 32 leaves every ffn_down in f16 in a
    # q8_0 GGUF.
    channel_multiple: int = setting(1, "Keep a multiple of N MLP channels per layer, the nearest to what ratio keeps "
                                       "(32 suits llama.cpp's quantized GGUF).")
    seed: int = setting(42, "Seed for sample order and random importance.")

    @property
    def channel_ratio(self) -> float:
        """The fraction of MLP channels to remove: mlp_ratio, or ratio when unset."""
        return self.ratio if self.mlp_ratio is None else self.mlp_ratio

    def problems(self) -> list[str]:
        out = self.out_of_bounds(positive=("channel_multiple", "num_samples", "seq_len"), non_negative=("holdout_samples",))
        for key in ("ratio", "mlp_ratio"):
            value = getattr(self, key)
            if value is not None and not 0.0 <= value < 1.0:
                out.append(f"prune.{key} must be in [0, 1), got {value}")
        out += calibration_typo(self.section, self.calibration, BUILTIN_CALIBRATION)
        if self.layers != "uniform":
            start, sep, end = self.layers.partition(":")
            if not (sep and start.strip().isdigit() and end.strip().isdigit() and int(start) < int(end)):
                out.append(f"prune.layers must be 'uniform' or 'START:END' with START < END, got {self.layers!r}")
        return out


@dataclass
class ReconstructConfig(StageConfig):
    """Closed-form reconstruction of a pruned model against the unpruned one (rora.reconstruction): each layer's
    o_proj and down_proj refitted, in order, so that its output follows the teacher's residual stream."""

    SECTION = "reconstruct"
    method: str = setting("lstsq", "bias (FLAP-style: the mean residual becomes each projection's output bias; measured worse than "
                                   "none on SmolLM2-135M, kept for comparison) or "
                                   "lstsq (damped least squares of o_proj and down_proj with an output bias); each "
                                   "projection keeps its old weights when held-out text says the refit does not help.",
                          RECONSTRUCT_METHODS)
    calibration: str = setting("teacher", "Calibration text: teacher (general text the unpruned model writes), records "
                                          "(the recovery's training records), a .json file or directory of records, or "
                                          "a text source as for recover --text (options as "
                                          "SPEC?split=..&field=..&config=..).", input=True)
    num_samples: int = setting(64, "Calibration sequences to fit on.", maximum=BIG)
    holdout_samples: int = setting(16, "Further sequences, held out, on which each projection's rule and damping are "
                                       "chosen.", maximum=BIG)
    seq_len: int = setting(128, "Tokens per calibration sequence.", maximum=2**16)
    damping: list[float] = setting([1e-2, 1e-1, 1.0, 10.0, 100.0], "lstsq: damping grid toward the old weights, "
                                                                 "relative to the mean diagonal of the inputs' Gram "
                                                                 "matrix.")
    bias: bool = setting(True, "Allow an output bias (Llama: attention_bias and mlp_bias, read by transformers and "
                               "llama.cpp); other architectures refit weights only.")
    batch_size: int = setting(8, "Calibration sequences per forward pass.", maximum=BIG)
    precision: str = setting("auto", "Matmul precision of the forward passes: auto (bfloat16 autocast on GPU, float32 "
                                     "on CPU), float32, or bfloat16 (autocast; on a CPU with AVX512-BF16 the demo's "
                                     "reconstruction took 1.28x less time with the same validation KL, see "
                                     "BENCHMARKS.md). The residual streams, statistics and solves stay full precision.",
                             PRECISIONS)
    temperature: float = setting(1.0, "Sampling temperature of the teacher's calibration text.", maximum=100.0)
    seed: int = setting(0, "Seed of the teacher's sampling and of the calibration order.")

    def problems(self) -> list[str]:
        out = self.out_of_bounds(positive=("num_samples", "holdout_samples", "seq_len", "batch_size", "temperature"))
        if self.seq_len < 2:
            out.append(f"reconstruct.seq_len must be at least 2, got {self.seq_len}")
        if not self.damping or any(not (math.isfinite(d) and d > 0) for d in self.damping):
            out.append(f"reconstruct.damping must list finite numbers > 0, got {self.damping}")
        out += calibration_typo(self.section, self.calibration, CALIBRATION_TEXTS.names())
        return out


@dataclass
class RecoverConfig(StageConfig):
    """Adapter training; defaults follow the DoRA commonsense recipe (../shared/PROTOCOL.md)."""

    SECTION = "recover"
    method: str = setting("rora", "Adapter method: rora (scale alpha/sqrt(r)), lora (alpha/r) or dora (weight-decomposed "
                                  "LoRA, alpha/r).", METHODS)
    rank: int = setting(32, "Adapter rank.", maximum=2**16)
    alpha: float | None = setting(None, "Adapter alpha; unset: 2 * rank.")
    scaling_exponent: float | None = setting(None, "b in scale = alpha / rank**b; unset: the method's own (1 lora, "
                                                   "0.5 rora).")
    target_modules: list[str] = setting(["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"],
                                        "Modules to adapt (comma-separated on the command line).")
    dropout: float = setting(0.05, "Adapter dropout probability, in [0, 1).")
    lr: float | str = setting(2e-4, "Learning rate, or auto: a short probe of a few values around a rule of thumb for "
                                    "the method, rank and objective, compared on the validation split; the run "
                                    "continues from the winning probe (rora.recovery.lr_auto).")
    lr_probe_steps: int | None = setting(None, "lr auto: optimizer steps per probe; unset: the warmup plus 5, at least "
                                               "8, at most a quarter of the run (but 2 at least).", maximum=MAX_STEPS)
    epochs: float = setting(3.0, "Epochs (max_steps overrides them).")
    max_steps: int | None = setting(None, "Stop after this many optimizer steps (overrides epochs).", maximum=MAX_STEPS)
    batch_size: int = setting(16, "Examples per optimizer step.", maximum=BIG)
    micro_batch_size: int = setting(16, "Examples per forward pass; batch_size / micro_batch_size accumulation steps.",
                                    maximum=BIG)
    cutoff_len: int = setting(256, "Max tokens per example; longer ones are dropped and counted.", maximum=BIG)
    val_set_size: int = setting(120, "Validation examples carved from the training data (never from a test set).")
    max_train_examples: int | None = setting(None, "Use only the first N training examples (after the seeded "
                                                   "shuffle); unset: all.")
    eval_steps: int = setting(80, "Evaluate on the validation split every N steps and after the last; 0: never (the "
                                  "final weights are the result, the validation split still held out).")
    save_steps: int = setting(80, "Checkpoint every N steps.")
    warmup_steps: int = setting(100, "Linear learning-rate warmup steps.")
    scheduler: str = setting("linear", f"Learning-rate decay after the warmup: {_listing(SCHEDULERS)}.", SCHEDULERS)
    weight_decay: float = setting(0.0, "AdamW weight decay.")
    train_on_inputs: bool = setting(False, "Loss on the prompt tokens too (LLM-Adapters' default).")
    gradient_checkpointing: bool = setting(False, "Recompute activations to save memory.")
    group_by_length: bool = setting(True, "Batch examples of similar length together.")
    seed: int = setting(42, "Seed for the split, data order and dropout.")
    # The objective (rora.recovery.distill). auto resolves to kd when a teacher is given, else sft. Chosen on the
    # measurements (BENCHMARKS.md, "Recovery objectives"): on the same records, sft teaches the answer format and
    # damages the language model, kd brings the held-out whole-text loss back to the base model's.
    objective: str = setting("auto", "Recovery objective: auto (kd with a teacher, which rora run always has, else "
                                     "sft), sft (response cross-entropy), kd (forward KL to the teacher on every token, "
                                     "times T^2) or kd+sft (kd_weight * kd + (1 - kd_weight) * sft).", OBJECTIVES)
    kd_temperature: float = setting(1.0, "Distillation temperature T: both distributions are softened by T, the KL is "
                                         "scaled by T^2 (Hinton et al.); at most 100, where both are already "
                                         "uniform to float precision.", maximum=100.0)
    kd_weight: float = setting(0.5, "kd+sft only: the KD term's share of the loss, in (0, 1).")
    unlikelihood: float = setting(0.0, "kd objectives: weight of token-level unlikelihood (Welleck et al., 2020), "
                                       "added to the KL at every position: -log(1 - p) of each token already in the "
                                       "context that is not the next one, against copying loops. 0: off.",
                                  maximum=100.0)
    precision: str = setting("auto", "Matmul precision of training (student and teacher): auto (bfloat16 autocast on "
                                     "GPU, float32 on CPU), float32, or bfloat16 (autocast; on a CPU with AVX512-BF16 "
                                     "or AMX a training step takes ~1.5x less time, see BENCHMARKS.md). The adapter's "
                                     "weights and optimizer state stay float32.", PRECISIONS)
    teacher_dtype: str = setting("auto", "Teacher dtype: auto (bfloat16 on GPU, float32 on CPU), float32, bfloat16 or "
                                         "float16.", TEACHER_DTYPES)
    kd_chunk_size: int = setting(256, "Positions whose [chunk x vocab] logits are live at once in the KL.", maximum=BIG)
    text: str | None = setting(None, "Plain-text training data (instead of records, or mixed with them by "
                                     "text_ratio): a .txt or .jsonl file, a datasets save_to_disk directory, "
                                     "parquet/arrow/jsonl shards (a glob), a local dataset directory or a hub dataset "
                                     "id (streamed); documents packed to cutoff_len with EOS between them.", input=True)
    text_split: str | None = setting(None, "The split of a text dataset (save_to_disk DatasetDict, dataset directory "
                                           "or hub id); unset: train.")
    text_field: str | None = setting(None, "The column (or .jsonl key) holding the text; unset: text.")
    text_config: str | None = setting(None, "The configuration of a text dataset (hub id or dataset directory), e.g. "
                                            "wikitext-103-raw-v1.")
    max_text_tokens: int | None = setting(None, "Read at most this many tokens of text (EOS included; the validation "
                                                "sequences come out of them): a streamed dataset stops there. Required "
                                                "for a hub id.", maximum=MAX_TEXT_TOKENS)
    synthetic: int = setting(0, "Data-free: the teacher writes N training texts (continuing the data prompts, or "
                                "short seed prompts); cached for reruns. 0: off.", maximum=BIG)
    synthetic_tokens: int = setting(128, "New tokens the teacher samples per synthetic text.", maximum=2**14)
    synthetic_temperature: float = setting(1.0, "Sampling temperature of the teacher's synthetic texts.", maximum=100.0)
    synthetic_prompts: str = setting("records", "What the teacher continues: records (the training records' prompts, "
                                                "when records are given: text in the tasks' domain) or general "
                                                "(general openings: general text).", SYNTHETIC_PROMPTS)
    on_policy: int = setting(0, "On-policy distillation (kd objectives): at every step the student writes this many "
                                "greedy continuations of training prompts, and the step trains on them (KL to the "
                                "teacher on every written token) as one more micro-batch. 0: off.", maximum=BIG)
    on_policy_tokens: int = setting(48, "New tokens per on-policy continuation (less than cutoff_len).", maximum=2**14)
    on_policy_no_repeat: int = setting(0, "On-policy: the teacher's target at each written token leaves out the "
                                          "tokens that would repeat an n-gram of the continuation, n = this (as "
                                          "no_repeat_ngram_size would when it writes). 0: the teacher as it is.",
                                       maximum=64)
    text_ratio: float | None = setting(None, "With records (data) and text (text or synthetic) both given: the share "
                                             "of training tokens taken from the text, in (0, 1); unset: the text "
                                             "replaces the records.")

    @property
    def needs_teacher(self) -> bool:
        return self.objective in ("kd", "kd+sft") or self.synthetic > 0 or self.on_policy > 0

    def with_objective(self, has_teacher: bool) -> "RecoverConfig":
        """The config with `auto` resolved: kd when there is a teacher, else sft."""
        if self.objective != "auto":
            return self
        return dataclasses.replace(self, objective="kd" if has_teacher else "sft")

    def problems(self) -> list[str]:
        out = []
        for key in ("kd_temperature", "synthetic_temperature"):
            value = getattr(self, key)
            if not (math.isfinite(value) and value > 0):  # nan > 0 is False too, but say "finite" for inf
                out.append(f"recover.{key} must be a finite number > 0, got {value}")
        if self.unlikelihood and (self.objective == "sft" or self.kd_temperature != 1.0):
            out.append("recover.unlikelihood rides on the distillation loss: it needs objective kd or kd+sft and "
                       f"kd_temperature 1 (got {self.objective}, {self.kd_temperature})")
        if not (math.isfinite(self.kd_weight) and 0 < self.kd_weight < 1):
            out.append(f"recover.kd_weight must be in (0, 1), got {self.kd_weight}")
        if isinstance(self.lr, str) and self.lr != AUTO:
            out.append(f"recover.lr must be a number > 0 or {AUTO!r}, got {self.lr!r}")
        out += self.out_of_bounds(
            positive=("kd_chunk_size", "synthetic_tokens", "on_policy_tokens", "rank", "alpha", "epochs", "cutoff_len", "save_steps",
                      "max_steps", "max_train_examples", "lr_probe_steps", "max_text_tokens",
                      *(("lr",) if not isinstance(self.lr, str) else ())),
            non_negative=("synthetic", "on_policy", "on_policy_no_repeat", "val_set_size", "warmup_steps",
                          "weight_decay", "unlikelihood", "eval_steps"))
        if self.lr == AUTO and (self.val_set_size == 0 or self.eval_steps == 0):
            out.append("recover.lr auto compares its probes on the validation split: set val_set_size > 0 and "
                       "eval_steps > 0")
        if self.text is not None and self.synthetic:
            out.append("recover.text and recover.synthetic are two sources of training text: give one")
        if self.text_ratio is not None and not 0 < self.text_ratio < 1:
            out.append(f"recover.text_ratio must be in (0, 1), got {self.text_ratio}")
        if self.batch_size <= 0 or self.micro_batch_size <= 0 or self.batch_size % self.micro_batch_size:
            out.append(
                f"recover.batch_size ({self.batch_size}) must be a positive multiple of "
                f"recover.micro_batch_size ({self.micro_batch_size})"
            )
        if self.on_policy and self.objective == "sft":
            out.append("recover.on_policy distils the teacher on the student's own writing: it needs objective kd or "
                       "kd+sft (and a teacher)")
        if self.on_policy and self.on_policy_tokens >= self.cutoff_len:
            out.append(f"recover.on_policy_tokens ({self.on_policy_tokens}) must be less than recover.cutoff_len "
                       f"({self.cutoff_len}): a continuation and its prompt fit in cutoff_len")
        if not 0.0 <= self.dropout < 1.0:
            out.append(f"recover.dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            out.append("recover.target_modules must name at least one module")
        return out

    @property
    def resolved_alpha(self) -> float:
        return float(self.alpha) if self.alpha is not None else 2.0 * self.rank

    def describe_objective(self, objective: str | None = None) -> str:
        """'kd+sft (T=1, kd weight 0.6, unlikelihood 1)': the objective (`objective`, when `auto` was resolved
        elsewhere) and the settings that shape it, for reports."""
        objective = objective or self.objective
        if objective in ("sft", AUTO):
            return objective
        return (f"{objective} (T={self.kd_temperature:g}"
                + (f", kd weight {self.kd_weight:g}" if objective == "kd+sft" else "")
                + (f", unlikelihood {self.unlikelihood:g}" if self.unlikelihood else "") + ")")


@dataclass
class EvalConfig(StageConfig):
    """Commonsense-suite evaluation."""

    SECTION = "eval"
    EXCLUSIVE = (("limit", "sample"),)
    tasks: list[str] = setting(list(TASKS), "Tasks to evaluate: 'all' or a comma list.", TASKS)
    protocol: str = setting("score", "generate (LLM-Adapters beam search + match), score (constrained log-likelihood) "
                                     "or lm-eval (lm-eval-harness zero-shot).", PROTOCOLS)
    limit: int | None = setting(None, "Evaluate the first N examples of each task (file order); unset: all.")
    sample: int | None = setting(None, "Evaluate a seeded random N examples of each task (instead of limit).")
    seed: int = setting(0, "Seed of sample: the same N and seed give the same examples.")
    engine: str = setting("rora", "lm-eval protocol: rora (native log-likelihood engine; lm-eval's numbers, faster) or "
                                  "lm-eval (lm-eval-harness's own HF backend).", ENGINES)
    precision: str = setting("auto", "Matmul precision of the log-likelihood scoring (score protocol, rora engine): "
                                     "auto (bfloat16 autocast on GPU; on CPU the model's own dtype, lm-eval's numbers "
                                     "to ~1e-5), float32, or bfloat16 (autocast: faster on a CPU with AVX512-BF16 or "
                                     "AMX, slower on one without; a near-tie can flip, see BENCHMARKS.md). Prose and "
                                     "writing figures keep the model's dtype.", PRECISIONS)
    batch_size: int = setting(16, "Prompts (generate), examples (score) or rows (engine lm-eval) per forward pass; the "
                                  "rora engine batches by a token budget.", maximum=BIG)
    num_beams: int = setting(4, "Beams of the generate protocol's beam search.", maximum=64)
    max_new_tokens: int = setting(32, "New tokens the generate protocol decodes per answer.", maximum=2**14)
    prose: str = setting("auto", "Held-out general prose for loss, perplexity and KL to the unpruned model: auto "
                                 "(WikiText-2's test split when the hub answers, offline the BoolQ validation passages "
                                 "in the data directory; skipped when neither is there), a .txt/.jsonl file, or none.",
                         input=True)
    prose_documents: int = setting(64, "Prose documents measured (a seeded sample), each cut to 256 tokens.",
                                   maximum=2**16)
    # Accuracy alone cannot see a model that no longer writes (a recovery can raise it while the model's own text
    # degenerates into "yes, yes, yes"); these figures can (rora.evaluation.quality).
    generation: bool = setting(True, "Also score the model's own writing: greedy continuations of held-out prompts, by "
                                     "repetition, distinct-2 and perplexity under a reference model.")
    generation_prompts: int = setting(48, "Generation figures: up to N of the shipped text openings, plus N task "
                                          "prompts when held-out training records are given (rora run).",
                                      maximum=2**12)
    generation_tokens: int = setting(48, "Generation figures: new tokens per greedy continuation.", maximum=2**12)

    def problems(self) -> list[str]:
        out = self.out_of_bounds(positive=("limit", "sample", "batch_size", "num_beams", "max_new_tokens",
                                           "prose_documents", "generation_prompts", "generation_tokens"))
        if self.sample is not None and self.limit is not None:
            out.append("eval.limit and eval.sample are exclusive (the first N, or a random N)")
        if not self.tasks:
            out.append("eval.tasks names no task; give 'all' or a comma list")
        if self.precision != "auto" and self.protocol == "lm-eval" and self.engine != "rora":
            out.append("eval.precision applies to the rora engine; lm-eval's own backend scores in the model's dtype "
                       "(give eval.engine=rora or eval.precision=auto)")
        twice = sorted({t for t in self.tasks if self.tasks.count(t) > 1})
        if twice:
            out.append(f"eval.tasks names {', '.join(twice)} more than once")
        return out


@dataclass
class GenerateConfig(StageConfig):
    """Free text generation (rora generate, rora.generate_text): greedy unless temperature > 0."""

    SECTION = "generate"
    max_new_tokens: int = setting(128, "New tokens to write per prompt at most (the end-of-text token stops sooner).")
    temperature: float = setting(0.0, "0: greedy (the most likely token every step); > 0: sample at this temperature.")
    top_p: float = setting(1.0, "Sampling: draw from the smallest set of tokens whose probability reaches top_p, in "
                                "(0, 1]; 1 keeps every token.")
    seed: int = setting(0, "Sampling: the seed; the same prompts, seed and batch size give the same text.")
    chat: bool | None = setting(None, "Wrap each prompt in the model's chat template as a user turn (default: when "
                                      "the tokenizer has one).")
    batch_size: int = setting(8, "Prompts written at once when not streaming.")

    def problems(self) -> list[str]:
        out = self.out_of_bounds(positive=("max_new_tokens", "batch_size"), non_negative=("temperature",))
        if not 0 < self.top_p <= 1:
            out.append(f"generate.top_p must be in (0, 1], got {self.top_p}")
        return out


@dataclass
class MergeConfig(StageConfig):
    """Merging adapters into dense weights (computed in compute_dtype, then cast; see recovery/merge.py)."""

    SECTION = "merge"
    dtype: str = setting("float32", f"Dtype of the merged weights: {_listing(MERGE_DTYPES)}.", MERGE_DTYPES)
    compute_dtype: str = setting("float64", f"Dtype of the merge and its verification, before the cast to dtype: "
                                            f"{_listing(COMPUTE_DTYPES)}.", COMPUTE_DTYPES)
    tolerance: float = setting(1e-4, "Max |logit difference| merged vs adapter model, in compute_dtype.")

    def problems(self) -> list[str]:
        return self.out_of_bounds(non_negative=("tolerance",))


@dataclass
class ExportConfig(StageConfig):
    """Deployment export."""

    SECTION = "export"
    format: str = setting("hf", "hf (safetensors directory) or gguf (one .gguf file).", EXPORT_FORMATS)
    layout: str = setting("compact", "Non-uniform models. compact: hf for rora.load_model only; gguf as llama.cpp's "
                          "deci architecture (per-layer head counts), which llama.cpp runs and transformers' GGUF loader "
                          "cannot. padded: zero-padded to one shape, same outputs; hf loads in plain transformers, gguf "
                          "(llama) in llama.cpp, transformers and any runtime that needs uniform layers.", LAYOUTS)
    # The dtype's table depends on the format: checked in problems().
    dtype: str = setting("float32", f"hf: {', '.join(EXPORT_FORMATS['hf'])}. gguf: f32, f16, q8_0; with "
                         "llama-cpp-python installed (pip install 'rora[edge]') also q6_k, q5_k_m, q4_k_m, quantized by "
                         "llama.cpp itself. Quantized GGUFs are reported with their held-out perplexity change.")
    tolerance: float = setting(1e-4, "Max |logit difference| exported (loaded back) vs source, enforced for fp32 "
                                     "exports.")
    # llama.cpp's own tables put q8_0 at ~0.1% and q4_k_m at ~1-3% on 7B models; 5% is past what a type costs a
    # healthy model.
    max_ppl_increase: float = setting(0.05, "Quantized gguf: warn when the held-out perplexity rises more than this "
                                            "fraction vs the f32 export.")

    def problems(self) -> list[str]:
        out = []
        if self.format in EXPORT_FORMATS:
            out += EXPORT_FORMATS[self.format].problem(f"export.dtype for {self.format}", self.dtype)
        out += self.out_of_bounds(non_negative=("tolerance", "max_ppl_increase"))
        return out


@dataclass
class PipelineConfig(StageConfig):
    """prune -> evaluate -> recover -> merge -> evaluate -> export, as one resumable run (rora run)."""

    SECTION = "pipeline"
    model: str = setting("smollm2-135m", "Model spec to start from (any MODEL spec).", input=True)
    out: str = setting("runs/quickstart", "Output directory; one subdirectory per stage.")
    data: str | None = setting(None, "Recovery training data (file, directory of <task>/train.json, or hub id); unset: "
                                     "the offline train sets in $RORA_DATA_DIR.", input=True)
    data_dir: str | None = setting(None, "Evaluation data directory; unset: $RORA_DATA_DIR, else the hub.", input=True)
    allow_pickle: bool = setting(False, "Allow a pickled (LLM-Pruner) checkpoint as the model.")
    device: str = setting(AUTO, DEVICE_HELP + " The recovery trains where accelerate puts it (the GPU when there is "
                                        "one); its model comes back here for the stages after it.")
    skip: list[str] = setting([], f"Stages not to run (comma-separated on the command line): "
                                  f"{', '.join(PIPELINE_STAGES)}.", PIPELINE_STAGES)
    prune: PruneConfig = setting(PruneConfig, "The prune stage's settings.")
    reconstruct: ReconstructConfig = setting(ReconstructConfig, "The reconstruct stage's settings.")
    # rora run tunes the learning rate itself unless told one (a preset names the one measured for its recipe).
    recover: RecoverConfig = setting(functools.partial(RecoverConfig, lr=AUTO), "The recover stage's settings.")
    eval: EvalConfig = setting(EvalConfig, "The three evaluations' settings.")
    merge: MergeConfig = setting(MergeConfig, "The merge stage's settings.")
    export: ExportConfig = setting(ExportConfig, "The export stage's settings.")

    def problems(self) -> list[str]:
        return device_problem("device", self.device)

    def runs(self, stage: str) -> bool:
        return stage not in self.skip

    def with_settings(self, settings: dict[str, Any]) -> "PipelineConfig":
        """A copy with `section.key` (or top-level `key`) values applied as YAML would give them: unknown sections
        and keys are ConfigErrors with a did-you-mean, values are type-checked and validated."""
        data = self.to_dict()
        sections = [f.name for f in dataclasses.fields(self) if isinstance(data[f.name], dict)]
        for path, value in settings.items():
            section, _, key = path.rpartition(".")
            if section and section not in sections:
                raise ConfigError(f"unknown section {section!r} in {path!r}{did_you_mean(section, sections)}; "
                                  f"sections: {', '.join(sections)}")
            (data[section] if section else data)[key] = value
            owner = _dataclass_in(typing.get_type_hints(PipelineConfig)[section]) if section else PipelineConfig
            for other in owner.cleared_by([key]):  # the exclusive partner of a key set alone (a flag wins)
                if f"{section}.{other}".lstrip(".") not in settings:
                    (data[section] if section else data)[other] = None
        return PipelineConfig.from_dict(data)


def parse_setting(text: str) -> tuple[str, Any]:
    """'section.key=VALUE' (rora run --set) -> ('section.key', VALUE read as YAML: 8 is an int, [a, b] a list)."""
    path, sep, value = text.partition("=")
    if not sep or not path.strip():
        raise ConfigError(f"--set takes SECTION.KEY=VALUE, got {text!r}")
    return path.strip(), load_yaml(value, f"the value of --set {text}")


PRESETS_DIR = Path(__file__).parent / "pipelines" / "presets"


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def load_preset(name: str) -> PipelineConfig:
    """A shipped pipeline preset by name (rora/pipelines/presets/NAME.yaml); a name, never a path."""
    if name not in preset_names():
        raise ConfigError(f"unknown preset {name!r}{did_you_mean(name, preset_names())}; presets: {', '.join(preset_names())}")
    return PipelineConfig.from_yaml(PRESETS_DIR / f"{name}.yaml")
