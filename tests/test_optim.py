"""Optimizer factory: groups cover every parameter once, Muon holds only block matrices."""

from __future__ import annotations

import io

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from gradsmooth.optim import CombinedOptimizer, OptimConfig, build_optimizer, build_scheduler
from gradsmooth.smoothing import find_stacks


def _vit(depth: int = 3) -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(img_size=8, patch_size=2, in_chans=1, num_classes=10, embed_dim=16, depth=depth, num_heads=2)


def _step(model, optimizer, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(4, 1, 8, 8, generator=generator)
    labels = torch.randint(0, 10, (4,), generator=generator)
    optimizer.zero_grad()
    torch.nn.functional.cross_entropy(model(images), labels).backward()
    optimizer.step()


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw", "muon"])
def test_groups_cover_each_parameter_once(name):
    model = _vit()
    optimizer = build_optimizer(OptimConfig(name=name, weight_decay=0.05), model)
    grouped = [p for group in optimizer.param_groups for p in group["params"]]
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(grouped) == len({id(p) for p in grouped})
    assert {id(p) for p in grouped} == {id(p) for p in trainable}


def test_frozen_parameters_left_out():
    model = _vit()
    model.patch_embed.requires_grad_(False)
    optimizer = build_optimizer(OptimConfig(name="adamw"), model)
    grouped = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert all(id(p) not in grouped for p in model.patch_embed.parameters())


def test_muon_holds_only_block_matrices():
    model = _vit()
    optimizer = build_optimizer(OptimConfig(name="muon"), model)
    assert isinstance(optimizer, CombinedOptimizer)
    muon, adamw = optimizer.optimizers
    assert isinstance(muon, torch.optim.Muon)
    assert isinstance(adamw, torch.optim.AdamW)

    block_matrices = {id(p) for name, p in model.named_parameters() if name.startswith("blocks.") and p.ndim == 2}
    in_muon = {id(p) for group in muon.param_groups for p in group["params"]}
    assert in_muon == block_matrices
    assert all(p.ndim == 2 for group in muon.param_groups for p in group["params"])
    # The patch-embedding convolution, embeddings, head and norms go to AdamW.
    in_adamw = {id(p) for group in adamw.param_groups for p in group["params"]}
    assert id(model.patch_embed.proj.weight) in in_adamw
    assert id(model.head.weight) in in_adamw


def test_muon_settings_explicit():
    config = OptimConfig(name="muon", muon_lr=0.03, muon_momentum=0.9, muon_weight_decay=0.01)
    optimizer = build_optimizer(config, _vit())
    group = optimizer.optimizers[0].param_groups[0]
    assert group["lr"] == 0.03
    assert group["momentum"] == 0.9
    assert group["weight_decay"] == 0.01
    assert group["adjust_lr_fn"] == "original"


def test_muon_without_matrices_fails():
    with pytest.raises(ValueError, match="optim=muon found no 2-D matrix"):
        build_optimizer(OptimConfig(name="muon"), _vit(depth=1))


def test_no_decay_on_1d_tensors():
    optimizer = build_optimizer(OptimConfig(name="adamw", weight_decay=0.1), _vit())
    for group in optimizer.param_groups:
        if group["weight_decay"] > 0:
            assert all(p.ndim >= 2 for p in group["params"])
        else:
            assert all(p.ndim < 2 for p in group["params"])


def test_combined_state_round_trip():
    model = _vit()
    optimizer = build_optimizer(OptimConfig(name="muon", weight_decay=0.05), model)
    for seed in range(2):
        _step(model, optimizer, seed)

    clone = _vit()
    clone.load_state_dict(model.state_dict())
    restored = build_optimizer(OptimConfig(name="muon", weight_decay=0.05), clone)
    # Serialise as a checkpoint does: torch's load_state_dict keeps the very same state tensors
    # when dtype and device already match, so an in-memory copy would share Adam's moments.
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    # After the load each sub-optimizer must use the restored groups and state.
    assert restored.optimizers[0].param_groups[0] is restored.param_groups[0]
    assert restored.optimizers[0].state is restored.state

    for seed in range(2, 5):
        _step(model, optimizer, seed)
        _step(clone, restored, seed)
    for a, b in zip(model.parameters(), clone.parameters()):
        assert torch.equal(a, b)


def test_scheduler_warmup_then_cosine():
    model = _vit()
    optimizer = build_optimizer(OptimConfig(name="adamw", lr=1.0, warmup_steps=10, min_lr_ratio=0.1), model)
    scheduler = build_scheduler(OptimConfig(name="adamw", lr=1.0, warmup_steps=10, min_lr_ratio=0.1), optimizer, 110)
    lrs = []
    for _ in range(110):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == 0.0
    assert lrs[5] == pytest.approx(0.5)
    assert lrs[10] == pytest.approx(1.0)
    assert lrs[60] == pytest.approx(0.1 + 0.9 * 0.5, rel=1e-6)
    assert min(lrs[10:]) >= 0.1 - 1e-9


def test_stack_table_lists_left_out():
    from gradsmooth.smoothing import format_stack_table

    model = _vit()
    table = format_stack_table(model, find_stacks(model))
    assert "blocks" in table
    assert "head" in table
    assert "patch_embed" in table
