"""Build the base optimizer and its learning-rate schedule from an ``OptimConfig``."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from gradsmooth.optim.combined import CombinedOptimizer
from gradsmooth.smoothing.stacks import find_stacks

log = logging.getLogger(__name__)

OPTIMIZERS = ("sgd", "adam", "adamw", "muon")
SCHEDULES = ("cosine", "constant")
MUON_LR_ADJUSTMENTS = ("original", "match_rms_adamw")


@dataclass
class OptimConfig:
    """Base optimizer and LR schedule.

    name: ``sgd``, ``adam``, ``adamw`` or ``muon`` (Muon on the 2-D matrices inside the stacks of
        repeated blocks, AdamW with ``lr``, ``betas`` and ``weight_decay`` on everything else).
    lr: peak learning rate of SGD/Adam/AdamW and of Muon's AdamW part.
    weight_decay: L2 penalty for SGD and Adam (coupled), decoupled decay for AdamW.
    no_decay_1d: exempt tensors with fewer than 2 dimensions (biases, norm scales) from decay.
    momentum, nesterov: SGD's momentum.
    betas, eps: Adam and AdamW moments.
    muon_*: torch.optim.Muon settings; its own defaults (lr 1e-3, decay 0.1) differ from other
        Muon implementations, so every one is set here. ``muon_adjust_lr`` is ``original``
        (scale by sqrt(max(1, rows / cols))) or ``match_rms_adamw`` (0.2 * sqrt(max(rows, cols))).
    schedule: ``cosine`` (linear warmup, cosine decay to ``min_lr_ratio * lr``) or ``constant``
        (linear warmup, then flat).
    warmup_steps: optimizer steps of linear warmup from 0.
    """

    name: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.0
    no_decay_1d: bool = True
    momentum: float = 0.9
    nesterov: bool = False
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    muon_lr: float = 0.02
    muon_momentum: float = 0.95
    muon_nesterov: bool = True
    muon_weight_decay: float = 0.0
    muon_ns_steps: int = 5
    muon_adjust_lr: str = "original"
    schedule: str = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise ValueError(f"optim.name must be one of {', '.join(OPTIMIZERS)}; got {self.name!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"optim.schedule must be one of {', '.join(SCHEDULES)}; got {self.schedule!r}")
        if self.muon_adjust_lr not in MUON_LR_ADJUSTMENTS:
            raise ValueError(
                f"optim.muon_adjust_lr must be one of {', '.join(MUON_LR_ADJUSTMENTS)}; got {self.muon_adjust_lr!r}"
            )
        for key in ("lr", "muon_lr"):
            if not getattr(self, key) > 0:
                raise ValueError(f"optim.{key} must be positive; got {getattr(self, key)!r}")
        for key in ("weight_decay", "muon_weight_decay", "warmup_steps"):
            if getattr(self, key) < 0:
                raise ValueError(f"optim.{key} must be >= 0; got {getattr(self, key)!r}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"optim.min_lr_ratio must be in [0, 1]; got {self.min_lr_ratio!r}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"optim.betas must be two numbers in [0, 1); got {list(self.betas)!r}")
        self.betas = [float(b) for b in self.betas]


def _named_trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def _decay_groups(named: list[tuple[str, nn.Parameter]], weight_decay: float, no_decay_1d: bool, **extra) -> list[dict]:
    """Split parameters into a decayed group and, with ``no_decay_1d``, a group of 1-D tensors without decay."""
    if not no_decay_1d or weight_decay == 0:
        return [{"params": [p for _, p in named], "weight_decay": weight_decay, "names": [n for n, _ in named], **extra}]
    decay = [(n, p) for n, p in named if p.ndim >= 2]
    no_decay = [(n, p) for n, p in named if p.ndim < 2]
    groups = []
    for members, wd in ((decay, weight_decay), (no_decay, 0.0)):
        if members:
            groups.append({"params": [p for _, p in members], "weight_decay": wd, "names": [n for n, _ in members], **extra})
    return groups


def muon_matrices(model: nn.Module) -> set[int]:
    """Return the ids of the 2-D trainable matrices inside the model's stacks of repeated blocks."""
    stacks = find_stacks(model)
    return {id(p) for stack in stacks for params in stack.slots.values() for p in params if p.ndim == 2}


