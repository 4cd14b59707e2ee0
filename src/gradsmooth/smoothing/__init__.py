"""Smoothing core: stacks, depth operators and the optimizer wrapper. Imports torch only."""

from gradsmooth.smoothing.config import SmoothingConfig
from gradsmooth.smoothing.operators import is_identity, mix, mixing_matrix
from gradsmooth.smoothing.stacks import Stack, find_stacks, format_stack_table
from gradsmooth.smoothing.wrapper import SmoothedOptimizer, smooth

__all__ = [
    "SmoothedOptimizer",
    "SmoothingConfig",
    "Stack",
    "find_stacks",
    "format_stack_table",
    "is_identity",
    "mix",
    "mixing_matrix",
    "smooth",
]
