"""Training: pre-training and SFT on data from `telechat data prepare`."""
from .trainer import TrainConfig, latest_checkpoint, train

__all__ = ["TrainConfig", "latest_checkpoint", "train"]
