"""The fast smoothing path against the per-parameter reference, for every option.

Both paths wrap identical models and base optimizers and see identical gradients, drawn from a
fixed generator rather than from a backward pass, so the base step's inputs cannot drift apart.
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from torch import nn

from gradsmooth.optim import OptimConfig, build_optimizer
from gradsmooth.smoothing import SmoothedOptimizer, SmoothingConfig, smooth
from smoothing_reference import ReferenceSmoothing

DEPTH = 6
WIDTH = 5
STEPS = 3

pytestmark = pytest.mark.usefixtures("single_thread")


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(WIDTH, 2 * WIDTH)
        self.norm = nn.LayerNorm(2 * WIDTH)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(7, WIDTH)
        self.blocks = nn.ModuleList([Block() for _ in range(DEPTH)])
        self.head = nn.Linear(WIDTH, 3)


def make_optimizer(name: str, model: nn.Module) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    if name == "adamw":
        matrices = [p for p in model.parameters() if p.ndim == 2]
        vectors = [p for p in model.parameters() if p.ndim < 2]
        groups = [{"params": matrices, "weight_decay": 0.1}, {"params": vectors, "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=0.01)
    config = OptimConfig(name="muon", lr=0.01, weight_decay=0.1, muon_lr=0.02, muon_weight_decay=0.1)
    return build_optimizer(config, model)


def set_gradients(model: nn.Module, step: int, missing: str | None = None) -> None:
    generator = torch.Generator().manual_seed(100 + step)
    for name, p in model.named_parameters():
        p.grad = torch.randn(p.shape, generator=generator, dtype=p.dtype)
        if name == missing:
            p.grad = None


OPERATORS = [
    {"operator": "window", "window": 3},
    {"operator": "window", "window": 5, "kernel": "uniform"},
    {"operator": "window", "window": 5, "kernel": "exponential", "decay": 0.5},
    {"operator": "window", "window": 1},
    {"operator": "window", "window": 3, "alpha": 1.0},
    {"operator": "laplacian", "window": 3},
    {"operator": "laplacian", "window": 5, "kernel": "exponential"},
    {"operator": "ema", "direction": "forward"},
    {"operator": "ema", "direction": "backward", "alpha": 1.0},
]
SETTINGS = [
    {"target": target, "normalize": normalize, "decouple_weight_decay": decouple, "params": params}
    for target, normalize, decouple, params in itertools.product(
        ("update", "gradient"), ("none", "rescale"), (True, False), ("all", "matrices")
    )
]


def run_both(optimizer: str, settings: dict, missing: str | None = None):
    torch.manual_seed(0)
    fast_model = Net().double()
    reference_model = copy.deepcopy(fast_model)
    config = SmoothingConfig(alpha=settings.pop("alpha", 0.3), **settings)
    fast = smooth(make_optimizer(optimizer, fast_model), fast_model, config)
    reference = ReferenceSmoothing(make_optimizer(optimizer, reference_model), reference_model, config)

    for step in range(STEPS):
        set_gradients(fast_model, step, missing)
        set_gradients(reference_model, step, missing)
        fast.step()
        reference.step()
    return fast, fast_model, reference_model


def assert_same_parameters(fast_model: nn.Module, reference_model: nn.Module) -> None:
    for (name, got), want in zip(fast_model.named_parameters(), reference_model.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: "-".join(str(v) for v in s.values()))
@pytest.mark.parametrize("operator", OPERATORS, ids=lambda o: "-".join(str(v) for v in o.values()))
@pytest.mark.parametrize("optimizer", ("sgd", "adamw", "muon"))
def test_fast_matches_reference(optimizer, operator, settings):
    _, fast_model, reference_model = run_both(optimizer, {**operator, **settings})

    assert_same_parameters(fast_model, reference_model)


@pytest.mark.parametrize("normalize", ("none", "rescale"))
def test_missing_gradient_slot(normalize):
    settings = {"target": "gradient", "normalize": normalize}
    _, fast_model, reference_model = run_both("adamw", settings, missing="blocks.2.norm.bias")

    assert_same_parameters(fast_model, reference_model)


def test_snapshot_allocated_once():
    fast, _, _ = run_both("adamw", {"target": "update"})
    pointers = [t.data_ptr() for t in fast._snapshots]

    fast.step()

    assert [t.data_ptr() for t in fast._snapshots] == pointers
    assert sum(t.numel() for t in fast._snapshots) == sum(p.numel() for p in fast._params)


def test_gradient_target_keeps_no_buffers():
    fast, _, _ = run_both("adamw", {"target": "gradient"})

    assert fast._snapshots is None


def test_window1_is_base_step(monkeypatch):
    fast, fast_model, reference_model = run_both("adamw", {"window": 1})
    calls = []
    monkeypatch.setattr(torch, "_foreach_copy_", lambda *args, **kwargs: calls.append("copy"))
    set_gradients(fast_model, 0)

    fast.step()

    assert isinstance(fast, SmoothedOptimizer)
    assert fast._snapshots is None
    assert calls == []
