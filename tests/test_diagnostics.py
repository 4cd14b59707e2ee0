"""Depth diagnostics: each measure on inputs with known answers, the hooks on real models, the update probe and a run."""

from __future__ import annotations

import json
import math

import pytest
import timm
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from conftest import compose, run_config
from gradsmooth.analysis import (
    alignment_scores,
    capture_blocks,
    coupling_matrix,
    norm_variation,
    residual_cosine_matrix,
    residuals,
    straightness,
    token_jacobians,
)
from gradsmooth.config import ConfigError, validate
from gradsmooth.smoothing import SmoothingConfig, mixing_matrix, smooth
from gradsmooth.smoothing.diagnostics import UpdateProbe, adjacent_cosine, depth_roughness, probe_stacks, summarize

pytestmark = pytest.mark.usefixtures("single_thread")


def line_states(depth: int = 5, tokens: int = 7, width: int = 4, spacing=None) -> torch.Tensor:
    """Return states moving each token along its own line, by ``spacing[l]`` at block l (equal steps by default)."""
    generator = torch.Generator().manual_seed(0)
    start = torch.randn(tokens, width, generator=generator)
    direction = torch.randn(tokens, width, generator=generator)
    steps = torch.ones(depth) if spacing is None else torch.tensor(spacing, dtype=torch.float32)
    offsets = torch.cat([torch.zeros(1), steps.cumsum(0)])
    return start[None] + offsets[:, None, None] * direction[None]


# --- residual measures ------------------------------------------------------------------------


def test_aligned_residuals_score_one():
    cosine = residual_cosine_matrix(residuals(line_states()))
    assert torch.allclose(cosine, torch.ones(5, 5), atol=1e-6)
    scores = alignment_scores(cosine)
    assert scores["residual_alignment"] == pytest.approx(1.0, abs=1e-6)
    assert scores["adjacent_alignment"] == pytest.approx(1.0, abs=1e-6)


def test_orthogonal_residuals_score_zero():
    # Each block moves every token along its own coordinate axis.
    steps = torch.eye(4)[:, None, :].expand(4, 3, 4)
    states = torch.cat([torch.zeros(1, 3, 4), steps.cumsum(0)])
    cosine = residual_cosine_matrix(residuals(states))
    assert torch.allclose(cosine, torch.eye(4), atol=1e-6)
    assert alignment_scores(cosine)["residual_alignment"] == pytest.approx(0.0, abs=1e-6)


def test_opposite_residuals_score_minus_one():
    states = torch.tensor([[[0.0, 0.0]], [[1.0, 0.0]], [[0.0, 0.0]]])
    assert alignment_scores(residual_cosine_matrix(residuals(states)))["residual_alignment"] == pytest.approx(-1.0)


def test_equal_steps_on_line_straightness_one():
    states = line_states()
    assert straightness(states) == pytest.approx(1.0, abs=1e-6)
    assert norm_variation(residuals(states)) == pytest.approx(0.0, abs=1e-6)


def test_unequal_steps_on_line():
    states = line_states(depth=2, spacing=[1.0, 3.0])
    assert straightness(states) == pytest.approx(1.0, abs=1e-6)
    # Norms 1 and 3 (times each token's direction norm): std 1, mean 2.
    assert norm_variation(residuals(states)) == pytest.approx(0.5, abs=1e-6)


def test_right_angle_path_straightness():
    states = torch.tensor([[[0.0, 0.0]], [[1.0, 0.0]], [[1.0, 1.0]]])
    assert straightness(states) == pytest.approx(1 / math.sqrt(2))


def test_zero_residual_counts_as_zero():
    states = torch.tensor([[[0.0, 0.0]], [[0.0, 0.0]], [[1.0, 0.0]]])
    cosine = residual_cosine_matrix(residuals(states))
    assert cosine[0, 1] == 0
    assert cosine[1, 1] == pytest.approx(1.0)


# --- coupling ---------------------------------------------------------------------------------


def test_identical_jacobians_couple_fully():
    jacobian = torch.randn(6, 6, generator=torch.Generator().manual_seed(1))
    matrix = coupling_matrix(jacobian.expand(3, 6, 6), top_k=2)
    assert torch.allclose(matrix, torch.ones(3, 3), atol=1e-5)


def test_orthogonal_jacobians_do_not_couple():
    first = torch.diag(torch.tensor([2.0, 0.0, 0.0, 0.0]))
    second = torch.diag(torch.tensor([0.0, 3.0, 0.0, 0.0]))
    matrix = coupling_matrix(torch.stack([first, second]), top_k=1)
    assert matrix[0, 0] == pytest.approx(1.0)
    assert matrix[1, 1] == pytest.approx(1.0)
    assert matrix[0, 1] == pytest.approx(0.0, abs=1e-6)
    assert matrix[1, 0] == pytest.approx(0.0, abs=1e-6)


