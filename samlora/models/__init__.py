"""Layer 3: SAM / MobileSAM builders, checkpoints, encoder blocks, LoRA, adapter files."""
