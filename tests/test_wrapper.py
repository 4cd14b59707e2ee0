"""SmoothedOptimizer and smooth(): exact update formulas, identity cases, state and integrations.

Expected values come from the base optimizer run on a copy of the model and the dense mixing
matrix M: a smoothed block update is ``sum_j M[i, j] * update_j``.
"""

from __future__ import annotations

import copy
import io
import math
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch
from torch import nn

from gradsmooth.smoothing import SmoothedOptimizer, SmoothingConfig, smooth

DEPTH = 4
WIDTH = 8
VOCAB = 16
CLASSES = 3


pytestmark = pytest.mark.usefixtures("single_thread")


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(WIDTH, WIDTH)
        self.norm = nn.LayerNorm(WIDTH)

    def forward(self, x):
        return x + torch.tanh(self.linear(self.norm(x)))


class Net(nn.Module):
    """An embedding, a stack of identical blocks and a head."""

    def __init__(self, depth: int = DEPTH):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.blocks = nn.ModuleList([Block() for _ in range(depth)])
        self.head = nn.Linear(WIDTH, CLASSES)

    def forward(self, tokens):
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean(dim=1))


def make_net(seed: int = 0, dtype=torch.float32) -> Net:
    torch.manual_seed(seed)
    return Net().to(dtype)


def make_batches(count: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        (torch.randint(0, VOCAB, (6, 5), generator=generator), torch.randint(0, CLASSES, (6,), generator=generator))
        for _ in range(count)
    ]


def backward(model: nn.Module, batch) -> None:
    tokens, labels = batch
    loss = nn.functional.cross_entropy(model(tokens), labels)
    loss.backward()


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch) -> None:
    optimizer.zero_grad()
    backward(model, batch)
    optimizer.step()


def block_slots(model: nn.Module, path: str = "blocks") -> dict[str, list[nn.Parameter]]:
    """Map each parameter name inside a block to its tensor at depth 0, 1, ..., L - 1."""
    container = model.get_submodule(path)
    names = [name for name, _ in container[0].named_parameters()]
    return {name: [block.get_parameter(name) for block in container] for name in names}


def outside_params(model: nn.Module, path: str = "blocks") -> dict[str, nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if not name.startswith(path + ".")}


def clone_slots(slots: dict[str, list[torch.Tensor]]) -> dict[str, list[torch.Tensor]]:
    return {name: [t.detach().clone() for t in tensors] for name, tensors in slots.items()}


def grad_slots(slots: dict[str, list[nn.Parameter]]) -> dict[str, list[torch.Tensor]]:
    return {name: [p.grad.detach().clone() for p in params] for name, params in slots.items()}


def depth_mix(tensors: list[torch.Tensor], matrix: torch.Tensor, i: int) -> torch.Tensor:
    return sum(matrix[i, j].item() * tensors[j] for j in range(len(tensors)))


def assert_params_equal(left: nn.Module, right: nn.Module) -> None:
    for (name, a), (_, b) in zip(left.named_parameters(), right.named_parameters()):
        assert torch.equal(a, b), f"{name} differs"


def params_differ(left: nn.Module, right: nn.Module) -> bool:
    return any(not torch.equal(a, b) for a, b in zip(left.parameters(), right.parameters()))


def config_matrix(config: SmoothingConfig, depth: int = DEPTH) -> torch.Tensor:
    return config.mixing_matrix(depth)


# --- identity -------------------------------------------------------------------------------


def sgd(params):
    return torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=1e-3)


def adam(params):
    return torch.optim.Adam(params, lr=1e-2, weight_decay=1e-3)


def adamw(params):
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)


def muon(params):
    return torch.optim.Muon(params, lr=0.02)


OPTIMIZERS = {"sgd": sgd, "adam": adam, "adamw": adamw, "muon": muon}


