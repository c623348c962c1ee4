"""Layer 1: samples, image and label files, dataset layouts, COCO, folds, prompts, volume files."""
