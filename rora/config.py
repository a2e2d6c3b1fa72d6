"""One dataclass per stage, with validation in __post_init__ and a YAML round trip.

Precedence is defaults < YAML < flags: the CLI loads YAML with `from_dict`, then applies flags with `replace`.
Every problem of a config is collected before raising, so a user fixes them in one go.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError

ALL_TASKS = ("boolq", "piqa", "social_i_qa", "hellaswag", "winogrande", "ARC-Easy", "ARC-Challenge", "openbookqa")


def did_you_mean(name: str, known: typing.Iterable[str]) -> str:
    """' (did you mean X?)' for the closest known name, or ''."""
    close = difflib.get_close_matches(str(name), list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


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


class StageConfig:
    """Mixin for the stage dataclasses: type checks, problem collection, dict and YAML round trip."""

    def problems(self) -> list[str]:
        """Stage-specific checks; subclasses extend. Each entry names the key."""
        return []

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
            found = self.problems()
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
        kwargs = {}
        for k, v in data.items():
            hint = hints[k]
            sub = _dataclass_in(hint)
            kwargs[k] = sub.from_dict(v) if sub is not None and isinstance(v, dict) else _numeric_string(v, hint)
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
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise ConfigError(f"{path} is not a UTF-8 text file; is it a YAML config?") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML: {exc}".splitlines()[0]) from None
        if data is not None and not isinstance(data, dict):
            raise ConfigError(f"{path} must hold a mapping of keys to values, not {type(data).__name__}")
        return cls.from_dict(data)

    def replace(self, **changes):
        """A copy with the non-None `changes` applied (how CLI flags override YAML)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


def _numeric_string(value: Any, hint: Any) -> Any:
    """YAML 1.1 reads `2e-4` (no dot) as a string; a float field takes any string that is a plain number."""
    if isinstance(value, str) and _check_type(1.5, hint) and not _check_type(value, hint):
        try:
            return float(value)
        except ValueError:
            return value
    return value


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
    ratio: float = 0.2  # fraction of prunable units to remove in each pruned layer
    importance: str = "taylor"  # l1 | l2 | random | taylor
    taylor: str = "vectorwise"  # vectorwise | element1 | element2 (LLM-Pruner's Taylor variants)
    layers: str = "uniform"  # "uniform" (every layer alike) or "START:END" (LLM-Pruner's 4:30 style)
    attention: bool = True  # prune attention heads
    mlp: bool = True  # prune MLP intermediate channels
    gqa: str = "within-group"  # within-group: query heads evenly per KV group | whole-group: whole KV groups
    calibration: str = "builtin"  # builtin text, or a path to training data (recovery format)
    num_samples: int = 10  # calibration samples for importance
    seq_len: int = 128  # calibration sequence length in tokens
    holdout_samples: int = 8  # held-out samples (disjoint from calibration) for loss before/after
    # Keep a multiple of this many MLP channels per layer (the nearest to what `ratio` keeps). 32 fits llama.cpp's
    # quantization blocks: a width that is not a multiple of 32 leaves every ffn_down in f16 in a q8_0 GGUF.
    channel_multiple: int = 1
    seed: int = 42

    def problems(self) -> list[str]:
        out = []
        if self.channel_multiple <= 0:
            out.append(f"prune.channel_multiple must be > 0, got {self.channel_multiple}")
        if not 0.0 <= self.ratio < 1.0:
            out.append(f"prune.ratio must be in [0, 1), got {self.ratio}")
        for key, value, allowed in (
            ("importance", self.importance, ("l1", "l2", "random", "taylor")),
            ("taylor", self.taylor, ("vectorwise", "element1", "element2")),
            ("gqa", self.gqa, ("within-group", "whole-group")),
        ):
            if value not in allowed:
                out.append(f"prune.{key} must be one of {', '.join(allowed)}, got {value!r}{did_you_mean(value, allowed)}")
        if self.layers != "uniform":
            start, sep, end = self.layers.partition(":")
            if not (sep and start.strip().isdigit() and end.strip().isdigit() and int(start) < int(end)):
                out.append(f"prune.layers must be 'uniform' or 'START:END' with START < END, got {self.layers!r}")
        for key in ("num_samples", "seq_len"):
            if getattr(self, key) <= 0:
                out.append(f"prune.{key} must be > 0, got {getattr(self, key)}")
        if self.holdout_samples < 0:
            out.append(f"prune.holdout_samples must be >= 0, got {self.holdout_samples}")
        return out