def build_optimizer(config: OptimConfig, model: nn.Module) -> torch.optim.Optimizer:
    """Build the base optimizer for ``model``'s trainable parameters."""
    named = _named_trainable(model)
    if not named:
        raise ValueError(f"{type(model).__name__} has no trainable parameter to optimize")

    if config.name == "sgd":
        groups = _decay_groups(named, config.weight_decay, config.no_decay_1d)
        optimizer = torch.optim.SGD(_strip(groups), lr=config.lr, momentum=config.momentum, nesterov=config.nesterov)
    elif config.name in ("adam", "adamw"):
        groups = _decay_groups(named, config.weight_decay, config.no_decay_1d)
        cls = torch.optim.Adam if config.name == "adam" else torch.optim.AdamW
        optimizer = cls(_strip(groups), lr=config.lr, betas=tuple(config.betas), eps=config.eps)
    else:
        matrices = muon_matrices(model)
        muon_named = [(n, p) for n, p in named if id(p) in matrices]
        if not muon_named:
            raise ValueError(
                f"optim=muon found no 2-D matrix inside a stack of repeated blocks in {type(model).__name__}; "
                "Muon needs block weight matrices. Use optim=adamw for this model."
            )
        other_named = [(n, p) for n, p in named if id(p) not in matrices]
        muon_groups = [{"params": [p for _, p in muon_named], "names": [n for n, _ in muon_named]}]
        groups = muon_groups
        muon = torch.optim.Muon(
            _strip(muon_groups),
            lr=config.muon_lr,
            weight_decay=config.muon_weight_decay,
            momentum=config.muon_momentum,
            nesterov=config.muon_nesterov,
            ns_steps=config.muon_ns_steps,
            adjust_lr_fn=config.muon_adjust_lr,
        )
        optimizers = [muon]
        if other_named:
            adamw_groups = _decay_groups(other_named, config.weight_decay, config.no_decay_1d)
            groups = muon_groups + adamw_groups
            optimizers.append(torch.optim.AdamW(_strip(adamw_groups), lr=config.lr, betas=tuple(config.betas), eps=config.eps))
        optimizer = CombinedOptimizer(optimizers)

    log.info("optimizer groups:\n%s", format_group_table(optimizer, groups))
    return optimizer


def _strip(groups: list[dict]) -> list[dict]:
    """Drop the bookkeeping ``names`` key that torch optimizers do not take."""
    return [{k: v for k, v in group.items() if k != "names"} for group in groups]


def format_group_table(optimizer: torch.optim.Optimizer, groups: list[dict]) -> str:
    """Render one line per parameter group: optimizer, tensors, parameters, lr, weight decay."""
    lines = [f"{'optimizer':<10} {'tensors':>7} {'params':>12} {'lr':>9} {'wd':>7}  example"]
    for group, live in zip(groups, optimizer.param_groups):
        owner = "Muon" if "ns_steps" in live else type(optimizer).__name__
        if isinstance(optimizer, CombinedOptimizer) and "ns_steps" not in live:
            owner = "AdamW"
        count = sum(p.numel() for p in live["params"])
        lines.append(
            f"{owner:<10} {len(live['params']):>7} {count:>12,} {live['lr']:>9.2e} {live['weight_decay']:>7.3f}  {group['names'][0]}"
        )
    return "\n".join(lines)


def build_scheduler(config: OptimConfig, optimizer: torch.optim.Optimizer, total_steps: int):
    """Build the LR schedule over ``total_steps`` optimizer steps (transformers' implementations)."""
    from transformers import get_constant_schedule_with_warmup, get_cosine_with_min_lr_schedule_with_warmup

    if config.schedule == "constant":
        return get_constant_schedule_with_warmup(optimizer, num_warmup_steps=config.warmup_steps)
    return get_cosine_with_min_lr_schedule_with_warmup(
        optimizer,
        num_warmup_steps=config.warmup_steps,
        num_training_steps=total_steps,
        min_lr_rate=config.min_lr_ratio,
    )
