"""Typed exceptions. Library code raises these with a message a user can act on; only the CLI turns them
into exit codes (2 for every RoraError)."""


class RoraError(Exception):
    """Base class: the message says what was wrong and what to do."""


class ConfigError(RoraError, ValueError):
    """A configuration value, flag or config file is invalid."""


class ModelLoadError(RoraError):
    """A model spec cannot be resolved or loaded."""


class UnsupportedModelError(ModelLoadError):
    """The model's architecture is not one this project knows how to prune or rebuild."""


class ModelShapeError(UnsupportedModelError):
    """A model's modules contradict each other (a pruner left, e.g., k_proj and v_proj of different widths), so no
    config can describe it."""


class DataError(RoraError):
    """Training or evaluation data is missing or malformed."""


class OutputError(RoraError):
    """An output location cannot be written (its parent is a file, it is read-only, it is an input)."""


class OutputExistsError(OutputError):
    """An output path exists and neither --overwrite nor --resume was given."""


class PruningError(RoraError):
    """A pruning request cannot be satisfied by the model (e.g. it would remove every head of a layer)."""


class TrainingError(RoraError):
    """Recovery training failed (non-finite loss, resume mismatch, ...)."""


class MergeError(RoraError):
    """Adapter and model do not fit, or the merged model does not reproduce the adapter model."""


class ManifestError(RoraError):
    """A path is not a rora stage output, or its manifest (rora.json) is corrupt or of a newer schema."""


class ExportError(RoraError):
    """An export format or layout cannot represent the model."""


def detail(exc: BaseException) -> str:
    """What a third-party exception says, in one line: its first non-empty line, else its type's name. (Library
    messages put it after rora's own words, which name the file, so a multi-line report never cuts them.)"""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__
