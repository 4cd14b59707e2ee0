"""Representation-residual measures along depth, on hidden states captured after every block.

The input is ``states`` of shape ``(L + 1, N, d)``: the input of the first block, then the output
of each of the L blocks, for N tokens (batch and sequence positions flattened). The residuals are
``r_l = x_{l+1} - x_l``, shape ``(L, N, d)``. Following Residual Alignment (Li and Papyan,
NeurIPS 2023), a network whose tokens move along a line in equal steps has residuals that all
point the same way (alignment 1), have equal norms (norm variation 0) and form a straight
trajectory (straightness 1).
"""

from __future__ import annotations

import torch


def residuals(states: torch.Tensor) -> torch.Tensor:
    """Return ``states[l + 1] - states[l]`` for every block l."""
    return states[1:] - states[:-1]


def residual_cosine_matrix(residual: torch.Tensor) -> torch.Tensor:
    """Return the L x L matrix of cosine similarities between blocks' residuals, averaged over tokens.

    Entry ``[l, m]`` is the mean over tokens of ``cos(r_l, r_m)``; a token whose residual is zero
    at a block counts as 0 in that block's row and column.
    """
    unit = residual.float() / residual.float().norm(dim=-1, keepdim=True).clamp_min(1e-30)
    return torch.einsum("lnd,mnd->lm", unit, unit) / residual.shape[1]


def alignment_scores(cosine: torch.Tensor) -> dict[str, float]:
    """Return the mean off-diagonal entry (all pairs) and the mean entry next to the diagonal (consecutive blocks)."""
    depth = cosine.shape[0]
    if depth < 2:
        return {"residual_alignment": 1.0, "adjacent_alignment": 1.0}
    off_diagonal = cosine[~torch.eye(depth, dtype=torch.bool)]
    return {
        "residual_alignment": float(off_diagonal.mean()),
        "adjacent_alignment": float(torch.diagonal(cosine, offset=1).mean()),
    }


def norm_variation(residual: torch.Tensor) -> float:
    """Return the coefficient of variation of residual norms across depth, averaged over tokens.

    0 means every block moves a token by the same distance; tokens whose residuals are all zero
    count as 0.
    """
    norms = residual.float().norm(dim=-1)
    mean = norms.mean(dim=0)
    spread = norms.std(dim=0, unbiased=False)
    return float((spread / mean.clamp_min(1e-30)).mean())


def straightness(states: torch.Tensor) -> float:
    """Return the mean over tokens of ``||x_L - x_0|| / sum_l ||r_l||`` (1 for a straight path, less for a bent one)."""
    path = residuals(states).float().norm(dim=-1).sum(dim=0)
    chord = (states[-1] - states[0]).float().norm(dim=-1)
    moved = path > 0
    if not moved.any():
        return 1.0
    return float((chord[moved] / path[moved]).mean())


def residual_measures(states: torch.Tensor) -> tuple[dict[str, float], torch.Tensor]:
    """Return the scalar measures of ``states`` and the residual cosine matrix."""
    residual = residuals(states)
    cosine = residual_cosine_matrix(residual)
    scores = alignment_scores(cosine)
    scores["norm_variation"] = norm_variation(residual)
    scores["straightness"] = straightness(states)
    return scores, cosine