def optimizer_params(model: Net, name: str) -> list[nn.Parameter]:
    # Muon takes 2-D matrices only, so it gets the block matrices and nothing else.
    if name == "muon":
        return [p for params in block_slots(model).values() for p in params if p.ndim == 2]
    return list(model.parameters())


def run_pair(name: str, settings: dict, steps: int = 3) -> tuple[Net, Net, torch.optim.Optimizer]:
    """Train a base and a wrapped copy of one model on the same batches."""
    base_model = make_net()
    smooth_model = copy.deepcopy(base_model)
    base_opt = OPTIMIZERS[name](optimizer_params(base_model, name))
    wrapped = smooth(OPTIMIZERS[name](optimizer_params(smooth_model, name)), smooth_model, **settings)

    for batch in make_batches(steps):
        train_step(base_model, base_opt, batch)
        train_step(smooth_model, wrapped, batch)
    return base_model, smooth_model, wrapped


IDENTITY_SETTINGS = {
    "window1": {"window": 1, "alpha": 0.2},
    "alpha0": {"window": 3, "alpha": 0.0},
    "laplacian-window1": {"operator": "laplacian", "window": 1, "alpha": 0.5},
    "ema-alpha0": {"operator": "ema", "alpha": 0.0},
    "gradient-window1": {"window": 1, "alpha": 0.2, "target": "gradient"},
}


@pytest.mark.parametrize("case", sorted(IDENTITY_SETTINGS))
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_identity_bitwise(name, case):
    base_model, smooth_model, wrapped = run_pair(name, IDENTITY_SETTINGS[case])

    assert isinstance(wrapped, SmoothedOptimizer)
    assert_params_equal(base_model, smooth_model)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_smoothing_changes_blocks(name):
    base_model, smooth_model, wrapped = run_pair(name, {"window": 3, "alpha": 0.5})

    assert wrapped.smoothing_steps == 3
    assert params_differ(base_model.blocks, smooth_model.blocks)


# --- exact formulas with plain SGD ----------------------------------------------------------

FORMULA_SETTINGS = {
    "window3": {"window": 3, "alpha": 0.3},
    "window5-exp": {"window": 5, "alpha": 0.6, "kernel": "exponential", "decay": 0.3},
    "laplacian": {"operator": "laplacian", "window": 3, "alpha": 0.4},
    "ema-backward": {"operator": "ema", "alpha": 0.5, "direction": "backward"},
}


@pytest.mark.parametrize("target", ("update", "gradient"))
@pytest.mark.parametrize("case", sorted(FORMULA_SETTINGS))
def test_sgd_formula(case, target):
    lr = 0.1
    config = SmoothingConfig(target=target, **FORMULA_SETTINGS[case])
    matrix = config_matrix(config)
    model = make_net(dtype=torch.float64)
    plain = copy.deepcopy(model)
    wrapped = smooth(torch.optim.SGD(model.parameters(), lr=lr), model, config)
    plain_opt = torch.optim.SGD(plain.parameters(), lr=lr)
    slots = block_slots(model)

    for step, batch in enumerate(make_batches(3)):
        wrapped.zero_grad()
        backward(model, batch)
        old = clone_slots(slots)
        grads = grad_slots(slots)
        old_outside = {name: p.detach().clone() for name, p in outside_params(model).items()}
        outside_grads = {name: p.grad.detach().clone() for name, p in outside_params(model).items()}

        wrapped.step()

        for name, params in slots.items():
            for i, p in enumerate(params):
                want = old[name][i] - lr * depth_mix(grads[name], matrix, i)
                torch.testing.assert_close(p.detach(), want, rtol=0, atol=1e-13, msg=f"step {step} {name} block {i}")
        for name, p in outside_params(model).items():
            want = old_outside[name] - lr * outside_grads[name]
            torch.testing.assert_close(p.detach(), want, rtol=0, atol=1e-13, msg=f"step {step} {name}")

        if step == 0:
            # On the first step both models start equal, so parameters outside the stack must match
            # a plain SGD step bit for bit.
            train_step(plain, plain_opt, batch)
            for name, p in outside_params(plain).items():
                assert torch.equal(p, outside_params(model)[name]), name
            assert params_differ(plain.blocks, model.blocks)


