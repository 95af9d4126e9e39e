"""Bare C forwarder used as the same-run baseline (see run_baseline.py)."""
