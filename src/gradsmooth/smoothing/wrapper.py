"""The smoothing optimizer wrapper: it keeps state and order and calls the pure depth operators.

``SmoothedOptimizer`` is a ``torch.optim.Optimizer`` whose ``param_groups`` and ``state`` are the
base optimizer's own objects, so LR schedulers, Accelerate, Hugging Face ``Trainer`` and TRL see
the base optimizer's groups and hyperparameters unchanged.

With ``target="update"`` (the form the method describes) one step is:

1. copy the smoothed parameters (one persistent buffer per parameter, allocated at the first step),
2. run the base optimizer's step,
3. form each block's update ``delta_i = theta'_i - theta_i`` and, with ``decouple_weight_decay``,
   take the decoupled decay ``-lr * wd * theta_i`` out of it,
4. write ``theta_i + sum_j M[i, j] * delta_j`` (plus the block's own decay) into the parameters.

With ``target="gradient"`` the gradients are mixed along depth before the base step.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from gradsmooth.smoothing.config import SmoothingConfig
from gradsmooth.smoothing.flat import FlatMixer, index_getter, rescale_
from gradsmooth.smoothing.operators import add_mixed_, band_terms, is_identity
from gradsmooth.smoothing.stacks import Stack, find_stacks, format_stack_table


def sub_optimizers(optimizer: torch.optim.Optimizer) -> list[torch.optim.Optimizer]:
    """Return the optimizers that own ``optimizer``'s groups (several for a combined optimizer)."""
    return list(getattr(optimizer, "optimizers", [optimizer]))


def has_decoupled_decay(optimizer: torch.optim.Optimizer, group: dict) -> bool:
    """Return whether ``optimizer`` applies ``group``'s weight decay as ``param *= 1 - lr * wd``.

    True for torch's AdamW, Adam with ``decoupled_weight_decay=True`` and Muon.
    """
    if "decoupled_weight_decay" in group:
        return bool(group["decoupled_weight_decay"])
    # NOTE: optimizers outside torch.optim with decoupled decay (Lion, say) are treated as
    # coupled here, so their decay is smoothed with the rest of the update.
    return isinstance(optimizer, (torch.optim.AdamW, torch.optim.Muon))


class _StackPlan:
    """One stack's slots (each a list of per-depth parameters), their names and its mixing terms."""

    def __init__(self, stack: Stack, names: list[str], slots: list[list[nn.Parameter]], config: SmoothingConfig):
        self.path = stack.path
        self.names = names
        self.slots = slots
        matrix = config.mixing_matrix(stack.depth)
        self.matrix = matrix
        self.mix_terms = band_terms(matrix)


