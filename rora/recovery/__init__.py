"""Recovery stage: adapter methods (lora/rora/dora), data and prompts, the trainer, merge."""
