"""The shared Accelerate training loop, run directories and metric logging."""

from gradsmooth.training.loop import TrainerConfig, train

__all__ = ["TrainerConfig", "train"]