class SmoothedOptimizer(torch.optim.Optimizer):
    """Wrap ``optimizer`` so that each step's update is mixed along the depth of ``stacks``.

    Args:
        optimizer: any ``torch.optim.Optimizer`` (SGD, Adam, AdamW, Muon, a combined optimizer).
        stacks: from :func:`find_stacks`; only parameters in ``optimizer``'s groups are smoothed.
        config: the smoothing settings; ``operator="none"`` is rejected here (use the base).

    Not supported: ``target="gradient"`` with optimizers that re-evaluate the closure several
    times per step (LBFGS), because the gradients are smoothed once before the base step.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, stacks: list[Stack], config: SmoothingConfig):
        if not config.enabled:
            raise ValueError("SmoothedOptimizer needs an operator; use the base optimizer for smoothing.operator=none")

        params = [p for group in optimizer.param_groups for p in group["params"]]
        # Optimizer.__init__ sets up torch's step hooks and profiling. The groups it builds are then
        # replaced by the base optimizer's, so both objects share one set of groups and state.
        super().__init__(params, defaults={})
        self.base = optimizer
        self.param_groups = optimizer.param_groups
        self.state = optimizer.state
        self.config = config
        self.identity = is_identity(config.operator, config.window, config.alpha)
        self.smoothing_steps = 0

        held = {id(p) for p in params}
        self.stacks = stacks
        self.plans: list[_StackPlan] = []
        for stack in stacks:
            names, slots = [], []
            for name, slot_params in list(stack.slots.items()):
                if all(id(p) in held for p in slot_params):
                    names.append(name)
                    slots.append(slot_params)
                else:
                    stack.skipped[name] = "not in optimizer"
                    del stack.slots[name]
            if slots:
                self.plans.append(_StackPlan(stack, names, slots, config))

        if not self.plans:
            raise ValueError(
                "smoothing found no block parameter that the optimizer updates; check that the "
                "optimizer holds the stacks' parameters or use smoothing=none"
            )

        self._params = [p for plan in self.plans for slot in plan.slots for p in slot]
        self._sharded = check_sharding(self.plans, config)
        self._checked_holding = False
        self._owner = self._index_owners()
        self._decay_groups = self._index_decay_groups()
        self._snapshots: list[torch.Tensor] | None = None
        self._capture_next = False
        self._captured: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None

        # The hot path works on the flat list above: index groups built here once stand for the
        # per-stack, per-slot loops, so a step runs a few fused tensor-list operations.
        layouts, residual_layouts, start = [], [], 0
        for plan in self.plans:
            starts = []
            for slot in plan.slots:
                starts.append(start)
                start += len(slot)
            layouts.append((plan.matrix, starts))
            residual_layouts.append((torch.eye(plan.matrix.shape[0], dtype=plan.matrix.dtype) - plan.matrix, starts))
        self._mixer = FlatMixer(layouts, len(self._params))
        self._residual_mixer = FlatMixer(residual_layouts, len(self._params))

    def _index_owners(self) -> list[tuple[int, int]]:
        """Map each smoothed parameter to (sub-optimizer index, group index) of its group."""
        where: dict[int, tuple[int, int]] = {}
        for opt_index, opt in enumerate(sub_optimizers(self.base)):
            for group_index, group in enumerate(opt.param_groups):
                for p in group["params"]:
                    where[id(p)] = (opt_index, group_index)
        return [where[id(p)] for p in self._params]

    def _index_decay_groups(self) -> list[tuple[int, int, Callable]]:
        """List (sub-optimizer index, group index, getter of its smoothed tensors) per group."""
        members: dict[tuple[int, int], list[int]] = defaultdict(list)
        for index, owner in enumerate(self._owner):
            members[owner].append(index)
        return [(opt_index, group_index, index_getter(indices)) for (opt_index, group_index), indices in members.items()]

    def add_param_group(self, param_group: dict) -> None:
        if not hasattr(self, "base"):
            super().add_param_group(param_group)
        else:
            self.base.add_param_group(param_group)

    # --- the torch.optim.Optimizer contract -------------------------------------------------

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none=set_to_none)

    def step(self, closure=None):
        if self.identity:
            return self.base.step(closure)
        if not self._checked_holding:
            self._check_holding()

        capture, self._capture_next = self._capture_next, False
        if self.config.target == "gradient":
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            before = self._copy_gradients() if capture else None
            self._smooth_gradients()
            if capture:
                self._captured = self._pair(before, self._copy_gradients())
            self.base.step()
        else:
            self._take_snapshot()
            old = [s.clone() for s in self._snapshots] if capture else None
            loss = self.base.step(closure)
            before = self._changes_since(old) if capture else None
            self._smooth_updates()
            if capture:
                self._captured = self._pair(before, self._changes_since(old))

        self.smoothing_steps += 1
        return loss

    # --- diagnostics --------------------------------------------------------------------------

    def capture_next_step(self) -> None:
        """Keep the next step's tensors before and after smoothing for :meth:`take_capture`.

        They are the updates (``target="update"``) or the gradients (``target="gradient"``).
        Only that step pays for the extra copies.
        """
        self._capture_next = True

    def take_capture(self) -> dict[int, tuple[torch.Tensor, torch.Tensor]] | None:
        """Return ``{id(param): (before, after)}`` of the captured step and forget it, or None."""
        captured, self._captured = self._captured, None
        return captured

    @torch.no_grad()
    def _copy_gradients(self) -> list[torch.Tensor | None]:
        return [None if p.grad is None else local_tensor(p.grad).clone() for p in self._params]

    @torch.no_grad()
    def _changes_since(self, old: list[torch.Tensor]) -> list[torch.Tensor]:
        return torch._foreach_sub(self._tensors(), old)

    def _pair(self, before: list, after: list) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        return {
            id(p): (b, a) for p, b, a in zip(self._params, before, after) if b is not None and a is not None
        }

    def state_dict(self) -> dict:
        return {
            "base": self.base.state_dict(),
            "smoothing": {"config": asdict(self.config), "steps": self.smoothing_steps},
        }

    def load_state_dict(self, state_dict: dict) -> None:
        if "base" not in state_dict or "smoothing" not in state_dict:
            raise ValueError(
                "expected a SmoothedOptimizer state_dict with keys 'base' and 'smoothing'; got keys "
                f"{sorted(state_dict)}. Load a base optimizer's state_dict into optimizer.base instead."
            )
        self.base.load_state_dict(state_dict["base"])
        # The base optimizer replaces its group dicts and state on load; share the new ones.
        self.param_groups = self.base.param_groups
        self.state = self.base.state
        self.smoothing_steps = int(state_dict["smoothing"]["steps"])

    def __repr__(self) -> str:
        c = self.config
        return (
            f"SmoothedOptimizer(operator={c.operator}, window={c.window}, alpha={c.alpha}, target={c.target}, "
            f"stacks={[plan.path for plan in self.plans]}, base={self.base!r})"
        )

    # --- smoothing ----------------------------------------------------------------------------

    def describe(self, model: nn.Module) -> str:
        """Return the startup table of stacks, slots and what is left out."""
        return format_stack_table(model, self.stacks)

    def _decay_factors(self) -> list[tuple[float, Callable]]:
        """Return ``(lr * wd, getter)`` for each group whose decay is decoupled and not zero.

        The getter picks the group's smoothed tensors from a list ordered like ``self._params``.
        """
        if not self.config.decouple_weight_decay:
            return []

        optimizers = sub_optimizers(self.base)
        factors = []
        for opt_index, group_index, take in self._decay_groups:
            opt = optimizers[opt_index]
            group = opt.param_groups[group_index]
            if has_decoupled_decay(opt, group):
                factor = float(group["lr"]) * float(group.get("weight_decay", 0.0))
                if factor != 0.0:
                    factors.append((factor, take))
        return factors

    def _check_holding(self) -> None:
        """Raise if the smoothed parameters left the optimizer's groups, as FSDP1's flat parameters replace them."""
        held = {id(p) for group in self.param_groups for p in group["params"]}
        if any(id(p) not in held for p in self._params):
            raise NotImplementedError(
                "the optimizer's parameters were replaced after smoothing was set up, as FSDP1 "
                "(FullyShardedDataParallel) does with its flat parameters; smoothing supports DDP and "
                "FSDP2 (torch.distributed.fsdp.fully_shard)"
            )
        self._checked_holding = True

    def _tensors(self) -> list[torch.Tensor]:
        """Return the smoothed parameters, as local shards when FSDP2 shards them."""
        if not self._sharded:
            return self._params
        return [local_tensor(p) for p in self._params]

    @torch.no_grad()
    def _take_snapshot(self) -> None:
        params = self._tensors()
        if self._snapshots is None:
            # Allocated at the first step and reused: the update target's one copy of the smoothed parameters.
            self._snapshots = [torch.empty_like(p) for p in params]
        self._decay = self._decay_factors()
        torch._foreach_copy_(self._snapshots, params)

    @torch.no_grad()
    def _smooth_updates(self) -> None:
        # The snapshot buffers become D_r = (1 - c) theta_old - theta' in place, with c = lr * wd
        # where decay is decoupled (else c = 0). This is minus the update with the decay taken
        # out, so theta' + D_r = (1 - c) theta_old, the decayed old parameters. Scaling the snapshot
        # before the subtraction saves a pass; it rounds at the parameters' precision, as the base
        # step's own "param *= 1 - lr * wd" does.
        params = self._tensors()
        residuals = self._snapshots
        for factor, take in self._decay:
            torch._foreach_mul_(take(residuals), 1.0 - factor)
        torch._foreach_sub_(residuals, params)

        if self.config.normalize == "rescale":
            # theta_new = theta' + D_r - s * M(D_r), with s giving each mixed update its block's norm.
            # NOTE: the mixed updates are one transient copy of the smoothed parameters on top of
            # the snapshot buffers; normalize=none needs no such copy.
            mixed = self._mixer.mix(residuals)
            rescale_(mixed, residuals)
            torch._foreach_add_(params, residuals)
            torch._foreach_sub_(params, mixed)
        else:
            # theta_new = theta' + (I - M) D_r, read from the buffers and written to the parameters.
            self._residual_mixer.add_(params, residuals)

    @torch.no_grad()
    def _smooth_gradients(self) -> None:
        grads = [None if p.grad is None else local_tensor(p.grad) for p in self._params]
        if any(g is None for g in grads):
            self._smooth_some_gradients()
            return

        # Transient: the mixed gradients live until they are copied back into .grad.
        # NOTE: allocating them every step can cost more than the mixing on a CPU when the
        # allocator hands out fresh pages; the update target reuses its buffers instead.
        mixed = self._mixer.mix(grads)
        if self.config.normalize == "rescale":
            rescale_(mixed, grads)
        torch._foreach_copy_(grads, mixed)

    def _smooth_some_gradients(self) -> None:
        """Smooth the slots whose blocks all have a gradient, one stack at a time (the slow path)."""
        for plan in self.plans:
            slots = [slot for slot in plan.slots if all(p.grad is not None for p in slot)]
            # NOTE: a slot where some blocks have no gradient this step is left unsmoothed.
            if not slots:
                continue
            grads = [[local_tensor(p.grad) for p in slot] for slot in slots]
            mixed = [[torch.zeros_like(g) for g in slot] for slot in grads]
            add_mixed_(mixed, grads, plan.mix_terms)
            flat_mixed = [g for slot in mixed for g in slot]
            flat_grads = [g for slot in grads for g in slot]
            if self.config.normalize == "rescale":
                rescale_(flat_mixed, flat_grads)
            torch._foreach_copy_(flat_grads, flat_mixed)


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """Return the local shard of an FSDP2 ``DTensor`` (a view that writes through), else ``tensor``."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def check_sharding(plans: list[_StackPlan], config: SmoothingConfig) -> bool:
    """Return whether the smoothed parameters are FSDP2 ``DTensor`` shards that smoothing supports.

    Mixing along depth is elementwise across the blocks of a slot, so it runs on local shards when
    every block's tensor of a slot is sharded the same way. Rescaling needs global norms, which
    local shards do not have, so it is rejected.
    """
    params = [p for plan in plans for slot in plan.slots for p in slot]
    sharded = [isinstance(p, DTensor) for p in params]
    if not any(sharded):
        return False
    if not all(sharded):
        raise NotImplementedError(
            "smoothing with FSDP2 needs every smoothed block parameter sharded (fully_shard each block of the stack)"
        )
    if config.normalize == "rescale":
        raise NotImplementedError("smoothing.normalize=rescale is not supported on FSDP2-sharded parameters")
    for plan in plans:
        for slot in plan.slots:
            layouts = {(tuple(p.placements), p.device_mesh, tuple(p.to_local().shape)) for p in slot}
            if len(layouts) != 1:
                raise NotImplementedError(
                    f"smoothing with FSDP2 needs the blocks of stack {plan.path!r} sharded the same way; "
                    f"one slot has {len(layouts)} different layouts"
                )
    return True


