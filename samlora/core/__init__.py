"""Layer 0: the one error type, run files (atomic writes, output directories, logs) and figures."""
