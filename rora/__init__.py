"""rora: recover the accuracy of structured-pruned LLaMA-family models with RoRA adapters.

The public API (imports are lazy, so `import rora` and `rora --help` stay fast):
    load_model(spec) -> (model, tokenizer)
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_API = {
    "load_model": "rora.models",
    "describe": "rora.models",
}

__all__ = sorted(_API)


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'rora' has no attribute {name!r}")
