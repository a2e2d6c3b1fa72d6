"""Evaluation stage: the commonsense task table, generate/score protocols, the lm-eval bridge."""
