"""Stack discovery on timm, transformers and diffusers models built from configs, and on small models."""

from __future__ import annotations

import os

# Every model here is built from a config with random weights, so no test needs a model hub.
os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch
from torch import nn

from gradsmooth.smoothing import find_stacks, mixing_matrix, smooth


pytestmark = pytest.mark.usefixtures("single_thread")


def build_vit() -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=16, patch_size=8, num_classes=4, embed_dim=32, depth=3, num_heads=2)


def build_gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(n_layer=3, n_embd=32, n_head=2, vocab_size=100, n_positions=64))


def build_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config)


def build_dit() -> nn.Module:
    from diffusers import DiTTransformer2DModel

    return DiTTransformer2DModel(
        num_layers=2,
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=1,
        out_channels=1,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=10,
        norm_type="ada_norm_zero",
    )


# family: (builder, stack path, depth, fnmatch pattern for the stack, parameters outside the stack)
FAMILIES = {
    "vit": (
        build_vit,
        "blocks",
        3,
        "bl*ks",
        ["cls_token", "pos_embed", "patch_embed.proj.weight", "norm.weight", "head.weight"],
    ),
    "gpt2": (
        build_gpt2,
        "transformer.h",
        3,
        "*.h",
        ["transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight"],
    ),
    "llama": (
        build_llama,
        "model.layers",
        3,
        "*.layers",
        ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"],
    ),
    "dit": (
        build_dit,
        "transformer_blocks",
        2,
        "*_blocks",
        ["pos_embed.proj.weight", "proj_out_1.weight", "proj_out_2.weight"],
    ),
}

_models: dict[str, nn.Module] = {}


def family_model(family: str) -> nn.Module:
    """Build each family's model once per session, from a fixed seed."""
    if family not in _models:
        torch.manual_seed(0)
        _models[family] = FAMILIES[family][0]()
    return _models[family]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_discovery(family):
    _, path, depth, _, _ = FAMILIES[family]
    model = family_model(family)

    stacks = find_stacks(model)

    assert [stack.path for stack in stacks] == [path]
    assert stacks[0].depth == depth
    assert stacks[0].skipped == {}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_slots(family):
    _, path, depth, _, _ = FAMILIES[family]
    model = family_model(family)
    container = model.get_submodule(path)
    block_names = [name for name, _ in container[0].named_parameters()]

    stack = find_stacks(model)[0]

    assert sorted(stack.slots) == sorted(block_names)
    for name, params in stack.slots.items():
        assert len(params) == depth, name
        assert len({tuple(p.shape) for p in params}) == 1, name
        for i, p in enumerate(params):
            assert p is container[i].get_parameter(name), f"{name} block {i}"


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_outside(family):
    _, path, _, _, outside = FAMILIES[family]
    model = family_model(family)
    names = dict(model.named_parameters())
    inside = {id(p) for name, p in names.items() if name.startswith(path + ".")}

    stacks = find_stacks(model)
    smoothed = {id(p) for stack in stacks for params in stack.slots.values() for p in params}

    assert smoothed == inside
    for name in outside:
        assert name in names, f"{name} missing from the model"
        assert id(names[name]) not in smoothed, name


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_override_path(family):
    _, path, depth, _, _ = FAMILIES[family]
    model = family_model(family)

    stacks = find_stacks(model, [path])

    assert [stack.path for stack in stacks] == [path]
    assert stacks[0].depth == depth


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_override_pattern(family):
    _, path, _, pattern, _ = FAMILIES[family]
    model = family_model(family)

    stacks = find_stacks(model, [pattern])

    assert [stack.path for stack in stacks] == [path]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_missing_path(family):
    _, path, _, _, _ = FAMILIES[family]
    model = family_model(family)

    with pytest.raises(ValueError) as info:
        find_stacks(model, ["nope.layers"])

    message = str(info.value)
    assert "'nope.layers'" in message
    assert "matches no module" in message
    assert path in message


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_matrices_only(family):
    model = family_model(family)

    stack = find_stacks(model, matrices_only=True)[0]

    assert stack.slots
    assert all(params[0].ndim == 2 for params in stack.slots.values())
    assert stack.skipped
    assert all("params=matrices" in reason for reason in stack.skipped.values())


