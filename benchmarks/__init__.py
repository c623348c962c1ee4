"""Speed and memory rows, measured in one run and printed as ratios (``python -m benchmarks.bench``)."""
