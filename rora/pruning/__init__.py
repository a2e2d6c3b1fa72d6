"""Pruning stage: importance scores and prune() (the Llama-family layout is rora.architecture)."""
