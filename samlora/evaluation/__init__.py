"""Layer 6: which images an evaluation scores, and its reports."""