def test_sgd_formula_vit():
    from timm.models.vision_transformer import VisionTransformer

    lr = 0.05
    torch.manual_seed(0)
    model = VisionTransformer(img_size=8, patch_size=4, in_chans=1, num_classes=3, embed_dim=16, depth=3, num_heads=2)
    model = model.double()
    config = SmoothingConfig(window=3, alpha=0.4)
    matrix = config_matrix(config, depth=3)
    wrapped = smooth(torch.optim.SGD(model.parameters(), lr=lr), model, config)
    slots = block_slots(model)
    images = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 1])

    nn.functional.cross_entropy(model(images), labels).backward()
    old = clone_slots(slots)
    grads = grad_slots(slots)
    wrapped.step()

    assert [plan.path for plan in wrapped.plans] == ["blocks"]
    for name, params in slots.items():
        for i, p in enumerate(params):
            want = old[name][i] - lr * depth_mix(grads[name], matrix, i)
            torch.testing.assert_close(p.detach(), want, rtol=0, atol=1e-13, msg=f"{name} block {i}")


# --- decoupled weight decay -----------------------------------------------------------------


def adamw_updates(model: Net, wrapped: SmoothedOptimizer, batch, lr: float) -> tuple[dict, dict]:
    """Return the AdamW updates without decay, and the old parameters, for one step of ``model``.

    A copy of the model gets an AdamW with the wrapped optimizer's moments and weight decay 0.
    With decoupled decay the moments do not depend on the decay, so its update is the decay-free u.
    """
    reference = copy.deepcopy(model)
    reference_opt = torch.optim.AdamW(reference.parameters(), lr=lr, weight_decay=0.0)
    # load_state_dict keeps the given tensors when dtype and device already match, so without a
    # deep copy the reference step would advance the wrapped optimizer's moments too.
    reference_opt.load_state_dict(copy.deepcopy(wrapped.base.state_dict()))
    for group in reference_opt.param_groups:
        group["weight_decay"] = 0.0

    old = {name: p.detach().clone() for name, p in reference.named_parameters()}
    train_step(reference, reference_opt, batch)
    updates = {name: p.detach() - old[name] for name, p in reference.named_parameters()}
    return updates, old


@pytest.mark.parametrize("decouple", (True, False))
def test_adamw_decay(decouple):
    lr, wd = 0.01, 0.5
    decay = lr * wd
    config = SmoothingConfig(window=3, alpha=0.4, decouple_weight_decay=decouple)
    matrix = config_matrix(config)
    model = make_net(dtype=torch.float64)
    wrapped = smooth(torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd), model, config)
    slots = block_slots(model)

    for step, batch in enumerate(make_batches(3)):
        updates, old = adamw_updates(model, wrapped, batch, lr)
        train_step(model, wrapped, batch)
        gap = 0.0

        for name, params in slots.items():
            u = [updates[f"blocks.{j}.{name}"] for j in range(DEPTH)]
            theta = [old[f"blocks.{j}.{name}"] for j in range(DEPTH)]
            for i, p in enumerate(params):
                decoupled = (1 - decay) * theta[i] + depth_mix(u, matrix, i)
                coupled = theta[i] + depth_mix([u[j] - decay * theta[j] for j in range(DEPTH)], matrix, i)
                want, other = (decoupled, coupled) if decouple else (coupled, decoupled)
                where = f"step {step} {name} block {i}"

                torch.testing.assert_close(p.detach(), want, rtol=0, atol=1e-13, msg=where)
                gap = max(gap, (p.detach() - other).abs().max().item())

        # The two forms differ by decay * (M theta - theta), zero only where all blocks are equal
        # (LayerNorm scales at initialization), so some slot must tell them apart.
        assert gap > 1e-6, f"step {step}"

        for name, p in outside_params(model).items():
            want = (1 - decay) * old[name] + updates[name]
            torch.testing.assert_close(p.detach(), want, rtol=0, atol=1e-13, msg=f"step {step} {name}")


