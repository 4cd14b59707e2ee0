"""The diffusion runner: objectives, samplers, EMA, held-out loss, Fréchet distances, short runs."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader

from conftest import ROOT, compose, run_config
from gradsmooth.config import validate
from gradsmooth.tasks import build_task
from gradsmooth.tasks.diffusion import task as diffusion_task
from gradsmooth.tasks.diffusion.config import DiffusionTaskConfig
from gradsmooth.tasks.diffusion.frechet import InceptionFID, feature_statistics, frechet_distance
from gradsmooth.tasks.diffusion.objectives import FLOW_TIMESTEP_SCALE, DDPMEpsilon, RectifiedFlow
from gradsmooth.training.errors import ConfigError
from gradsmooth.training.loop import evaluate

TINY = [
    "task=diffusion",
    "trainer.max_steps=2",
    "trainer.eval_every=1",
    "trainer.log_every=1",
    "trainer.progress_bar=false",
    "model.num_layers=3",
    "model.num_attention_heads=2",
    "model.attention_head_dim=8",
    "data.batch_size=16",
    "optim.warmup_steps=0",
    "optim.schedule=constant",
    "task.num_samples=16",
    "task.sample_batch_size=8",
    "task.sample_steps=2",
    "task.grid_size=4",
    "task.classifier_steps=20",
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, single_thread):
    """TINY with a classifier cache shared by the module, so the digit classifier trains once."""
    cache = tmp_path_factory.mktemp("classifier-cache")
    return [*TINY, f"task.cache_dir={cache}"]


# ---- objectives ------------------------------------------------------------------------------


def test_rectified_flow_noising_and_target():
    flow = RectifiedFlow()
    x = torch.tensor([0.5, -1.0, 0.25]).view(3, 1, 1, 1).expand(3, 1, 2, 2).clone()
    noise = torch.tensor([1.0, 2.0, -3.0]).view(3, 1, 1, 1).expand(3, 1, 2, 2).clone()
    t = torch.tensor([0.0, 0.25, 1.0])

    x_t, model_timestep, target = flow.noisy_input_and_target(x, noise, t)

    torch.testing.assert_close(x_t[:, 0, 0, 0], torch.tensor([0.5, 0.25 * 2.0 + 0.75 * -1.0, -3.0]))
    torch.testing.assert_close(target[:, 0, 0, 0], torch.tensor([0.5, 3.0, -3.25]))
    torch.testing.assert_close(model_timestep, t * FLOW_TIMESTEP_SCALE)


def test_rectified_flow_times_are_logit_normal():
    flow = RectifiedFlow(logit_mean=0.5, logit_std=2.0)
    assert flow.timesteps_from_uniform(torch.tensor([0.5])).item() == pytest.approx(1 / (1 + math.exp(-0.5)))

    uniform = (torch.arange(20_000, dtype=torch.float64) + 0.5) / 20_000
    t = flow.timesteps_from_uniform(uniform)
    logits = torch.log(t / (1 - t))
    assert logits.mean().item() == pytest.approx(0.5, abs=1e-3)
    assert logits.std().item() == pytest.approx(2.0, abs=0.02)
    assert bool(((t > 0) & (t < 1)).all())


def test_ddpm_noising_and_target():
    objective = DDPMEpsilon(num_train_timesteps=1000, beta_schedule="linear")
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    alpha_bar = torch.cumprod(1 - betas, dim=0)
    x = torch.full((3, 1, 2, 2), 0.5)
    noise = torch.full((3, 1, 2, 2), -1.0)
    t = objective.timesteps_from_uniform(torch.tensor([0.0, 0.5, 0.9999]))
    assert t.tolist() == [0, 500, 999]

    x_t, model_timestep, target = objective.noisy_input_and_target(x, noise, t)

    expected = alpha_bar[t].sqrt() * 0.5 - (1 - alpha_bar[t]).sqrt()
    torch.testing.assert_close(x_t[:, 0, 0, 0].double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(target, noise)
    assert torch.equal(model_timestep, t)


def _point_mass(centre: float):
    """Exact denoisers for data that is always ``centre``: rectified-flow velocity and DDPM noise."""

    def velocity(x_t, timestep):
        t = (timestep / FLOW_TIMESTEP_SCALE).view(-1, 1, 1, 1)
        return (x_t - centre) / t

    def epsilon(objective):
        alpha_bar = objective.scheduler.alphas_cumprod

        def predict(x_t, timestep):
            a = alpha_bar[timestep].view(-1, 1, 1, 1).to(x_t.dtype)
            return (x_t - a.sqrt() * centre) / (1 - a).sqrt()

        return predict

    return velocity, epsilon


def test_euler_sampler_reaches_point_mass():
    velocity, _ = _point_mass(0.3)
    noise = torch.randn(4, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    samples = RectifiedFlow(sample_steps=5).sample(velocity, noise)
    torch.testing.assert_close(samples, torch.full_like(noise, 0.3), rtol=0, atol=1e-5)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_scheduler_sampler_reaches_point_mass(sampler):
    objective = DDPMEpsilon(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", sampler=sampler, sample_steps=10)
    _, epsilon = _point_mass(0.3)
    noise = torch.randn(4, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    samples = objective.sample(epsilon(objective), noise, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(samples, torch.full_like(noise, 0.3), rtol=0, atol=1e-3)


# ---- Fréchet distances -------------------------------------------------------------------------


def test_frechet_distance_matches_scipy():
    from scipy import linalg

    rng = np.random.default_rng(0)
    a = rng.normal(size=(2000, 6)) @ rng.normal(size=(6, 6))
    b = rng.normal(loc=0.5, size=(1500, 6)) @ rng.normal(size=(6, 6))
    mean_a, cov_a = a.mean(0), np.cov(a, rowvar=False)
    mean_b, cov_b = b.mean(0), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(cov_a @ cov_b).real
    expected = np.sum((mean_a - mean_b) ** 2) + np.trace(cov_a + cov_b - 2 * covmean)

    ours = frechet_distance(*feature_statistics(torch.from_numpy(a)), *feature_statistics(torch.from_numpy(b)))

    assert ours == pytest.approx(expected, rel=1e-8)
    assert frechet_distance(*feature_statistics(torch.from_numpy(a)), *feature_statistics(torch.from_numpy(a))) == pytest.approx(0, abs=1e-8)


class _PixelFeatures(nn.Module):
    """A local stand-in for Inception: four average-pooled pixel values plus their squares."""

    num_features = 8

    def forward(self, images):
        pooled = nn.functional.adaptive_avg_pool2d(images.float().mean(dim=1, keepdim=True), 2).flatten(1)
        return torch.cat([pooled, pooled.square()], dim=1)


def test_torchmetrics_fid_matches_frechet_distance():
    generator = torch.Generator().manual_seed(0)
    real = torch.rand(300, 1, 8, 8, generator=generator) * 2 - 1
    fake = (torch.rand(200, 1, 8, 8, generator=generator) * 1.5 - 1).clamp(-1, 1)
    extractor = _PixelFeatures()

    fid = InceptionFID(feature=extractor, image_shape=(1, 8, 8))
    fid.set_reference(real.split(128), torch.device("cpu"))
    value = fid(fake)

    expected = frechet_distance(
        *feature_statistics(extractor((fake + 1) / 2)), *feature_statistics(extractor((real + 1) / 2))
    )
    assert value == pytest.approx(expected, rel=1e-4)
    assert fid(fake) == pytest.approx(value, rel=1e-6)


# ---- task pieces ---------------------------------------------------------------------------------


def _task_and_model(*overrides):
    config = validate(compose(*overrides))
    set_seed(config.seed)
    task = build_task(config.task, config.model, config.data)
    return task, task.build_model()


def test_digits_scaled_to_symmetric_range(tiny):
    task, _ = _task_and_model(*tiny)
    images = torch.stack([task.train_dataset[i][0] for i in range(len(task.train_dataset))])
    assert images.min().item() == -1.0
    assert images.max().item() == 1.0
    assert images.shape[1:] == (1, 8, 8)

    resized, _ = _task_and_model(*tiny, "data.image_size=16", "model.patch_size=4")
    assert resized.train_dataset[0][0].shape == (1, 16, 16)


def test_held_out_loss_is_deterministic(tiny):
    task, model = _task_and_model(*tiny)
    accelerator = Accelerator(cpu=True)
    model.eval()

    def held_out(batch_size):
        return evaluate(task, model, DataLoader(task.eval_datasets["val"], batch_size=batch_size), "val", accelerator)

    first, second = held_out(64), held_out(64)
    assert first == second
    assert held_out(17)["val/loss"] == pytest.approx(first["val/loss"], rel=1e-5)
    # Random draws elsewhere do not move it.
    torch.rand(1000)
    assert held_out(64) == first


def test_ema_update_and_swap(tiny):
    task, _ = _task_and_model(*tiny, "task.ema_decay=0.5")
    model = nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.fill_(1.0)
        model.bias.fill_(0.0)

    task.after_optimizer_step(model)  # the first update copies the weights
    with torch.no_grad():
        model.weight.fill_(3.0)
    task.after_optimizer_step(model)  # decay min(0.5, (1 + 1) / (10 + 1)) = 2/11
    decay = 2 / 11
    expected = decay * 1.0 + (1 - decay) * 3.0
    with torch.no_grad():
        model.weight.fill_(5.0)
    task.after_optimizer_step(model)  # decay min(0.5, 3/12) = 0.25
    expected = 0.25 * expected + 0.75 * 5.0

    with task.evaluation_weights(model):
        torch.testing.assert_close(model.weight, torch.full((1, 2), expected))
    torch.testing.assert_close(model.weight, torch.full((1, 2), 5.0))
    torch.testing.assert_close(task.extra_weights(model)["ema"]["weight"], torch.full((1, 2), expected))


def test_ema_off_evaluates_raw_weights(tiny):
    task, _ = _task_and_model(*tiny, "task.ema_decay=0")
    model = nn.Linear(2, 1)
    before = model.weight.detach().clone()
    task.after_optimizer_step(model)
    with task.evaluation_weights(model):
        assert torch.equal(model.weight, before)
    assert task.extra_weights(model) == {}


# ---- short runs -------------------------------------------------------------------------------------


def _initial_state(*overrides: str) -> dict[str, torch.Tensor]:
    _, model = _task_and_model(*overrides)
    return {name: p.detach().clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize(
    "extra",
    [
        ["task.objective=rectified_flow"],
        ["task.objective=ddpm"],
        ["task.objective=ddpm", "task.sampler=ddpm", "task.beta_schedule=linear"],
        ["task.class_conditional=true", "task.guidance_scale=2.0", "optim=muon"],
    ],
    ids=lambda extra: ",".join(extra),
)
def test_short_run_changes_every_parameter(extra, tiny, tmp_path):
    overrides = [*tiny, *extra]
    before = _initial_state(*overrides)
    final = run_config(*overrides, run_dir=tmp_path)

    assert {key for key in final if not key.startswith("depth/")} == {"val/loss", "test/loss", "sample/fd"}
    assert "depth/residual_alignment" in final
    assert all(math.isfinite(value) for value in final.values())
    after = load_file(tmp_path / "model.safetensors")
    unchanged = [name for name, value in before.items() if torch.equal(value, after[name])]
    assert unchanged == []
    assert set(load_file(tmp_path / "ema.safetensors")) >= set(before)


def test_run_outputs_grid_and_metrics(tiny, tmp_path):
    from PIL import Image

    run_config(*tiny, run_dir=tmp_path)
    # 4 x 4 tiles of 8x8 images upscaled 8 times, with 2-pixel padding: 4 * (64 + 2) + 2 pixels.
    for step in (1, 2):
        with Image.open(tmp_path / "samples" / f"step_{step:06d}.png") as grid:
            assert grid.size == (266, 266)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows if "sample/fd" in row] == [1, 2]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["metric"] == "sample/fd"


def test_inception_path_with_local_features(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(diffusion_task, "inception_feature", _PixelFeatures)
    final = run_config(*tiny, "task.frechet_features=inception", run_dir=tmp_path)
    assert math.isfinite(final["sample/fid"])
    assert "sample/fd" not in final


# ---- invalid input -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides,expected",
    [
        (["model.patch_size=3"], ["model.patch_size", "divide"]),
        (["task.objective=edm"], ["task.objective", "rectified_flow, ddpm"]),
        (["task.sampler=heun"], ["task.sampler", "euler"]),
        (["task.objective=ddpm", "task.sampler=euler"], ["task.sampler", "ddim, ddpm"]),
        (["task.beta_schedule=cosine"], ["task.beta_schedule", "linear, scaled_linear, squaredcos_cap_v2"]),
        (["task.frechet_features=clip"], ["task.frechet_features", "digits_classifier, inception"]),
        (["task.guidance_scale=3.0"], ["task.guidance_scale", "class_conditional"]),
        (["task.ema_decay=1.0"], ["task.ema_decay", "[0, 1)"]),
        (["data=digits"], ["data.scale", "symmetric"]),
        (["data=hf_images", "data.path=/nonexistent"], ["data.mean", "[0.5, 0.5, 0.5]"]),
    ],
)
def test_invalid_input_fails_before_training(overrides, expected, tiny, tmp_path):
    with pytest.raises(ConfigError) as error:
        run_config(*tiny, *overrides, run_dir=tmp_path)
    for text in expected:
        assert text in str(error.value)
    assert not (tmp_path / "metrics.jsonl").exists()


def test_cli_unknown_objective_exit_code(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *TINY, "task.objective=edm", f"hydra.run.dir={tmp_path / 'run'}"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert result.returncode == 2
    assert "task.objective must be one of rectified_flow, ddpm; got 'edm'" in result.stderr + result.stdout


def test_sampler_defaults_per_objective():
    assert DiffusionTaskConfig().sampler == "euler"
    assert DiffusionTaskConfig(objective="ddpm").sampler == "ddim"


@pytest.mark.slow
def test_default_run_sample_quality(tmp_path):
    """The default job (4,000 steps, about 7 CPU minutes) brings sample/fd from about 36 to below 8."""
    final = run_config("task=diffusion", "trainer.progress_bar=false", run_dir=tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    distances = [row["sample/fd"] for row in rows if "sample/fd" in row]
    assert final["sample/fd"] < 8
    assert distances[-1] < distances[0]
