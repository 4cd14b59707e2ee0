"""Depth-structure analysis: representation residuals, block coupling, tables and plots from run outputs."""

from gradsmooth.analysis.coupling import coupling_matrix, token_jacobians
from gradsmooth.analysis.hooks import BlockCalls, capture_blocks
from gradsmooth.analysis.residuals import (
    alignment_scores,
    norm_variation,
    residual_cosine_matrix,
    residual_measures,
    residuals,
    straightness,
)

__all__ = [
    "BlockCalls",
    "alignment_scores",
    "capture_blocks",
    "coupling_matrix",
    "norm_variation",
    "residual_cosine_matrix",
    "residual_measures",
    "residuals",
    "straightness",
    "token_jacobians",
]
