"""Training: config, learning-rate schedules, AdamW, atomic checkpoints and the resumable loop."""

from tokenmill.train.config import TrainConfig
from tokenmill.train.loop import train

__all__ = ["TrainConfig", "train"]
