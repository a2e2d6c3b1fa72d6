"""The reconstruction stage: a pruned model's remaining weights refitted in closed form against the unpruned one."""
