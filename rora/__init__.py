"""rora: recover the accuracy of structured-pruned LLaMA-family models with RoRA adapters.

The public API (imports are lazy, so `import rora` and `rora --help` stay fast):
    load_model(spec) -> (model, tokenizer)
    adopt(model, tokenizer) -> model       (a model pruned in memory elsewhere: config synced to its weights, checked)
    prune(model, tokenizer, PruneConfig) -> PruneReport            (model pruned in place)
    recover(model, tokenizer, data, RecoverConfig, out) -> RecoverResult
    evaluate(model, tokenizer, EvalConfig) -> EvalResults
    generate_text(model, tokenizer, prompts, GenerateConfig) -> [Generation]   (what the model writes)
    generation_quality(model, tokenizer, reference) -> dict      (repetition, distinct-2, reference perplexity)
    merge(model, adapter, MergeConfig) -> (merged model, MergeReport)
    export(model, tokenizer, ExportConfig, out) -> Path
    run_pipeline(PipelineConfig) -> PipelineResult
    read_manifest(stage output) -> Manifest                      (what a stage wrote, read, and made it from)
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_API = {
    "load_model": "rora.models",
    "describe": "rora.models",
    "adopt": "rora.models",
    "prune": "rora.pruning.prune",
    "recover": "rora.recovery.trainer",
    "evaluate": "rora.evaluation.evaluate",
    "generate_text": "rora.evaluation.text",
    "generation_quality": "rora.evaluation.quality",
    "merge": "rora.recovery.merge",
    "export": "rora.deployment",
    "run_pipeline": "rora.pipelines.run",
    "read_manifest": "rora.artifacts",
    "PruneConfig": "rora.config",
    "RecoverConfig": "rora.config",
    "EvalConfig": "rora.config",
    "GenerateConfig": "rora.config",
    "MergeConfig": "rora.config",
    "ExportConfig": "rora.config",
    "PipelineConfig": "rora.config",
}

__all__ = sorted(_API)


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'rora' has no attribute {name!r}")
