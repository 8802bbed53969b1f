"""The training loop, its configs, learning-rate schedule, metrics and checkpoints."""
