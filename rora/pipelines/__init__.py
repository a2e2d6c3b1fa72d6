"""Pipelines: run() composes the stages; export formats."""