def test_gpt2_not_container():
    model = family_model("gpt2")

    with pytest.raises(ValueError) as info:
        find_stacks(model, ["transformer.wte"])

    assert "not containers" in str(info.value)
    assert "transformer.h" in str(info.value)


# --- small models ---------------------------------------------------------------------------


class Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.linear = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)

    def forward(self, x):
        return x + torch.tanh(self.linear(self.norm(x)))


class EncoderDecoder(nn.Module):
    """Three encoder blocks of width 8, then two decoder blocks of width 16."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.ModuleList([Block(8) for _ in range(3)])
        self.bridge = nn.Linear(8, 16)
        self.decoder = nn.ModuleList([Block(16) for _ in range(2)])
        self.head = nn.Linear(16, 2)

    def forward(self, x):
        for block in self.encoder:
            x = block(x)
        x = self.bridge(x)
        for block in self.decoder:
            x = block(x)
        return self.head(x)


def test_two_stacks():
    model = EncoderDecoder()

    stacks = find_stacks(model)

    assert [(stack.path, stack.depth) for stack in stacks] == [("encoder", 3), ("decoder", 2)]
    assert tuple(stacks[0].slots["linear.weight"][0].shape) == (8, 8)
    assert tuple(stacks[1].slots["linear.weight"][0].shape) == (16, 16)


def test_two_stacks_smoothed_apart():
    torch.manual_seed(0)
    model = EncoderDecoder().double()
    lr, alpha = 0.1, 0.4
    wrapped = smooth(torch.optim.SGD(model.parameters(), lr=lr), model, window=3, alpha=alpha)

    model(torch.randn(5, 8, dtype=torch.float64)).square().mean().backward()
    before = {name: (p.detach().clone(), p.grad.detach().clone()) for name, p in model.named_parameters()}
    wrapped.step()

    assert [plan.path for plan in wrapped.plans] == ["encoder", "decoder"]
    for path, depth in (("encoder", 3), ("decoder", 2)):
        matrix = mixing_matrix(depth, window=3, alpha=alpha)
        container = model.get_submodule(path)
        for i in range(depth):
            old = before[f"{path}.{i}.linear.weight"][0]
            mixed = sum(matrix[i, j].item() * before[f"{path}.{j}.linear.weight"][1] for j in range(depth))
            want = old - lr * mixed
            torch.testing.assert_close(container[i].linear.weight.detach(), want, rtol=0, atol=1e-13)


class Outer(nn.Module):
    """Blocks that each contain a list of two identical linears."""

    def __init__(self):
        super().__init__()
        self.inner = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])


def test_nested_outermost():
    model = nn.Module()
    model.blocks = nn.ModuleList([Outer() for _ in range(3)])

    assert [stack.path for stack in find_stacks(model)] == ["blocks"]
    assert [stack.path for stack in find_stacks(model, ["blocks.*.inner"])] == [
        "blocks.0.inner",
        "blocks.1.inner",
        "blocks.2.inner",
    ]


@pytest.mark.parametrize(
    ("blocks", "reason"),
    [
        ([nn.Linear(8, 8), nn.Linear(8, 16)], "different shapes"),
        ([nn.Linear(8, 8), nn.Conv1d(8, 8, 1)], "different classes"),
        ([nn.Linear(8, 8)], "one block"),
        ([nn.ReLU(), nn.ReLU()], "no parameters"),
    ],
    ids=["shapes", "classes", "single", "parameterless"],
)
def test_not_a_stack(blocks, reason):
    model = nn.Module()
    model.blocks = nn.ModuleList(blocks)

    assert find_stacks(model) == [], reason


def test_frozen_and_shared_slots():
    model = nn.Module()
    model.blocks = nn.ModuleList([Block(8) for _ in range(3)])
    for block in model.blocks:
        block.norm.bias.requires_grad_(False)
    shared = model.blocks[0].norm.weight
    for block in model.blocks[1:]:
        block.norm.weight = shared

    stack = find_stacks(model)[0]

    assert sorted(stack.slots) == ["linear.bias", "linear.weight"]
    assert stack.skipped == {"norm.bias": "frozen", "norm.weight": "shared across blocks"}


def test_root_sequential_is_a_stack():
    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(3)])
    stacks = find_stacks(model)
    assert [stack.path for stack in stacks] == [""]
    assert stacks[0].depth == 3
    assert set(stacks[0].slots) == {"weight", "bias"}
