"""What runs inside a training worker: the loop, its strategies, checkpoints and metrics.

    from actors import Trainer, train, TrainConfig, CheckpointConfig, SingleProcess
"""
from actors.checkpoint import (CheckpointError, average_checkpoints, latest_checkpoint,
                               list_checkpoints, load_checkpoint, save_checkpoint)
from actors.metrics import MetricsLogger, read_metrics
from actors.schedule import build_scheduler, warmup_cosine
from actors.strategy import SingleProcess, Strategy
from actors.train_config import CheckpointConfig, TrainConfig
from actors.trainer import Trainer, TrainResult, seed_everything, train

__all__ = ["CheckpointConfig", "CheckpointError", "MetricsLogger", "SingleProcess", "Strategy",
           "TrainConfig", "TrainResult", "Trainer", "average_checkpoints", "build_scheduler",
           "latest_checkpoint", "list_checkpoints", "load_checkpoint", "read_metrics",
           "save_checkpoint", "seed_everything", "train", "warmup_cosine"]
