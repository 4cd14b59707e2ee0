"""Settings of the smoothing wrapper, checked when the object is built.

A plain dataclass, so the core stays free of Hydra; the Hydra suite registers this same class as
the schema of the ``smoothing`` config group. Defaults (window 3, strength 0.2, update target,
decoupled weight decay kept out of the smoothing) follow the method's description in
Meng, Sugolov and Papyan, "Gradient Smoothing: Coupling Layer-wise Updates for Improved
Optimization" (arXiv 2606.30813); ``configs/smoothing/window.yaml`` restates them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from gradsmooth.smoothing.operators import DIRECTIONS, KERNELS, OPERATORS, mixing_matrix

TARGETS = ("update", "gradient")
NORMALIZATIONS = ("none", "rescale")
PARAM_SETS = ("all", "matrices")


def _check_choice(key: str, value, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"smoothing.{key} must be one of {', '.join(choices)}; got {value!r}")


@dataclass
class SmoothingConfig:
    """Smoothing settings.

    operator: ``window`` (smoothing), ``laplacian`` (sharpening), ``ema`` (running average along
        depth) or ``none`` (no wrapper: the baseline).
    window: number of blocks a window operator mixes, ``2k + 1``; 1 is the identity.
    alpha: strength in [0, 1]: the weight a block gives to its neighbours; 0 is the identity.
    kernel: how a window shares ``alpha`` among neighbours: ``uniform`` or ``exponential``.
    decay: ratio between the weights of neighbours at distance d + 1 and d (exponential kernel).
    direction: ``forward`` (first block to last) or ``backward``, for ``ema``.
    target: ``update`` (smooth what the base optimizer adds to the parameters) or ``gradient``
        (smooth ``.grad`` before the base step).
    decouple_weight_decay: keep decoupled weight decay (AdamW, Muon) per block, out of the mix.
    normalize: ``none``, or ``rescale`` to give each smoothed update its own block's Frobenius norm.
    params: ``all`` block parameters, or only 2-D ``matrices``.
    stacks: module paths or fnmatch patterns of the stacks; empty finds them automatically.
    """

    operator: str = "window"
    window: int = 3
    alpha: float = 0.2
    kernel: str = "uniform"
    decay: float = 0.5
    direction: str = "forward"
    target: str = "update"
    decouple_weight_decay: bool = True
    normalize: str = "none"
    params: str = "all"
    stacks: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        _check_choice("operator", self.operator, (*OPERATORS, "none"))
        _check_choice("kernel", self.kernel, KERNELS)
        _check_choice("direction", self.direction, DIRECTIONS)
        _check_choice("target", self.target, TARGETS)
        _check_choice("normalize", self.normalize, NORMALIZATIONS)
        _check_choice("params", self.params, PARAM_SETS)

        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 1 or self.window % 2 == 0:
            raise ValueError(f"smoothing.window must be a positive odd integer (1, 3, 5, ...); got {self.window!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"smoothing.alpha must be a number in [0, 1]; got {self.alpha!r}")
        if not 0.0 < self.decay <= 1.0:
            raise ValueError(f"smoothing.decay must be in (0, 1]; got {self.decay!r}")
        if isinstance(self.stacks, str):
            raise ValueError(f"smoothing.stacks must be a list of module paths, e.g. ['blocks']; got {self.stacks!r}")
        self.stacks = list(self.stacks)

    @property
    def enabled(self) -> bool:
        return self.operator != "none"

    def mixing_matrix(self, depth: int) -> torch.Tensor:
        """Return the float64 depth-mixing matrix these settings give a stack of ``depth`` blocks."""
        return mixing_matrix(
            depth,
            operator=self.operator,
            window=self.window,
            alpha=self.alpha,
            kernel=self.kernel,
            decay=self.decay,
            direction=self.direction,
        )
