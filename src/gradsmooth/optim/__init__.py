"""Base optimizers (SGD, Adam, AdamW, Muon with AdamW) and learning-rate schedules."""

from gradsmooth.optim.combined import CombinedOptimizer
from gradsmooth.optim.factory import OptimConfig, build_optimizer, build_scheduler, muon_matrices

__all__ = ["CombinedOptimizer", "OptimConfig", "build_optimizer", "build_scheduler", "muon_matrices"]