class LinearResidualBlock(nn.Module):
    """``x + x W^T`` applied to each token; the residual branch's Jacobian is W."""

    def __init__(self, width: int):
        super().__init__()
        self.linear = nn.Linear(width, width, bias=False)

    def forward(self, x):
        return x + self.linear(x)


def test_token_jacobians_match_weights():
    torch.manual_seed(0)
    blocks = nn.Sequential(*[LinearResidualBlock(5) for _ in range(3)])
    with capture_blocks(list(blocks), keep_calls=True) as record:
        blocks(torch.randn(2, 4, 5))
    jacobians = token_jacobians(list(blocks), record, token=2)
    for block, jacobian in zip(blocks, jacobians):
        assert torch.allclose(jacobian, block.linear.weight, atol=1e-6)


# --- hooks on real models ---------------------------------------------------------------------


def _vit():
    return timm.models.vision_transformer.VisionTransformer(
        img_size=8, patch_size=2, in_chans=1, num_classes=10, embed_dim=16, depth=3, num_heads=2
    ), torch.randn(2, 1, 8, 8), "blocks"


def _llama():
    config = LlamaConfig(
        vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=32,
    )
    return LlamaForCausalLM(config), torch.randint(0, 50, (2, 9)), "model.layers"


def _gpt2():
    config = GPT2Config(vocab_size=50, n_embd=16, n_layer=3, n_head=2, n_positions=32)
    return GPT2LMHeadModel(config), torch.randint(0, 50, (2, 9)), "transformer.h"


def _output(model, inputs):
    if inputs.dtype == torch.long:
        return model(input_ids=inputs, use_cache=False).logits
    return model(inputs)


@pytest.mark.parametrize("build", [_vit, _llama, _gpt2], ids=["timm_vit", "hf_llama", "hf_gpt2"])
def test_hooks_capture_without_changing_outputs(build):
    torch.manual_seed(0)
    model, inputs, path = build()
    model.eval()
    blocks = list(model.get_submodule(path).children())

    with torch.no_grad():
        plain = _output(model, inputs)
        with capture_blocks(blocks) as record:
            hooked = _output(model, inputs)
        after = _output(model, inputs)

    assert torch.equal(hooked, plain)
    assert torch.equal(after, plain)
    assert len(record.inputs) == len(blocks)
    assert len(record.outputs) == len(blocks)
    for index in range(len(blocks) - 1):
        assert torch.equal(record.outputs[index], record.inputs[index + 1])
    states = record.states()
    assert states.shape[0] == len(blocks) + 1
    assert states.shape[-1] == 16


@pytest.mark.parametrize("build", [_vit, _llama, _gpt2], ids=["timm_vit", "hf_llama", "hf_gpt2"])
def test_jacobians_on_real_blocks(build):
    torch.manual_seed(0)
    model, inputs, path = build()
    model.eval()
    blocks = list(model.get_submodule(path).children())
    with torch.no_grad(), capture_blocks(blocks, keep_calls=True) as record:
        _output(model, inputs[:1])
    jacobians = token_jacobians(blocks, record, token=1)
    assert jacobians.shape == (3, 16, 16)
    assert torch.isfinite(jacobians).all()
    assert all(p.grad is None for p in model.parameters())

    # A finite difference along one input direction agrees with the Jacobian.
    block, (args, kwargs) = blocks[1], record.calls[1]
    hidden = args[0]
    direction = torch.zeros(16)
    direction[3] = 1e-3
    shifted = hidden.clone()
    shifted[0, 1] += direction
    with torch.no_grad():
        base = block(hidden, *args[1:], **kwargs)
        moved = block(shifted, *args[1:], **kwargs)
    base = base[0] if isinstance(base, tuple) else base
    moved = moved[0] if isinstance(moved, tuple) else moved
    finite = (moved[0, 1] - base[0, 1] - direction) / 1e-3
    assert torch.allclose(finite, jacobians[1][:, 3], atol=2e-2)


# --- update measures and the probe ------------------------------------------------------------


def test_update_measures_known_values():
    same = [torch.ones(3, 2)] * 4
    assert adjacent_cosine(same) == pytest.approx(1.0)
    assert depth_roughness(same) == pytest.approx(0.0)

    linear = [torch.full((3,), float(i + 1)) for i in range(4)]
    assert depth_roughness(linear) == pytest.approx(0.0, abs=1e-7)

    alternating = [torch.ones(3) * (-1) ** i for i in range(4)]
    assert adjacent_cosine(alternating) == pytest.approx(-1.0)
    # Second differences are +-4 at 2 interior blocks of 3 entries; the tensors' norm is sqrt(12).
    assert depth_roughness(alternating) == pytest.approx(math.sqrt(2 * 3 * 16) / math.sqrt(12))


class TinyStack(nn.Module):
    def __init__(self, depth: int = 4, width: int = 3):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.head = nn.Linear(width, 1)

    def forward(self, x):
        for block in self.blocks:
            x = x + torch.tanh(block(x))
        return self.head(x).sum()


