"""Depth operators as pure functions over tensors.

A depth operator is a linear map along the depth of a stack: the smoothed update of block i is
``sum_j M[i, j] * update_j`` for an L x L mixing matrix M whose rows sum to 1. This module builds
M and applies it to sequences of tensors. It keeps no state and does not depend on optimizers.

Operators (with strength ``alpha`` in [0, 1]):

* ``window``: block i keeps weight ``1 - alpha`` and shares ``alpha`` among the ``k`` neighbours
  on each side of a window of ``2k + 1`` blocks (``alpha / 2`` per side). At the ends of a stack
  the weight of each missing neighbour returns to the block itself, so every row sums to 1.
* ``laplacian``: the sharpening counterpart, ``2 I - W`` for the window matrix ``W``. It pushes
  each update away from its neighbours' mean; rows still sum to 1.
* ``ema``: an exponential moving average along depth,
  ``out_i = (1 - alpha) * update_i + alpha * out_{i-1}`` with ``out_0 = update_0`` in the
  ``forward`` direction (first block to last), mirrored for ``backward``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

OPERATORS = ("window", "laplacian", "ema")
KERNELS = ("uniform", "exponential")
DIRECTIONS = ("forward", "backward")


def neighbour_weights(window: int, alpha: float, kernel: str = "uniform", decay: float = 0.5) -> list[float]:
    """Return the weight of the neighbour at distance 1, 2, ..., k on one side of a block.

    The weights on one side sum to ``alpha / 2``. ``uniform`` gives each neighbour the same
    weight; ``exponential`` makes the weight at distance d proportional to ``decay ** (d - 1)``.
    """
    k = (window - 1) // 2
    if k == 0:
        return []

    if kernel == "uniform":
        shape = [1.0] * k
    elif kernel == "exponential":
        shape = [decay ** (d - 1) for d in range(1, k + 1)]
    else:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")

    total = sum(shape)
    return [alpha / 2 * s / total for s in shape]


def window_matrix(
    depth: int, window: int, alpha: float, kernel: str = "uniform", decay: float = 0.5, dtype=torch.float64
) -> torch.Tensor:
    """Build the L x L mixing matrix of the window operator."""
    weights = neighbour_weights(window, alpha, kernel, decay)
    # Window 1 has no neighbour to give alpha to, so it is the identity whatever alpha is.
    self_weight = 1.0 - alpha if weights else 1.0
    matrix = torch.zeros(depth, depth, dtype=dtype)

    for i in range(depth):
        matrix[i, i] = self_weight
        for distance, weight in enumerate(weights, start=1):
            for j in (i - distance, i + distance):
                if 0 <= j < depth:
                    matrix[i, j] += weight
                else:
                    # A missing neighbour's weight returns to the block itself.
                    matrix[i, i] += weight

    return matrix


def ema_matrix(depth: int, alpha: float, direction: str = "forward", dtype=torch.float64) -> torch.Tensor:
    """Build the L x L mixing matrix of an exponential moving average along depth."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")

    matrix = torch.zeros(depth, depth, dtype=dtype)
    matrix[0, 0] = 1.0
    for i in range(1, depth):
        matrix[i] = alpha * matrix[i - 1]
        matrix[i, i] += 1.0 - alpha

    if direction == "backward":
        matrix = matrix.flip(0).flip(1)
    return matrix


def mixing_matrix(
    depth: int,
    operator: str = "window",
    window: int = 3,
    alpha: float = 0.2,
    kernel: str = "uniform",
    decay: float = 0.5,
    direction: str = "forward",
    dtype=torch.float64,
) -> torch.Tensor:
    """Build the depth-mixing matrix of ``operator`` for a stack of ``depth`` blocks."""
    if depth < 1:
        raise ValueError(f"depth must be at least 1, got {depth}")

    if operator == "window":
        return window_matrix(depth, window, alpha, kernel, decay, dtype)
    if operator == "laplacian":
        return 2 * torch.eye(depth, dtype=dtype) - window_matrix(depth, window, alpha, kernel, decay, dtype)
    if operator == "ema":
        return ema_matrix(depth, alpha, direction, dtype)
    raise ValueError(f"operator must be one of {OPERATORS}, got {operator!r}")


def is_identity(operator: str, window: int, alpha: float) -> bool:
    """Return whether the operator leaves every update unchanged (window 1 or zero strength)."""
    if alpha == 0:
        return True
    return operator in ("window", "laplacian") and window == 1


