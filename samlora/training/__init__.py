"""Layer 5: the training configuration, items, losses, prompting rounds, trainer, cross-validation, runs, studies."""
