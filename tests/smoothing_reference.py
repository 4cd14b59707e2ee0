"""A straightforward per-parameter implementation of Gradient Smoothing, the definition in code.

It loops over stacks, slots and blocks, clones what it needs each step and sums
``M[i, j] * update_j`` over the non-zero entries of the dense mixing matrix, one tensor at a
time. The fast path in ``gradsmooth.smoothing`` must match it for every option; the benchmark
(``scripts/bench_smoothing.py``) times it as the baseline a fast path is compared with.
"""

from __future__ import annotations

import torch
from torch import nn

from gradsmooth.smoothing import SmoothingConfig, find_stacks, is_identity
from gradsmooth.smoothing.wrapper import has_decoupled_decay, sub_optimizers


class ReferenceSmoothing:
    """Step ``base`` and smooth the updates (or gradients) of ``model``'s stacks per parameter."""

    def __init__(self, base: torch.optim.Optimizer, model: nn.Module, config: SmoothingConfig):
        self.base = base
        self.config = config
        self.identity = is_identity(config.operator, config.window, config.alpha)

        held = {id(p) for group in base.param_groups for p in group["params"]}
        stacks = find_stacks(model, config.stacks or None, matrices_only=config.params == "matrices")
        self.slots: list[tuple[list[list[float]], list[nn.Parameter]]] = []
        for stack in stacks:
            matrix = config.mixing_matrix(stack.depth).tolist()
            for params in stack.slots.values():
                if all(id(p) in held for p in params):
                    self.slots.append((matrix, params))

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none=set_to_none)

    def decay_factor(self, param: torch.Tensor) -> float:
        """Return ``lr * wd`` of ``param``'s group if its decay is decoupled and kept out, else 0."""
        if not self.config.decouple_weight_decay:
            return 0.0
        for opt in sub_optimizers(self.base):
            for group in opt.param_groups:
                if any(p is param for p in group["params"]):
                    if has_decoupled_decay(opt, group):
                        return float(group["lr"]) * float(group.get("weight_decay", 0.0))
                    return 0.0
        raise AssertionError("parameter not in the optimizer")

    def mixed(self, matrix: list[list[float]], updates: list[torch.Tensor], i: int) -> torch.Tensor:
        """Return ``sum_j M[i, j] * updates[j]``, rescaled to ``updates[i]``'s norm with normalize=rescale."""
        total = torch.zeros_like(updates[i])
        for j, update in enumerate(updates):
            if matrix[i][j] != 0.0:
                total = total + matrix[i][j] * update
        if self.config.normalize == "rescale":
            tiny = torch.finfo(total.dtype).tiny
            total = total * (updates[i].norm() / total.norm().clamp_min(tiny))
        return total

    @torch.no_grad()
    def step(self) -> None:
        if self.identity:
            self.base.step()
            return

        if self.config.target == "gradient":
            for matrix, params in self.slots:
                if any(p.grad is None for p in params):
                    continue
                grads = [p.grad.clone() for p in params]
                for i, p in enumerate(params):
                    p.grad.copy_(self.mixed(matrix, grads, i))
            self.base.step()
            return

        olds = [[p.detach().clone() for p in params] for _, params in self.slots]
        factors = [[self.decay_factor(p) for p in params] for _, params in self.slots]
        self.base.step()
        for (matrix, params), old, factor in zip(self.slots, olds, factors):
            # The decayed old parameters, and each block's update with that decay taken out.
            kept = [(1.0 - c) * o for o, c in zip(old, factor)]
            updates = [p.detach() - k for p, k in zip(params, kept)]
            for i, p in enumerate(params):
                p.copy_(kept[i] + self.mixed(matrix, updates, i))
