"""The training recipe: one run config (config.py) -> run directory (run_dir.py) -> the loop (loop.py), with
models.py (load/save), loss.py (fused head + cross-entropy), evaluate.py, metrics.py and checkpoint.py (one
atomic, world-size-aware format)."""
