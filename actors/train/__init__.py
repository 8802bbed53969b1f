"""The training loop (loop.py), its configs (config.py, scaling.py, experiment.py), the builders
that turn an experiment into a Trainer (builders.py), the learning-rate schedule, metrics and
checkpoints (checkpoints.py, sharded_state.py)."""
