"""Depth mixtures applied to one flat list of tensors with grouped ``torch._foreach_*`` operations.

The wrapper lists every smoothed tensor once, ordered by stack, slot and depth. A
:class:`FlatMixer` turns the stacks' mixing matrices into a few index groups when it is built, so a
step runs one fused tensor-list operation per group and no Python loop over parameters: on a
GPU a multi-tensor kernel covers all slots of all stacks in one launch, and on a CPU each group is a
single call into C++.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from operator import itemgetter

import torch

from gradsmooth.smoothing.operators import diagonal_groups, flat_terms

TensorList = Sequence[torch.Tensor]


def index_getter(indices: Sequence[int]) -> Callable[[TensorList], tuple[torch.Tensor, ...]]:
    """Return a function that picks ``indices`` from a list as a tuple, in C rather than a Python loop."""
    if len(indices) == 1:
        (index,) = indices
        return lambda items: (items[index],)
    return itemgetter(*indices)


class FlatMixer:
    """One depth-mixing map over a flat tensor list, compiled to index groups once.

    Args:
        layouts: ``(matrix, starts)`` per stack, as :func:`gradsmooth.smoothing.operators.flat_terms`
            takes them; the flat list has ``size`` tensors.
        size: length of the flat list.
    """

    def __init__(self, layouts: Sequence[tuple[torch.Tensor, Sequence[int]]], size: int):
        self.size = size
        # The terms stay readable (benchmarks count the bytes they move); the getters run them.
        self.flat_terms = flat_terms(layouts)
        self.flat_off_diagonal = flat_terms(layouts, diagonal=False)
        self.terms = [
            (term.coefficient, index_getter(term.targets), index_getter(term.sources)) for term in self.flat_terms
        ]
        self.off_diagonal = [
            (term.coefficient, index_getter(term.targets), index_getter(term.sources)) for term in self.flat_off_diagonal
        ]
        diagonal = diagonal_groups(layouts)
        self.diagonal = [(coefficient, index_getter(indices)) for coefficient, indices in diagonal]
        # Position of each flat index in the concatenated outputs of the diagonal groups.
        order = [index for _, indices in diagonal for index in indices]
        if sorted(order) != list(range(size)):
            raise ValueError(f"layouts cover {len(order)} tensors, not the {size} of the flat list")
        position = {index: n for n, index in enumerate(order)}
        self._restore_order = index_getter([position[index] for index in range(size)])

    def add_(self, targets: TensorList, sources: TensorList) -> None:
        """Add ``M @ sources`` to ``targets`` in place. Targets must not alias sources."""
        for coefficient, take_targets, take_sources in self.terms:
            torch._foreach_add_(take_targets(targets), take_sources(sources), alpha=coefficient)

    def mix(self, sources: TensorList) -> tuple[torch.Tensor, ...]:
        """Return ``M @ sources`` in new tensors: the diagonal term allocates them, then the bands add in."""
        outputs: list[torch.Tensor] = []
        for coefficient, take in self.diagonal:
            outputs.extend(torch._foreach_mul(take(sources), coefficient))
        mixed = self._restore_order(outputs)
        for coefficient, take_targets, take_sources in self.off_diagonal:
            torch._foreach_add_(take_targets(mixed), take_sources(sources), alpha=coefficient)
        return mixed


def rescale_(mixed: TensorList, reference: TensorList) -> None:
    """Scale each ``mixed[i]`` in place to the Frobenius norm of ``reference[i]``."""
    target_norms = torch._foreach_norm(reference)
    mixed_norms = torch._foreach_norm(mixed)
    tiny = torch.finfo(mixed[0].dtype).tiny
    torch._foreach_clamp_min_(mixed_norms, tiny)
    ratios = torch._foreach_div(target_norms, mixed_norms)
    torch._foreach_mul_(mixed, ratios)