@dataclass
class RecoverConfig(StageConfig):
    """Adapter training; defaults follow the DoRA commonsense recipe (../shared/PROTOCOL.md)."""

    SECTION = "recover"
    method: str = "rora"  # rora | lora | dora (registry in rora.recovery.methods)
    rank: int = 32
    alpha: float | None = None  # None: 2 * rank
    scaling_exponent: float | None = None  # scale = alpha / rank**b; None: the method's own b
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"])
    dropout: float = 0.05
    lr: float = 2e-4
    epochs: float = 3.0
    max_steps: int | None = None  # overrides epochs when set
    batch_size: int = 16  # examples per optimizer step
    micro_batch_size: int = 16  # examples per forward pass; batch_size / micro_batch_size accumulation steps
    cutoff_len: int = 256
    val_set_size: int = 120  # carved from the training data, never from a test set
    max_train_examples: int | None = None  # first N after the seeded shuffle; None: all
    eval_steps: int = 80
    save_steps: int = 80
    warmup_steps: int = 100
    scheduler: str = "linear"  # linear | cosine
    weight_decay: float = 0.0
    train_on_inputs: bool = False  # True: loss on the prompt too, as LLM-Adapters does
    gradient_checkpointing: bool = False
    group_by_length: bool = True
    seed: int = 42
    # The objective (rora.recovery.distill): sft = cross-entropy on the response tokens; kd = forward
    # KL(teacher || student) over every token of each text, times T^2; kd+sft = kd_weight*kd + (1-kd_weight)*sft.
    # auto (the default): kd when a teacher is given, else sft. Chosen on the measurements (BENCHMARKS.md,
    # "Recovery objectives"): on the same records, sft teaches the answer format and damages the language model,
    # kd brings the held-out whole-text loss back to the base model's; rora run always has the teacher.
    objective: str = "auto"  # auto | sft | kd | kd+sft
    kd_temperature: float = 1.0  # T: both distributions are softened by T, the KL is scaled by T^2 (Hinton et al.)
    kd_weight: float = 0.5  # kd+sft only: the KD term's share of the loss, in (0, 1)
    teacher_dtype: str = "auto"  # auto (bfloat16 on GPU, float32 on CPU) | float32 | bfloat16 | float16
    kd_chunk_size: int = 256  # positions whose [chunk x vocab] logits are live at once in the KL
    text: str | None = None  # plain-text training data instead of records: .txt, or .jsonl with a "text" field
    synthetic: int = 0  # data-free: the teacher writes this many training texts (0: off)
    synthetic_tokens: int = 128  # new tokens the teacher samples per text
    synthetic_temperature: float = 1.0  # sampling temperature of the teacher's texts

    OBJECTIVES = ("auto", "sft", "kd", "kd+sft")
    TEACHER_DTYPES = ("auto", "float32", "bfloat16", "float16")

    @property
    def needs_teacher(self) -> bool:
        return self.objective in ("kd", "kd+sft") or self.synthetic > 0

    def with_objective(self, has_teacher: bool) -> "RecoverConfig":
        """The config with `auto` resolved: kd when there is a teacher, else sft."""
        if self.objective != "auto":
            return self
        return dataclasses.replace(self, objective="kd" if has_teacher else "sft")

    def problems(self) -> list[str]:
        out = []
        if self.objective not in self.OBJECTIVES:
            out.append(f"recover.objective must be one of {', '.join(self.OBJECTIVES)}, got {self.objective!r}"
                       f"{did_you_mean(self.objective, self.OBJECTIVES)}")
        for key in ("kd_temperature", "synthetic_temperature"):
            value = getattr(self, key)
            if not (math.isfinite(value) and value > 0):  # nan > 0 is False too, but say "finite" for inf
                out.append(f"recover.{key} must be a finite number > 0, got {value}")
        if not (math.isfinite(self.kd_weight) and 0 < self.kd_weight < 1):
            out.append(f"recover.kd_weight must be in (0, 1), got {self.kd_weight}")
        if self.teacher_dtype not in self.TEACHER_DTYPES:
            out.append(f"recover.teacher_dtype must be one of {', '.join(self.TEACHER_DTYPES)}, got "
                       f"{self.teacher_dtype!r}{did_you_mean(self.teacher_dtype, self.TEACHER_DTYPES)}")
        for key in ("kd_chunk_size", "synthetic_tokens"):
            if getattr(self, key) <= 0:
                out.append(f"recover.{key} must be > 0, got {getattr(self, key)}")
        if self.synthetic < 0:
            out.append(f"recover.synthetic must be >= 0, got {self.synthetic}")
        if self.text is not None and self.synthetic:
            out.append("recover.text and recover.synthetic are two sources of training text: give one")
        if self.rank <= 0:
            out.append(f"recover.rank must be > 0, got {self.rank}")
        if self.alpha is not None and self.alpha <= 0:
            out.append(f"recover.alpha must be > 0, got {self.alpha}")
        if self.batch_size <= 0 or self.micro_batch_size <= 0 or self.batch_size % self.micro_batch_size:
            out.append(
                f"recover.batch_size ({self.batch_size}) must be a positive multiple of "
                f"recover.micro_batch_size ({self.micro_batch_size})"
            )
        if self.scheduler not in ("linear", "cosine"):
            out.append(f"recover.scheduler must be linear or cosine, got {self.scheduler!r}")
        for key in ("lr", "epochs", "cutoff_len", "save_steps", "eval_steps"):
            if getattr(self, key) <= 0:
                out.append(f"recover.{key} must be > 0, got {getattr(self, key)}")
        if self.max_steps is not None and self.max_steps <= 0:
            out.append(f"recover.max_steps must be > 0, got {self.max_steps}")
        if self.max_train_examples is not None and self.max_train_examples <= 0:
            out.append(f"recover.max_train_examples must be > 0, got {self.max_train_examples}")
        for key in ("val_set_size", "warmup_steps", "weight_decay"):
            if getattr(self, key) < 0:
                out.append(f"recover.{key} must be >= 0, got {getattr(self, key)}")
        if not 0.0 <= self.dropout < 1.0:
            out.append(f"recover.dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            out.append("recover.target_modules must name at least one module")
        return out

    @property
    def resolved_alpha(self) -> float:
        return float(self.alpha) if self.alpha is not None else 2.0 * self.rank


@dataclass
class EvalConfig(StageConfig):
    """Commonsense-suite evaluation."""

    SECTION = "eval"
    tasks: list[str] = field(default_factory=lambda: list(ALL_TASKS))
    protocol: str = "score"  # generate | score | lm-eval
    limit: int | None = None  # first N examples per task; None: all
    sample: int | None = None  # instead of limit: a seeded random N examples per task (same N, seed: same examples)
    seed: int = 0  # the seed of `sample`
    engine: str = "rora"  # lm-eval protocol's log-likelihoods: rora (the native engine) | lm-eval (lm-eval's HFLM)
    batch_size: int = 16
    num_beams: int = 4
    max_new_tokens: int = 32

    def problems(self) -> list[str]:
        out = []
        unknown = [t for t in self.tasks if t not in ALL_TASKS]
        if unknown:
            out.append(
                f"eval.tasks: unknown task(s) {', '.join(unknown)}{did_you_mean(unknown[0], ALL_TASKS)}; "
                f"known: {', '.join(ALL_TASKS)}"
            )
        if self.protocol not in ("generate", "score", "lm-eval"):
            out.append(f"eval.protocol must be generate, score or lm-eval, got {self.protocol!r}")
        if self.limit is not None and self.limit <= 0:
            out.append(f"eval.limit must be > 0, got {self.limit}")
        if self.sample is not None and self.sample <= 0:
            out.append(f"eval.sample must be > 0, got {self.sample}")
        if self.sample is not None and self.limit is not None:
            out.append("eval.limit and eval.sample are exclusive (the first N, or a random N)")
        if self.engine not in ("rora", "lm-eval"):
            out.append(f"eval.engine must be rora or lm-eval, got {self.engine!r}")
        for key in ("batch_size", "num_beams", "max_new_tokens"):
            if getattr(self, key) <= 0:
                out.append(f"eval.{key} must be > 0, got {getattr(self, key)}")
        return out


@dataclass
class MergeConfig(StageConfig):
    """Merging adapters into dense weights (computed in float64 by default, then cast; see recovery/merge.py)."""

    SECTION = "merge"
    dtype: str = "float32"  # float32 | float16 | bfloat16: the merged model's weights
    compute_dtype: str = "float64"  # float64 | float32: the merge and its verification
    tolerance: float = 1e-4  # max |logit difference| merged vs adapter model, in compute_dtype

    def problems(self) -> list[str]:
        out = []
        if self.dtype not in ("float32", "float16", "bfloat16"):
            out.append(f"merge.dtype must be float32, float16 or bfloat16, got {self.dtype!r}")
        if self.compute_dtype not in ("float64", "float32"):
            out.append(f"merge.compute_dtype must be float64 or float32, got {self.compute_dtype!r}")
        if self.tolerance < 0:
            out.append(f"merge.tolerance must be >= 0, got {self.tolerance}")
        return out


@dataclass
class ExportConfig(StageConfig):
    """Deployment export."""

    SECTION = "export"
    format: str = "hf"  # hf | gguf
    layout: str = "compact"  # compact | padded (non-uniform models only)
    dtype: str = "float32"  # hf: float32|float16|bfloat16; gguf: f32|f16|q8_0, with llama.cpp also q6_k|q5_k_m|q4_k_m
    tolerance: float = 1e-4  # max |logit difference| exported (loaded back) vs source, enforced for fp32 exports
    # Quantized gguf: warn when held-out perplexity rises more than this vs the f32 export. llama.cpp's own tables
    # put q8_0 at ~0.1% and q4_k_m at ~1-3% on 7B models; 5% is past what a type costs a healthy model.
    max_ppl_increase: float = 0.05

    DTYPES = {"hf": ("float32", "float16", "bfloat16"),
              "gguf": ("f32", "f16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "float32", "float16")}

    def problems(self) -> list[str]:
        out = []
        if self.format not in ("hf", "gguf"):
            out.append(f"export.format must be hf or gguf, got {self.format!r}{did_you_mean(self.format, ('hf', 'gguf'))}")
        elif self.dtype not in self.DTYPES[self.format]:
            allowed = self.DTYPES[self.format]
            out.append(f"export.dtype for {self.format} must be one of {', '.join(allowed[:6] if self.format == 'gguf' else allowed)}, got {self.dtype!r}"
                       f"{did_you_mean(self.dtype, allowed)}")
        if self.layout not in ("compact", "padded"):
            out.append(f"export.layout must be compact or padded, got {self.layout!r}{did_you_mean(self.layout, ('compact', 'padded'))}")
        if self.tolerance < 0:
            out.append(f"export.tolerance must be >= 0, got {self.tolerance}")
        if not self.max_ppl_increase >= 0:  # `not >=` also catches NaN
            out.append(f"export.max_ppl_increase must be >= 0, got {self.max_ppl_increase}")
        return out


PIPELINE_STAGES = ("eval_base", "prune", "eval_pruned", "recover", "merge", "eval_recovered", "export")


@dataclass
class PipelineConfig(StageConfig):
    """prune -> evaluate -> recover -> merge -> evaluate -> export, as one resumable run (rora run)."""

    SECTION = "pipeline"
    model: str = "smollm2-135m"  # any load_model spec
    out: str = "runs/quickstart"  # one directory per stage below it
    data: str | None = None  # recovery training data; None: RORA_DATA_DIR (the four offline train sets)
    data_dir: str | None = None  # evaluation data; None: RORA_DATA_DIR, else the hub
    allow_pickle: bool = False
    skip: list[str] = field(default_factory=list)  # stages not to run, e.g. [eval_base] or [prune]
    prune: PruneConfig = field(default_factory=PruneConfig)
    recover: RecoverConfig = field(default_factory=RecoverConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    merge: MergeConfig = field(default_factory=MergeConfig)
    export: ExportConfig = field(default_factory=ExportConfig)

    def problems(self) -> list[str]:
        return [
            f"pipeline.skip: unknown stage {s!r}{did_you_mean(s, PIPELINE_STAGES)}; stages: {', '.join(PIPELINE_STAGES)}"
            for s in self.skip
            if s not in PIPELINE_STAGES
        ]

    def runs(self, stage: str) -> bool:
        return stage not in self.skip


PRESETS_DIR = Path(__file__).parent / "presets"


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def load_preset(name: str) -> PipelineConfig:
    """A shipped pipeline preset by name (rora/presets/NAME.yaml)."""
    path = PRESETS_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown preset {name!r}{did_you_mean(name, preset_names())}; presets: {', '.join(preset_names())}")
    return PipelineConfig.from_yaml(path)
