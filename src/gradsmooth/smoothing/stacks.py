"""Find the stacks of repeated blocks in a model and map parameters to (stack, depth, slot).

A *stack* is a ``ModuleList`` or ``Sequential`` of two or more structurally identical blocks:
the same class and the same trainable parameter names with the same shapes. A *slot* is a
parameter name relative to its block, so one slot holds one tensor per block. Parameters outside
every stack (embeddings, heads, final norms, one-off blocks) are left unsmoothed.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class Stack:
    """One stack of blocks and its slots.

    ``slots`` maps a slot name to the block parameters at depth 0, 1, ..., L - 1.
    ``skipped`` maps a slot that is not smoothed to the reason.
    """

    path: str
    depth: int
    slots: dict[str, list[nn.Parameter]]
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def numel(self) -> int:
        return sum(p.numel() for params in self.slots.values() for p in params)


def _block_signature(block: nn.Module) -> tuple:
    """Describe a block by its class and its trainable parameter names and shapes."""
    params = tuple((name, tuple(p.shape)) for name, p in block.named_parameters() if p.requires_grad)
    return (type(block), params)


def _is_stack_container(module: nn.Module) -> bool:
    """Return whether ``module`` is a container of >= 2 identical blocks with trainable parameters."""
    if not isinstance(module, (nn.ModuleList, nn.Sequential)):
        return False

    blocks = list(module.children())
    if len(blocks) < 2:
        return False

    signatures = {_block_signature(block) for block in blocks}
    if len(signatures) != 1:
        return False
    _, params = signatures.pop()
    return len(params) > 0


def candidate_paths(model: nn.Module) -> list[str]:
    """Return the module path of every container of >= 2 identical blocks, nested ones included.

    The model itself is a candidate too (path ``""``), for a bare ``nn.Sequential`` of blocks.
    """
    return [name for name, module in model.named_modules() if _is_stack_container(module)]


def _build_stack(path: str, container: nn.Module, matrices_only: bool) -> Stack:
    blocks = list(container.children())
    per_block = [dict(block.named_parameters()) for block in blocks]
    slots: dict[str, list[nn.Parameter]] = {}
    skipped: dict[str, str] = {}

    for name, first in per_block[0].items():
        params = [block_params[name] for block_params in per_block]
        if not all(p.requires_grad for p in params):
            skipped[name] = "frozen"
        elif len({id(p) for p in params}) != len(params):
            skipped[name] = "shared across blocks"
        elif matrices_only and first.ndim != 2:
            skipped[name] = f"{first.ndim}-D (params=matrices)"
        else:
            slots[name] = params

    return Stack(path=path, depth=len(blocks), slots=slots, skipped=skipped)


def find_stacks(
    model: nn.Module, paths: list[str] | tuple[str, ...] | None = None, matrices_only: bool = False
) -> list[Stack]:
    """Find the stacks of ``model``.

    With no ``paths``, every outermost container of >= 2 identical blocks is a stack; containers
    nested inside a stack's blocks are not. ``paths`` overrides discovery with module paths or
    ``fnmatch`` patterns (``"encoder.layer"``, ``"*.blocks"``); each pattern must match at least
    one container of identical blocks, else a ``ValueError`` lists the candidates.
    ``matrices_only`` leaves 1-D slots (biases, norm scales) unsmoothed.
    """
    modules = dict(model.named_modules())

    if paths:
        chosen: list[str] = []
        for pattern in paths:
            matches = [name for name in modules if fnmatch.fnmatchcase(name, pattern)]
            stacks = [name for name in matches if _is_stack_container(modules[name])]
            if not stacks:
                candidates = candidate_paths(model) or ["none"]
                reason = (
                    f"matches modules {matches[:5]} that are not containers of >= 2 identical blocks"
                    if matches
                    else "matches no module"
                )
                raise ValueError(
                    f"smoothing.stacks entry {pattern!r} {reason}. "
                    f"Containers of identical blocks in this model: {', '.join(candidates)}"
                )
            chosen.extend(name for name in stacks if name not in chosen)
    else:
        chosen = []
        for name in candidate_paths(model):
            if not any(outer == "" or name.startswith(outer + ".") for outer in chosen):
                chosen.append(name)

    return [_build_stack(name, modules[name], matrices_only) for name in chosen]


def unsmoothed_parameters(model: nn.Module, stacks: list[Stack]) -> list[tuple[str, torch.Tensor]]:
    """Return the trainable (name, parameter) pairs that no stack smooths."""
    smoothed = {id(p) for stack in stacks for params in stack.slots.values() for p in params}
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad and id(p) not in smoothed]


def format_stack_table(model: nn.Module, stacks: list[Stack]) -> str:
    """Render the startup table: each stack's path, depth, slots and size, then what is left out."""
    lines = [f"{'stack':<32} {'depth':>5} {'slots':>5} {'params':>12}  skipped slots"]
    for stack in stacks:
        skipped = ", ".join(f"{slot} ({why})" for slot, why in stack.skipped.items()) or "-"
        lines.append(f"{stack.path or '(model)':<32} {stack.depth:>5} {len(stack.slots):>5} {stack.numel:>12,}  {skipped}")

    left_out = unsmoothed_parameters(model, stacks)
    count = sum(p.numel() for _, p in left_out)
    names = sorted({name.split(".")[0] for name, _ in left_out})
    lines.append(f"not smoothed: {len(left_out)} tensors, {count:,} params (top-level: {', '.join(names) or '-'})")
    return "\n".join(lines)
