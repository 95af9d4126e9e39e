"""Native load generator and sink for the loopback benchmark (see run_loadgen.py)."""
