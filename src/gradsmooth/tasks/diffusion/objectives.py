"""Training objectives and their samplers: rectified flow and DDPM noise prediction.

Each objective turns clean images ``x`` (in [-1, 1]), Gaussian noise and timesteps into the
model's input, the timestep value passed to the model and the regression target, and generates images
from noise with a denoiser ``predict(x_t, model_timestep) -> prediction``. Timesteps come from
uniform numbers in [0, 1) (:meth:`timesteps_from_uniform`), so training draws them fresh and the
held-out loss reuses one fixed draw.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# diffusers' DiT embeds timesteps sinusoidally with frequencies meant for the DDPM range
# [0, 1000), so rectified-flow times t in [0, 1] are passed as 1000 t.
FLOW_TIMESTEP_SCALE = 1000.0


class RectifiedFlow:
    """Rectified flow: x_t = (1 - t) x + t noise, target velocity noise - x, Euler sampling from t = 1.

    Training times are logit-normal, t = sigmoid(logit_mean + logit_std * n) with n ~ N(0, 1),
    as in Esser et al. 2024 (Stable Diffusion 3).
    """

    def __init__(self, logit_mean: float = 0.0, logit_std: float = 1.0, sample_steps: int = 25):
        self.logit_mean = logit_mean
        self.logit_std = logit_std
        self.sample_steps = sample_steps

    def timesteps_from_uniform(self, uniform: torch.Tensor) -> torch.Tensor:
        """Map uniform numbers in [0, 1) to logit-normal times in (0, 1) through the normal quantile."""
        uniform = uniform.clamp(1e-6, 1 - 1e-6)
        normal = math.sqrt(2.0) * torch.erfinv(2.0 * uniform - 1.0)
        return torch.sigmoid(self.logit_mean + self.logit_std * normal)

    def noisy_input_and_target(self, x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor):
        """Return (x_t, model timestep, target velocity) for images ``x`` at times ``t`` (one per image)."""
        t_image = t.view(-1, *([1] * (x.dim() - 1)))
        x_t = (1.0 - t_image) * x + t_image * noise
        return x_t, t * FLOW_TIMESTEP_SCALE, noise - x

    @torch.no_grad()
    def sample(self, predict: Denoiser, noise: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Integrate dx/dt = v from t = 1 (noise) to t = 0 with ``sample_steps`` uniform Euler steps."""
        times = torch.linspace(1.0, 0.0, self.sample_steps + 1, device=noise.device)
        x = noise
        for t, t_next in zip(times[:-1], times[1:]):
            velocity = predict(x, (t * FLOW_TIMESTEP_SCALE).expand(x.shape[0]))
            x = x + (t_next - t) * velocity
        return x


class DDPMEpsilon:
    """DDPM noise prediction through a diffusers ``DDPMScheduler``; sampling with DDIM or DDPM.

    Training timesteps are uniform integers in [0, num_train_timesteps). Sampling uses a
    scheduler of the ``sampler`` kind built from the training scheduler's config, so both share
    one noise schedule; DDIM runs with eta = 0 (deterministic given the initial noise).
    """

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_schedule: str = "squaredcos_cap_v2",
        sampler: str = "ddim",
        sample_steps: int = 50,
    ):
        from diffusers import DDPMScheduler

        self.scheduler = DDPMScheduler(
            num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule, prediction_type="epsilon"
        )
        self.num_train_timesteps = num_train_timesteps
        self.sampler = sampler
        self.sample_steps = sample_steps

    def timesteps_from_uniform(self, uniform: torch.Tensor) -> torch.Tensor:
        """Map uniform numbers in [0, 1) to integer timesteps in [0, num_train_timesteps)."""
        steps = torch.floor(uniform * self.num_train_timesteps).long()
        return steps.clamp(0, self.num_train_timesteps - 1)

    def noisy_input_and_target(self, x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor):
        """Return (x_t, model timestep, target noise) with the scheduler's forward process."""
        x_t = self.scheduler.add_noise(x, noise, t)
        return x_t, t, noise

    def sampling_scheduler(self):
        from diffusers import DDIMScheduler, DDPMScheduler

        kind = DDIMScheduler if self.sampler == "ddim" else DDPMScheduler
        scheduler = kind.from_config(self.scheduler.config)
        scheduler.set_timesteps(self.sample_steps)
        return scheduler

    @torch.no_grad()
    def sample(self, predict: Denoiser, noise: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Denoise from pure noise over the sampling scheduler's ``sample_steps`` timesteps."""
        scheduler = self.sampling_scheduler()
        x = noise * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            model_timestep = torch.full((x.shape[0],), int(t), device=x.device, dtype=torch.long)
            epsilon = predict(x, model_timestep)
            x = scheduler.step(epsilon, t, x, generator=generator).prev_sample
        return x


def build_objective(config):
    """Build the objective named by ``config.objective`` (a :class:`DiffusionTaskConfig`)."""
    if config.objective == "rectified_flow":
        return RectifiedFlow(config.logit_mean, config.logit_std, config.sample_steps)
    if config.objective == "ddpm":
        return DDPMEpsilon(config.num_train_timesteps, config.beta_schedule, config.sampler, config.sample_steps)
    raise ValueError(f"task.objective must be one of rectified_flow, ddpm; got {config.objective!r}")
