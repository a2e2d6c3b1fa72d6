"""Pruning stage: importance scores, the Llama-family structure, and prune()."""