def band_terms(matrix: torch.Tensor) -> list[tuple[int, float, list[int]]]:
    """Group the non-zero entries of ``matrix`` as (offset, coefficient, rows).

    Entry ``matrix[i, i + offset]`` equals ``coefficient`` for every ``i`` in ``rows``. Window
    operators have one coefficient per off-diagonal, so a few groups cover the whole matrix and
    :func:`add_mixed_` needs only a few fused tensor-list operations per stack.
    """
    groups: dict[tuple[int, float], list[int]] = defaultdict(list)
    depth = matrix.shape[0]
    for i in range(depth):
        for j in range(depth):
            coefficient = float(matrix[i, j])
            if coefficient != 0.0:
                groups[(j - i, coefficient)].append(i)
    return [(offset, coefficient, rows) for (offset, coefficient), rows in groups.items()]


def add_mixed_(
    targets: Sequence[Sequence[torch.Tensor]],
    sources: Sequence[Sequence[torch.Tensor]],
    terms: list[tuple[int, float, list[int]]],
) -> None:
    """Add the depth mixture of ``sources`` to ``targets`` in place.

    ``targets[s][i] += sum_j M[i, j] * sources[s][j]`` for every slot ``s``, where ``terms`` is
    :func:`band_terms` of M. All slots of a stack share the depth, so one ``torch._foreach_add_``
    call covers one (offset, coefficient) term across every slot. Targets must not alias sources.
    """
    for offset, coefficient, rows in terms:
        out = [slot_targets[i] for slot_targets in targets for i in rows]
        inputs = [slot_sources[i + offset] for slot_sources in sources for i in rows]
        torch._foreach_add_(out, inputs, alpha=coefficient)


def mix(tensors: Sequence[torch.Tensor], matrix: torch.Tensor) -> list[torch.Tensor]:
    """Return ``out_i = sum_j matrix[i, j] * tensors[j]`` for one depth sequence of tensors."""
    if len(tensors) != matrix.shape[0]:
        raise ValueError(f"expected {matrix.shape[0]} tensors along depth, got {len(tensors)}")

    out = [torch.zeros_like(t) for t in tensors]
    add_mixed_([out], [tensors], band_terms(matrix))
    return out


@dataclass(frozen=True)
class FlatTerm:
    """One fused tensor-list operation of a depth mixture over a flat list of tensors.

    ``out[targets[n]] += coefficient * inputs[sources[n]]`` for every ``n``. A target index occurs
    at most once in one term, so a CUDA multi-tensor kernel never writes one tensor from two places.
    """

    offset: int
    coefficient: float
    targets: tuple[int, ...]
    sources: tuple[int, ...]


def flat_terms(layouts: Sequence[tuple[torch.Tensor, Sequence[int]]], diagonal: bool = True) -> list[FlatTerm]:
    """Group the entries of several mixing matrices as terms over one flat tensor list.

    Each layout is ``(matrix, starts)``: the L x L matrix of one stack and, for each of its slots,
    the flat index of the slot's depth-0 tensor (depth i sits at ``start + i``). Entries with the
    same (offset, coefficient) share a term across slots and stacks, so a window operator needs
    about ``window + 1`` fused operations for the whole model. ``diagonal=False`` leaves out the
    diagonal, for callers that start each output from :func:`diagonal_groups`.
    """
    grouped: dict[tuple[int, float], tuple[list[int], list[int]]] = {}
    for matrix, starts in layouts:
        for offset, coefficient, rows in band_terms(matrix):
            if offset == 0 and not diagonal:
                continue
            targets, sources = grouped.setdefault((offset, coefficient), ([], []))
            for start in starts:
                targets.extend(start + i for i in rows)
                sources.extend(start + i + offset for i in rows)
    return [
        FlatTerm(offset, coefficient, tuple(targets), tuple(sources))
        for (offset, coefficient), (targets, sources) in grouped.items()
    ]


def diagonal_groups(layouts: Sequence[tuple[torch.Tensor, Sequence[int]]]) -> list[tuple[float, tuple[int, ...]]]:
    """Group flat indices by their diagonal coefficient, zeros included, as (coefficient, indices).

    With :func:`flat_terms` and ``diagonal=False`` this covers every entry of each matrix once:
    ``out = diagonal * inputs`` first (which allocates ``out``), then the off-diagonal terms.
    """
    grouped: dict[float, list[int]] = defaultdict(list)
    for matrix, starts in layouts:
        coefficients = matrix.diagonal().tolist()
        for start in starts:
            for i, coefficient in enumerate(coefficients):
                grouped[float(coefficient)].append(start + i)
    return [(coefficient, tuple(indices)) for coefficient, indices in grouped.items()]