def _step(model, optimizer, probe=None):
    optimizer.zero_grad()
    model(torch.linspace(-1, 1, 6).view(2, 3)).backward()
    if probe is not None:
        probe.start()
    optimizer.step()
    return probe.finish() if probe is not None else None


def test_probe_baseline_before_equals_after():
    torch.manual_seed(0)
    model = TinyStack()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    probe = UpdateProbe(probe_stacks(model, SmoothingConfig()), optimizer)
    results = _step(model, optimizer, probe)
    assert sorted(results) == [("blocks", "bias"), ("blocks", "weight")]
    for values in results.values():
        assert values["adjacent_cos_before"] == values["adjacent_cos_after"]
        assert values["roughness_before"] == values["roughness_after"]


@pytest.mark.parametrize("target", ["update", "gradient"])
def test_probe_sees_smoothing_mix(target):
    torch.manual_seed(0)
    model = TinyStack()
    config = SmoothingConfig(window=3, alpha=0.5, target=target)
    optimizer = smooth(torch.optim.SGD(model.parameters(), lr=0.1), model, config)
    optimizer.capture_next_step()
    _step(model, optimizer)
    captured = optimizer.take_capture()

    matrix = mixing_matrix(4, "window", 3, 0.5).float()
    weights = [block.weight for block in model.blocks]
    before = torch.stack([captured[id(p)][0] for p in weights])
    after = torch.stack([captured[id(p)][1] for p in weights])
    assert torch.allclose(after, torch.einsum("ij,j...->i...", matrix, before), atol=1e-6)
    assert optimizer.take_capture() is None

    probe = UpdateProbe([], optimizer)
    results = _step(model, optimizer, probe)
    assert results[("blocks", "weight")]["roughness_after"] < results[("blocks", "weight")]["roughness_before"]
    metrics = summarize(results)
    assert set(metrics) == {"smooth/adjacent_cos_before", "smooth/adjacent_cos_after", "smooth/roughness_before", "smooth/roughness_after"}


def test_probe_does_not_change_training():
    states = []
    for probed in (False, True):
        torch.manual_seed(0)
        model = TinyStack()
        optimizer = smooth(torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1), model, window=3)
        probe = UpdateProbe([], optimizer) if probed else None
        for _ in range(3):
            _step(model, optimizer, probe)
        states.append({k: v.clone() for k, v in model.state_dict().items()})
    for name in states[0]:
        assert torch.equal(states[0][name], states[1][name]), name


def test_probe_finish_without_start_raises():
    model = TinyStack()
    probe = UpdateProbe(probe_stacks(model, SmoothingConfig()), torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(RuntimeError, match="without start"):
        probe.finish()


# --- in a run -----------------------------------------------------------------------------------

TINY_VIT = [
    "model.depth=3",
    "model.embed_dim=16",
    "model.num_heads=2",
    "trainer.max_steps=4",
    "trainer.eval_every=2",
    "trainer.log_every=2",
    "trainer.progress_bar=false",
    "trainer.save_model=false",
    "trainer.checkpoint_every=0",
]


def test_run_writes_diagnostics(tmp_path):
    run_config(*TINY_VIT, "diagnostics.update_every=2", run_dir=tmp_path)

    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    keys = {key for row in rows for key in row}
    for name in ("adjacent_cos_before", "adjacent_cos_after", "roughness_before", "roughness_after"):
        assert f"smooth/{name}" in keys
    for name in ("residual_alignment", "adjacent_alignment", "norm_variation", "straightness", "coupling"):
        assert f"depth/{name}" in keys

    depth = [json.loads(line) for line in (tmp_path / "diagnostics" / "depth.jsonl").read_text().splitlines()]
    assert [row["step"] for row in depth] == [2, 4]
    assert len(depth[0]["residual_cosine"]) == 3
    assert len(depth[0]["coupling"]) == 3
    updates = [json.loads(line) for line in (tmp_path / "diagnostics" / "updates.jsonl").read_text().splitlines()]
    assert {row["step"] for row in updates} == {2, 4}
    assert {row["stack"] for row in updates} == {"blocks"}
    assert (tmp_path / "diagnostics" / "depth.png").stat().st_size > 0


def test_run_without_diagnostics(tmp_path):
    run_config(*TINY_VIT, "diagnostics.update_every=0", "diagnostics.representations=false", run_dir=tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert not any(key.startswith(("smooth/", "depth/")) for row in rows for key in row)
    assert not (tmp_path / "diagnostics" / "depth.jsonl").exists()


@pytest.mark.parametrize(
    "override, message",
    [
        ("diagnostics.update_every=-1", "diagnostics.update_every must be >= 0"),
        ("diagnostics.probe_examples=0", "diagnostics.probe_examples must be >= 1"),
    ],
)
def test_invalid_diagnostics_settings(override, message):
    with pytest.raises(ConfigError, match=message):
        validate(compose(override))
