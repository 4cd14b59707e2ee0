"""Update diagnostics along depth: how alike adjacent blocks' updates are, before and after smoothing.

Two measures per slot, both on the list ``[delta_0, ..., delta_{L-1}]`` of one slot's per-block
tensors:

- adjacent cosine: the mean over ``i`` of ``cos(delta_i, delta_{i+1})`` (tensors flattened);
- depth roughness: ``||second difference along depth|| / ||delta||``, that is
  ``sqrt(sum_i ||delta_{i-1} - 2 delta_i + delta_{i+1}||^2) / sqrt(sum_i ||delta_i||^2)``,
  0 for updates that change linearly with depth and larger for updates that zigzag.

:class:`UpdateProbe` measures one optimizer step in any PyTorch loop. With a
:class:`SmoothedOptimizer`, "before" is the base optimizer's update (the raw gradient with
``target="gradient"``) and "after" is what smoothing made of it. With any other optimizer (the
baseline), both are the applied update.
"""

from __future__ import annotations

import torch
from torch import nn

from gradsmooth.smoothing.config import SmoothingConfig
from gradsmooth.smoothing.stacks import Stack, find_stacks
from gradsmooth.smoothing.wrapper import SmoothedOptimizer

MEASURES = ("adjacent_cos", "roughness")


def adjacent_cosine(tensors: list[torch.Tensor]) -> float:
    """Return the mean cosine similarity of consecutive tensors (0 for pairs with a zero tensor)."""
    flat = torch.stack([t.detach().reshape(-1).float() for t in tensors])
    similarity = torch.nn.functional.cosine_similarity(flat[:-1], flat[1:], dim=1, eps=1e-30)
    return float(similarity.mean())


def depth_roughness(tensors: list[torch.Tensor]) -> float:
    """Return the norm of the second difference along depth over the norm of the tensors (0 when all are zero)."""
    flat = torch.stack([t.detach().reshape(-1).float() for t in tensors])
    total = flat.norm()
    if len(tensors) < 3 or total == 0:
        return 0.0
    second = flat[:-2] - 2 * flat[1:-1] + flat[2:]
    return float(second.norm() / total)


def slot_measures(before: list[torch.Tensor], after: list[torch.Tensor]) -> dict[str, float]:
    """Return both measures of one slot's per-block tensors before and after smoothing."""
    return {
        "adjacent_cos_before": adjacent_cosine(before),
        "adjacent_cos_after": adjacent_cosine(after),
        "roughness_before": depth_roughness(before),
        "roughness_after": depth_roughness(after),
    }


class UpdateProbe:
    """Measure the update of one optimizer step per stack and slot.

    Call :meth:`start` right before ``optimizer.step()`` and :meth:`finish` right after. Only
    those steps cost anything: a copy of the stacks' parameters for the baseline, or a copy of
    the smoothed parameters and of the updates inside a :class:`SmoothedOptimizer`.

    Args:
        stacks: the stacks to measure, from :func:`find_stacks`; ignored when ``optimizer`` is a
            :class:`SmoothedOptimizer`, which measures the stacks it smooths.
        optimizer: the optimizer that is stepped (a wrapper such as Accelerate's that exposes
            the real one as ``.optimizer`` is looked through).
    """

    def __init__(self, stacks: list[Stack], optimizer: torch.optim.Optimizer):
        inner = getattr(optimizer, "optimizer", optimizer)
        self.smoothed = inner if isinstance(inner, SmoothedOptimizer) and not inner.identity else None
        if self.smoothed is not None:
            self.slots = {
                (plan.path, name): slot for plan in self.smoothed.plans for name, slot in zip(plan.names, plan.slots)
            }
        else:
            self.slots = {(stack.path, name): params for stack in stacks for name, params in stack.slots.items()}
        self._before: list[torch.Tensor] | None = None

    @torch.no_grad()
    def start(self) -> None:
        if self.smoothed is not None:
            self.smoothed.capture_next_step()
            return
        self._before = [p.detach().clone() for params in self.slots.values() for p in params]

    @torch.no_grad()
    def finish(self) -> dict[tuple[str, str], dict[str, float]]:
        """Return the measures of the step since :meth:`start`, keyed by (stack path, slot name); {} if none was taken."""
        updates = self._updates()
        results = {}
        for key, params in self.slots.items():
            pairs = [updates.get(id(p)) for p in params]
            if any(pair is None for pair in pairs):
                # A block without an update this step (no gradient): the slot is left out.
                continue
            before = [pair[0] for pair in pairs]
            after = [pair[1] for pair in pairs]
            results[key] = slot_measures(before, after)
        return results

    def _updates(self) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Map each measured parameter's id to its (before, after) tensors."""
        if self.smoothed is not None:
            # None when the step was skipped (an fp16 overflow under a gradient scaler): nothing to measure.
            return self.smoothed.take_capture() or {}

        if self._before is None:
            raise RuntimeError("UpdateProbe.finish() was called without start()")
        params = [p for params in self.slots.values() for p in params]
        updates = {}
        for p, old in zip(params, self._before):
            delta = p.detach() - old
            updates[id(p)] = (delta, delta)
        self._before = None
        return updates


def summarize(results: dict[tuple[str, str], dict[str, float]]) -> dict[str, float]:
    """Average each measure over the slots of every stack, as ``smooth/<measure>`` metrics.

    With more than one stack each stack also gets ``smooth/<stack path>/<measure>``.
    """
    if not results:
        return {}
    names = next(iter(results.values())).keys()
    metrics = {f"smooth/{name}": sum(r[name] for r in results.values()) / len(results) for name in names}

    stacks = sorted({path for path, _ in results})
    if len(stacks) > 1:
        for path in stacks:
            rows = [r for (stack_path, _), r in results.items() if stack_path == path]
            for name in names:
                metrics[f"smooth/{path}/{name}"] = sum(r[name] for r in rows) / len(rows)
    return metrics


def probe_stacks(model: nn.Module, config: SmoothingConfig) -> list[Stack]:
    """Return the stacks and slots that smoothing with ``config`` would cover, also for the baseline."""
    return find_stacks(model, config.stacks or None, matrices_only=config.params == "matrices")
