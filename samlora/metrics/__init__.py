"""Layer 2: overlap tables, matching and segmentation scores."""
