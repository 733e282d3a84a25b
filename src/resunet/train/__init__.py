"""Training: configuration, the loop and its parts (steps, stages, checkpoints, logging, DDP)."""
