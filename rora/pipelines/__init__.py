"""The composition layer: run_pipeline() (run.py, one table row per stage), its summary (summary.py) and the
shipped pipeline presets (presets/*.yaml, what `rora run --preset` reads)."""
