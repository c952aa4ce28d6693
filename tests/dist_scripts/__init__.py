"""Multi-process helpers for tests/test_distributed.py and the measurement scripts (gloo, CPU)."""