def test_muon_decay_kept_out():
    lr, wd = 0.02, 0.5
    config = SmoothingConfig(window=3, alpha=0.4)
    matrix = config_matrix(config)
    model = make_net(dtype=torch.float64)
    matrices = [p for name, p in model.named_parameters() if name.startswith("blocks.") and p.ndim == 2]
    wrapped = smooth(torch.optim.Muon(matrices, lr=lr, weight_decay=wd), model, config)
    weights = block_slots(model)["linear.weight"]
    batch = make_batches(1)[0]

    # Muon's first update with decay 0, taken on a copy.
    reference = copy.deepcopy(model)
    reference_matrices = [p for name, p in reference.named_parameters() if name.startswith("blocks.") and p.ndim == 2]
    train_step(reference, torch.optim.Muon(reference_matrices, lr=lr, weight_decay=0.0), batch)
    updates = [b.linear.weight.detach() - w.detach() for b, w in zip(reference.blocks, weights)]
    old = [w.detach().clone() for w in weights]

    train_step(model, wrapped, batch)

    assert [plan.path for plan in wrapped.plans] == ["blocks"]
    for i, w in enumerate(weights):
        want = (1 - lr * wd) * old[i] + depth_mix(updates, matrix, i)
        torch.testing.assert_close(w.detach(), want, rtol=0, atol=1e-12, msg=f"block {i}")


# --- normalize and params -------------------------------------------------------------------


@pytest.mark.parametrize("target", ("update", "gradient"))
def test_rescale_keeps_norm(target):
    lr = 0.1
    config = SmoothingConfig(window=3, alpha=0.6, normalize="rescale", target=target)
    matrix = config_matrix(config)
    model = make_net(dtype=torch.float64)
    wrapped = smooth(torch.optim.SGD(model.parameters(), lr=lr), model, config)
    slots = block_slots(model)

    for step, batch in enumerate(make_batches(3)):
        wrapped.zero_grad()
        backward(model, batch)
        old = clone_slots(slots)
        base_updates = {name: [-lr * g for g in grads] for name, grads in grad_slots(slots).items()}

        wrapped.step()

        for name, params in slots.items():
            for i, p in enumerate(params):
                where = f"step {step} {name} block {i}"
                change = p.detach() - old[name][i]
                base_norm = base_updates[name][i].norm()
                mixed = depth_mix(base_updates[name], matrix, i)

                assert change.norm().item() == pytest.approx(base_norm.item(), rel=1e-10), where
                torch.testing.assert_close(change, mixed * (base_norm / mixed.norm()), rtol=0, atol=1e-13, msg=where)
                assert (change - mixed).abs().max().item() > 1e-9, where


def test_matrices_only():
    lr = 0.1
    model = make_net(dtype=torch.float64)
    plain = copy.deepcopy(model)
    wrapped = smooth(torch.optim.SGD(model.parameters(), lr=lr), model, window=3, alpha=0.5, params="matrices")
    batch = make_batches(1)[0]

    train_step(plain, torch.optim.SGD(plain.parameters(), lr=lr), batch)
    train_step(model, wrapped, batch)

    smoothed = block_slots(model)
    base = block_slots(plain)
    for name in ("linear.bias", "norm.weight", "norm.bias"):
        for i in range(DEPTH):
            assert torch.equal(smoothed[name][i], base[name][i]), f"{name} block {i}"
    assert "linear.bias" in wrapped.stacks[0].skipped
    assert "norm.weight" in wrapped.stacks[0].skipped
    assert list(wrapped.stacks[0].slots) == ["linear.weight"]
    for i in range(DEPTH):
        assert not torch.equal(smoothed["linear.weight"][i], base["linear.weight"][i]), f"block {i}"