def smooth(
    optimizer: torch.optim.Optimizer,
    model: nn.Module,
    config: SmoothingConfig | None = None,
    **settings,
) -> torch.optim.Optimizer:
    """Wrap ``optimizer`` with Gradient Smoothing over the stacks of ``model``.

    Pass a :class:`SmoothingConfig` or its fields as keywords (``window=3, alpha=0.2``). Returns
    ``optimizer`` itself for ``operator="none"``. Raises ``ValueError`` when ``model`` has no
    stack of two or more identical blocks, or when a ``stacks`` pattern matches none.
    """
    if config is None:
        config = SmoothingConfig(**settings)
    elif settings:
        raise ValueError("pass either a SmoothingConfig or keyword settings, not both")

    if not config.enabled:
        return optimizer
    if any(type(module).__name__ == "FullyShardedDataParallel" for module in model.modules()):
        raise NotImplementedError(
            "smoothing does not support FSDP1 (FullyShardedDataParallel) flat parameters; "
            "use DDP or FSDP2 (torch.distributed.fsdp.fully_shard)"
        )

    stacks = find_stacks(model, config.stacks or None, matrices_only=config.params == "matrices")
    if not stacks:
        raise ValueError(
            f"smoothing found no stack of >= 2 identical blocks in {type(model).__name__}. "
            "Set smoothing.stacks to the module path of its blocks, or use smoothing=none for the baseline."
        )
    return SmoothedOptimizer(optimizer, stacks, config)
