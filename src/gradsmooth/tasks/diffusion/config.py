"""Settings of the diffusion runner: the task (objective, sampler, EMA, evaluation) and the DiT shape."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

OBJECTIVES = ("rectified_flow", "ddpm")
# The samplers each objective supports; the first one is its default.
SAMPLERS = {"rectified_flow": ("euler",), "ddpm": ("ddim", "ddpm")}
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
FRECHET_FEATURES = ("digits_classifier", "inception")


@dataclass
class DiffusionTaskConfig:
    """Diffusion task settings.

    objective: ``rectified_flow`` (x_t = (1 - t) x + t noise, predict the velocity noise - x,
        t logit-normal) or ``ddpm`` (predict the noise of a diffusers ``DDPMScheduler``).
    sampler: ``euler`` for rectified flow; ``ddim`` or ``ddpm`` (diffusers schedulers) for ddpm.
        None picks the objective's default (euler, ddim).
    logit_mean, logit_std: location and scale of the logit-normal distribution of rectified-flow t.
    num_train_timesteps, beta_schedule: the DDPM noise schedule (diffusers ``DDPMScheduler``).
    sample_steps: sampler steps (Euler steps or scheduler inference steps) per generated batch.
    class_conditional: feed the data's class labels; false trains on one class label for every image.
    cfg_dropout: probability of replacing a training label by the null class, which classifier-free
        guidance needs; only used when ``class_conditional``.
    guidance_scale: classifier-free guidance scale at sampling; 1 samples without guidance.
    ema_decay: maximum decay of the exponential moving average of the weights used for evaluation
        (diffusers ``EMAModel``, whose decay warms up as (1 + n) / (10 + n) after n updates);
        0 evaluates the raw weights.
    eval_seed: seed of the fixed noise and timesteps of the held-out loss and of the sampler noise.
    num_samples: images generated per evaluation for the Fréchet distance.
    sample_batch_size: images generated per sampler call.
    grid_size: the PNG grid of samples written at each evaluation is grid_size x grid_size images.
    frechet_features: ``digits_classifier`` (a small CNN trained once on the training split and
        cached, reported as ``sample/fd``) or ``inception`` (torchmetrics FID with Inception-v3
        features, reported as ``sample/fid``). Inception needs a connection that can download
        its weights.
    classifier_steps: training steps of the digit classifier.
    cache_dir: where the trained digit classifier is cached; None uses ``$XDG_CACHE_HOME/gradsmooth``
        (``~/.cache/gradsmooth`` when the variable is unset).
    """

    name: str = "diffusion"
    objective: str = "rectified_flow"
    sampler: Optional[str] = None
    logit_mean: float = 0.0
    logit_std: float = 1.0
    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"
    sample_steps: int = 25
    class_conditional: bool = False
    cfg_dropout: float = 0.1
    guidance_scale: float = 1.0
    ema_decay: float = 0.999
    eval_seed: int = 1234
    num_samples: int = 512
    sample_batch_size: int = 512
    grid_size: int = 8
    frechet_features: str = "digits_classifier"
    classifier_steps: int = 500
    cache_dir: Optional[str] = None

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"task.objective must be one of {', '.join(OBJECTIVES)}; got {self.objective!r}")

        allowed = SAMPLERS[self.objective]
        if self.sampler is None:
            self.sampler = allowed[0]
        if self.sampler not in allowed:
            raise ValueError(
                f"task.sampler must be one of {', '.join(allowed)} for task.objective={self.objective}; got {self.sampler!r}"
            )

        if self.beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"task.beta_schedule must be one of {', '.join(BETA_SCHEDULES)}; got {self.beta_schedule!r}")
        if self.frechet_features not in FRECHET_FEATURES:
            raise ValueError(
                f"task.frechet_features must be one of {', '.join(FRECHET_FEATURES)}; got {self.frechet_features!r}"
            )

        if self.logit_std <= 0:
            raise ValueError(f"task.logit_std must be > 0; got {self.logit_std}")
        for key in ("num_train_timesteps", "sample_steps", "sample_batch_size", "classifier_steps"):
            if getattr(self, key) < 1:
                raise ValueError(f"task.{key} must be >= 1; got {getattr(self, key)}")
        if self.num_samples < 2:
            raise ValueError(f"task.num_samples must be >= 2, because a feature covariance needs two; got {self.num_samples}")
        if self.grid_size < 0:
            raise ValueError(f"task.grid_size must be >= 0 (0 writes no grid); got {self.grid_size}")

        if not 0.0 <= self.cfg_dropout < 1.0:
            raise ValueError(f"task.cfg_dropout must be in [0, 1); got {self.cfg_dropout}")
        if self.guidance_scale < 1.0:
            raise ValueError(f"task.guidance_scale must be >= 1 (1 turns guidance off); got {self.guidance_scale}")
        if self.guidance_scale > 1.0 and not (self.class_conditional and self.cfg_dropout > 0):
            raise ValueError(
                "task.guidance_scale > 1 needs task.class_conditional=true and task.cfg_dropout > 0, "
                "so that the model learns the null class"
            )
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"task.ema_decay must be in [0, 1) (0 turns the EMA off); got {self.ema_decay}")

    @property
    def uses_guidance(self) -> bool:
        return self.guidance_scale > 1.0


@dataclass
class DiTModelConfig:
    """diffusers ``DiTTransformer2DModel`` shape. Image size, channels and classes come from the data.

    patch_size: side of a square patch in pixels; the image size must be a multiple of it.
    num_layers, num_attention_heads, attention_head_dim: blocks, heads per block and width per
        head; the model width is num_attention_heads x attention_head_dim.
    dropout: dropout inside the blocks.
    """

    name: str = "dit_digits"
    patch_size: int = 2
    num_layers: int = 6
    num_attention_heads: int = 4
    attention_head_dim: int = 16
    dropout: float = 0.0

    def __post_init__(self) -> None:
        for key in ("patch_size", "num_layers", "num_attention_heads", "attention_head_dim"):
            if getattr(self, key) < 1:
                raise ValueError(f"model.{key} must be >= 1; got {getattr(self, key)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout must be in [0, 1); got {self.dropout}")