# --- state_dict -----------------------------------------------------------------------------


def make_wrapped_adamw(seed: int) -> tuple[Net, SmoothedOptimizer]:
    model = make_net(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    return model, smooth(optimizer, model, window=3, alpha=0.3)


def test_state_dict_resume():
    batches = make_batches(6)
    model, wrapped = make_wrapped_adamw(seed=0)
    for batch in batches[:3]:
        train_step(model, wrapped, batch)

    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": wrapped.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    resumed_model, resumed = make_wrapped_adamw(seed=123)
    assert params_differ(model, resumed_model)
    resumed_model.load_state_dict(saved["model"])
    resumed.load_state_dict(saved["optimizer"])

    assert resumed.smoothing_steps == 3
    assert resumed.param_groups is resumed.base.param_groups
    assert resumed.state is resumed.base.state
    for batch in batches[3:]:
        train_step(model, wrapped, batch)
        train_step(resumed_model, resumed, batch)
        assert_params_equal(model, resumed_model)
    assert resumed.smoothing_steps == 6


def test_state_dict_contents():
    model, wrapped = make_wrapped_adamw(seed=0)
    train_step(model, wrapped, make_batches(1)[0])

    state = wrapped.state_dict()

    assert sorted(state) == ["base", "smoothing"]
    assert state["smoothing"]["steps"] == 1
    assert state["smoothing"]["config"]["window"] == 3
    assert state["smoothing"]["config"]["alpha"] == 0.3
    assert len(state["base"]["state"]) == len(list(model.parameters()))


def test_load_bare_base_state():
    model, wrapped = make_wrapped_adamw(seed=0)

    with pytest.raises(ValueError, match="optimizer.base"):
        wrapped.load_state_dict(wrapped.base.state_dict())


# --- schedulers and accelerate --------------------------------------------------------------


def test_lambda_lr():
    model = make_net()
    base = torch.optim.SGD(model.parameters(), lr=0.4)
    wrapped = smooth(base, model, window=3, alpha=0.2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(wrapped, lambda step: 0.5**step)

    for step, batch in enumerate(make_batches(3), start=1):
        train_step(model, wrapped, batch)
        scheduler.step()

        expected = 0.4 * 0.5**step
        assert wrapped.param_groups is base.param_groups
        assert wrapped.param_groups[0]["lr"] == pytest.approx(expected, rel=1e-12)
        assert base.param_groups[0]["lr"] == pytest.approx(expected, rel=1e-12)
    assert wrapped.smoothing_steps == 3


def test_cosine_warmup_drives_step():
    from transformers import get_cosine_schedule_with_warmup

    peak, warmup, total = 0.2, 2, 8
    model = make_net(dtype=torch.float64)
    base = torch.optim.SGD(model.parameters(), lr=peak)
    wrapped = smooth(base, model, window=3, alpha=0.2)
    scheduler = get_cosine_schedule_with_warmup(wrapped, num_warmup_steps=warmup, num_training_steps=total)

    for step, batch in enumerate(make_batches(5)):
        if step < warmup:
            expected = peak * step / warmup
        else:
            expected = peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))
        assert wrapped.param_groups is base.param_groups
        assert wrapped.param_groups[0]["lr"] == pytest.approx(expected, rel=1e-12, abs=1e-15)
        assert base.param_groups[0]["lr"] == pytest.approx(expected, rel=1e-12, abs=1e-15)

        # The head is outside the stack, so its SGD update shows the learning rate actually used.
        wrapped.zero_grad()
        backward(model, batch)
        old = model.head.weight.detach().clone()
        grad = model.head.weight.grad.detach().clone()
        wrapped.step()
        scheduler.step()
        torch.testing.assert_close(model.head.weight.detach(), old - expected * grad, rtol=0, atol=1e-14)


@pytest.fixture
def accelerate_reset():
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def test_accelerate_accumulation(accelerate_reset):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=4)
    model = make_net()
    wrapped = smooth(torch.optim.AdamW(model.parameters(), lr=1e-2), model, window=3, alpha=0.2)
    model, prepared = accelerator.prepare(model, wrapped)
    before = [p.detach().clone() for p in model.parameters()]

    changes = []
    for batch in make_batches(8):
        with accelerator.accumulate(model):
            tokens, labels = batch
            loss = nn.functional.cross_entropy(model(tokens), labels)
            accelerator.backward(loss)
            prepared.step()
            prepared.zero_grad()
        changes.append(any(not torch.equal(p, b) for p, b in zip(model.parameters(), before)))
        before = [p.detach().clone() for p in model.parameters()]

    assert prepared.optimizer is wrapped
    assert wrapped.smoothing_steps == 2
    assert changes == [False, False, False, True, False, False, False, True]
    first = next(iter(model.parameters()))
    assert int(wrapped.base.state[first]["step"]) == 2


# --- bad input ------------------------------------------------------------------------------

BAD_SETTINGS = [
    ({"window": 4}, "smoothing.window", "odd"),
    ({"window": 0}, "smoothing.window", "odd"),
    ({"window": -1}, "smoothing.window", "odd"),
    ({"window": 3.0}, "smoothing.window", "odd"),
    ({"alpha": -0.1}, "smoothing.alpha", "[0, 1]"),
    ({"alpha": 1.5}, "smoothing.alpha", "[0, 1]"),
    ({"operator": "bogus"}, "smoothing.operator", "window, laplacian, ema, none"),
    ({"target": "bogus"}, "smoothing.target", "update, gradient"),
    ({"normalize": "bogus"}, "smoothing.normalize", "none, rescale"),
    ({"params": "bogus"}, "smoothing.params", "all, matrices"),
    ({"kernel": "bogus"}, "smoothing.kernel", "uniform, exponential"),
    ({"direction": "bogus"}, "smoothing.direction", "forward, backward"),
    ({"decay": 0.0}, "smoothing.decay", "(0, 1]"),
    ({"stacks": "blocks"}, "smoothing.stacks", "list"),
]


@pytest.mark.parametrize(("settings", "key", "allowed"), BAD_SETTINGS, ids=[str(case[0]) for case in BAD_SETTINGS])
def test_config_rejects(settings, key, allowed):
    with pytest.raises(ValueError) as info:
        SmoothingConfig(**settings)

    message = str(info.value)
    assert key in message
    assert allowed in message


def test_smooth_keywords_rejected():
    model = make_net()

    with pytest.raises(ValueError, match="smoothing.window"):
        smooth(torch.optim.SGD(model.parameters(), lr=0.1), model, window=4)


def test_smooth_config_and_keywords():
    model = make_net()

    with pytest.raises(ValueError, match="not both"):
        smooth(torch.optim.SGD(model.parameters(), lr=0.1), model, SmoothingConfig(), window=3)


def test_smooth_unknown_stack():
    model = make_net()

    with pytest.raises(ValueError) as info:
        smooth(torch.optim.SGD(model.parameters(), lr=0.1), model, stacks=["nope"])

    assert "'nope'" in str(info.value)
    assert "blocks" in str(info.value)


def test_smooth_no_stack():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))

    with pytest.raises(ValueError) as info:
        smooth(torch.optim.SGD(model.parameters(), lr=0.1), model)

    assert "smoothing=none" in str(info.value)
    assert "Sequential" in str(info.value)


def test_smooth_stack_not_in_optimizer():
    model = make_net()

    with pytest.raises(ValueError, match="smoothing=none"):
        smooth(torch.optim.SGD(model.head.parameters(), lr=0.1), model)


def test_operator_none_returns_base():
    model = make_net()
    base = torch.optim.SGD(model.parameters(), lr=0.1)

    assert smooth(base, model, operator="none") is base
    with pytest.raises(ValueError, match="operator=none"):
        SmoothedOptimizer(base, [], SmoothingConfig(operator="none"))
