"""The diffusion task: a diffusers DiT, its objective, EMA, held-out loss and sample quality."""

from __future__ import annotations

import contextlib
import logging
import math
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from gradsmooth.tasks.base import Task, settings_from
from gradsmooth.tasks.diffusion.config import DiffusionTaskConfig, DiTModelConfig
from gradsmooth.tasks.diffusion.frechet import ClassifierFrechet, InceptionFID, load_or_train_classifier
from gradsmooth.tasks.diffusion.objectives import build_objective

log = logging.getLogger("gradsmooth")


def inception_feature():
    """Return the ``feature`` argument of torchmetrics' FID: 2048 Inception-v3 pool features.

    The tests replace this function by one that returns a small local network, because the
    Inception weights cannot be downloaded there.
    """
    return 2048


def load_diffusion_splits(data):
    """Load the image splits named by the data settings and check that they are scaled to [-1, 1]."""
    name = data["name"] if isinstance(data, dict) else data.name
    if name == "digits":
        from gradsmooth.data.images import DigitsConfig, load_digits_splits

        config = settings_from(DigitsConfig, data, "data")
        if config.scale != "symmetric":
            raise ValueError(
                f"task=diffusion needs images in [-1, 1], but data.scale is {config.scale!r}; "
                f"set data.scale=symmetric (data=digits_diffusion does)"
            )
        return config, load_digits_splits(config)
    if name == "hf_images":
        from gradsmooth.data.hf_images import HFImagesConfig, load_hf_image_splits

        config = settings_from(HFImagesConfig, data, "data")
        half = [0.5] * config.channels
        if config.mean is None or config.std is None or list(config.mean) != half or list(config.std) != half:
            raise ValueError(
                f"task=diffusion needs images in [-1, 1], so data.mean and data.std must both be {half}; "
                f"got {config.mean} and {config.std} (data=cifar10_diffusion sets them)"
            )
        return config, load_hf_image_splits(config)
    raise ValueError(f"data.name must be one of digits, hf_images for task=diffusion; got {name!r}")


class FixedNoise(Dataset):
    """A split whose every example carries its own fixed noise and uniform timestep draw.

    Example ``i`` draws from a generator seeded with ``seed`` and ``i`` only, so the held-out
    loss is the same for every evaluation, batch size and number of processes.
    """

    def __init__(self, base: Dataset, seed: int):
        self.base = base
        self.seed = seed

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int):
        image, label = self.base[index]
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        noise = torch.randn(image.shape, generator=generator)
        uniform = torch.rand((), generator=generator)
        return image, label, noise, uniform


class DiffusionTask(Task):
    name = "diffusion"
    metric = "sample/fd"
    metric_mode = "min"

    def __init__(self, task_settings, model_settings, data_settings):
        self.config = settings_from(DiffusionTaskConfig, task_settings, "task")
        self.model_config = settings_from(DiTModelConfig, model_settings, "model")
        data_config, self.splits = load_diffusion_splits(data_settings)

        if self.splits.image_size % self.model_config.patch_size:
            raise ValueError(
                f"model.patch_size ({self.model_config.patch_size}) must divide the image size "
                f"({self.splits.image_size}); pick a patch size that divides it or change data.image_size"
            )

        # Unconditional training feeds label 0 for every image; the DiT always takes labels.
        self.num_labels = self.splits.num_classes if self.config.class_conditional else 1
        self.objective = build_objective(self.config)
        self.train_dataset = self.splits.train
        self.eval_datasets = {
            "val": FixedNoise(self.splits.val, self.config.eval_seed),
            "test": FixedNoise(self.splits.test, self.config.eval_seed + 1),
        }
        self.batch_size = data_config.batch_size
        self.eval_batch_size = data_config.eval_batch_size

        # Build the sample-quality metric now, so that a failed download fails before training.
        # Its reference statistics wait for the first evaluation, which knows the device.
        self.quality = self._build_quality()
        self.metric = self.quality.metric_name
        self._quality_ready = False
        self._ema = None

    # ---- model and training -------------------------------------------------------------

    def build_model(self) -> nn.Module:
        from diffusers import DiTTransformer2DModel
        from diffusers.models.embeddings import LabelEmbedding

        m = self.model_config
        model = DiTTransformer2DModel(
            num_attention_heads=m.num_attention_heads,
            attention_head_dim=m.attention_head_dim,
            in_channels=self.splits.channels,
            out_channels=self.splits.channels,
            num_layers=m.num_layers,
            dropout=m.dropout,
            sample_size=self.splits.image_size,
            patch_size=m.patch_size,
            num_embeds_ada_norm=self.num_labels,
            norm_type="ada_norm_zero",
        )
        # diffusers gives each block's label embedding its own label dropout (probability 0.1,
        # index num_labels as the null class), drawn independently per block. The task drops
        # labels itself, once per image for every block, so the model's own dropout is off.
        for module in model.modules():
            if isinstance(module, LabelEmbedding):
                module.dropout_prob = 0.0
        return model

    def _labels(self, labels: torch.Tensor, training: bool) -> torch.Tensor:
        if not self.config.class_conditional:
            return torch.zeros_like(labels)
        if training and self.config.cfg_dropout > 0:
            drop = torch.rand(labels.shape, device=labels.device) < self.config.cfg_dropout
            labels = torch.where(drop, torch.full_like(labels, self.num_labels), labels)
        return labels

    def _loss(self, model, images, labels, noise, uniform) -> torch.Tensor:
        """Per-example mean squared error of the objective's target."""
        t = self.objective.timesteps_from_uniform(uniform)
        x_t, model_timestep, target = self.objective.noisy_input_and_target(images, noise, t)
        prediction = model(x_t, timestep=model_timestep, class_labels=labels).sample
        return (prediction.float() - target.float()).square().flatten(1).mean(dim=1)

    def training_step(self, model, batch):
        images, labels = batch
        noise = torch.randn_like(images)
        uniform = torch.rand(images.shape[0], device=images.device)
        return self._loss(model, images, self._labels(labels, training=True), noise, uniform).mean()

    def eval_step(self, model, batch):
        images, labels, noise, uniform = batch
        loss = self._loss(model, images, self._labels(labels, training=False), noise, uniform)
        return {"loss": loss, "count": torch.ones_like(loss)}

    def probe_forward(self, model, batch):
        images, labels, noise, uniform = batch
        self._loss(model, images, self._labels(labels, training=False), noise, uniform)

    def eval_metrics(self, totals, split):
        return {f"{split}/loss": totals["loss"] / totals["count"]}

    # ---- EMA ---------------------------------------------------------------------------

    def after_optimizer_step(self, model) -> None:
        if self.config.ema_decay == 0:
            return
        if self._ema is None:
            from diffusers.training_utils import EMAModel

            # The first update copies the weights (diffusers' decay is 0 for it).
            self._ema = EMAModel(model.parameters(), decay=self.config.ema_decay, foreach=True)
        self._ema_to(model)
        self._ema.step(model.parameters())

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Return the EMA's shadow weights and its step count, which sets its decay, for a resume."""
        if self._ema is None:
            return {}
        state = {f"ema.{index}": shadow for index, shadow in enumerate(self._ema.shadow_params)}
        state["ema.optimization_step"] = torch.tensor(self._ema.optimization_step)
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if not state:
            return
        from diffusers.training_utils import EMAModel

        shadows = [state[f"ema.{index}"] for index in range(len(state) - 1)]
        self._ema = EMAModel(shadows, decay=self.config.ema_decay, foreach=True)
        self._ema.optimization_step = int(state["ema.optimization_step"])
        self._ema_on_model_device = False

    def _ema_to(self, model) -> None:
        """Move a restored EMA to the model's device once (checkpoints load on the CPU)."""
        if not getattr(self, "_ema_on_model_device", True):
            self._ema.to(device=next(model.parameters()).device)
            self._ema_on_model_device = True

    @contextlib.contextmanager
    def evaluation_weights(self, model) -> Iterator[None]:
        if self._ema is None:
            yield
            return
        self._ema_to(model)
        parameters = list(model.parameters())
        self._ema.store(parameters)
        self._ema.copy_to(parameters)
        try:
            yield
        finally:
            self._ema.restore(parameters)

    def extra_weights(self, model):
        if self._ema is None:
            return {}
        with self.evaluation_weights(model):
            return {"ema": {key: value.detach().clone() for key, value in model.state_dict().items()}}

    # ---- sampling and sample quality -----------------------------------------------------

    def _build_quality(self):
        shape = (self.splits.channels, self.splits.image_size, self.splits.image_size)
        if self.config.frechet_features == "inception":
            return InceptionFID(feature=inception_feature(), image_shape=shape)
        images, labels = self._materialize(self.splits.train)
        classifier = load_or_train_classifier(
            images, labels, self.splits.num_classes, self.config.classifier_steps, self.config.cache_dir
        )
        return ClassifierFrechet(classifier)

    def _reference_batches(self):
        loader = DataLoader(self.splits.train, batch_size=self.eval_batch_size)
        for images, _ in loader:
            yield images

    def _materialize(self, dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = [], []
        for batch_images, batch_labels in DataLoader(dataset, batch_size=self.eval_batch_size):
            images.append(batch_images)
            labels.append(batch_labels)
        return torch.cat(images), torch.cat(labels)

    @torch.no_grad()
    def generate(self, model, accelerator, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Generate ``count`` images, shared out over the processes and gathered on each of them.

        Process r draws its noise from a generator seeded with ``eval_seed + r``, so the same
        weights on the same processes give the same samples. Image i gets label i mod the number
        of labels.

        NOTE: run only on one CPU process so far; the GPU and multi-process paths are untested.
        """
        c = self.config
        rank, world = accelerator.process_index, accelerator.num_processes
        per_process = math.ceil(count / world)
        device = accelerator.device
        generator = torch.Generator(device=device).manual_seed(c.eval_seed + rank)
        shape = (self.splits.channels, self.splits.image_size, self.splits.image_size)

        samples, labels = [], []
        for start in range(0, per_process, c.sample_batch_size):
            size = min(c.sample_batch_size, per_process - start)
            first = rank * per_process + start
            batch_labels = torch.arange(first, first + size, device=device) % self.num_labels
            noise = torch.randn((size, *shape), generator=generator, device=device)
            predict = self._denoiser(model, batch_labels)
            samples.append(self.objective.sample(predict, noise, generator=generator).clamp(-1, 1))
            labels.append(batch_labels)
        samples = accelerator.gather(torch.cat(samples))[:count]
        labels = accelerator.gather(torch.cat(labels))[:count]
        return samples, labels

    def _denoiser(self, model, labels: torch.Tensor):
        """Return predict(x_t, timestep) for ``labels``, with classifier-free guidance if configured."""
        scale = self.config.guidance_scale

        def predict(x, timestep):
            if not self.config.uses_guidance:
                return model(x, timestep=timestep, class_labels=labels).sample
            null = torch.full_like(labels, self.num_labels)
            both = model(
                torch.cat([x, x]), timestep=torch.cat([timestep, timestep]), class_labels=torch.cat([labels, null])
            ).sample
            conditional, unconditional = both.chunk(2)
            return unconditional + scale * (conditional - unconditional)

        return predict

    def evaluate_model(self, model, step, accelerator, run_dir):
        if not self._quality_ready:
            # The reference pass may augment training images; it must not move the run's RNG,
            # because after a resume it happens at another step than in the uninterrupted run.
            with torch.random.fork_rng(devices=[]):
                self.quality.set_reference(self._reference_batches(), accelerator.device)
            self._quality_ready = True
        samples, _ = self.generate(model, accelerator, self.config.num_samples)
        metrics = {self.quality.metric_name: self.quality(samples)}
        if accelerator.is_main_process and self.config.grid_size:
            path = Path(run_dir) / "samples" / f"step_{step:06d}.png"
            save_sample_grid(samples[: self.config.grid_size**2], self.config.grid_size, path)
        return metrics


def save_sample_grid(samples: torch.Tensor, columns: int, path: Path) -> None:
    """Write images in [-1, 1] as a PNG grid, upscaled (nearest) so each tile is at least 64 pixels wide."""
    from torchvision.utils import make_grid, save_image

    scale = max(1, 64 // samples.shape[-1])
    images = (samples.float().cpu() + 1) / 2
    if scale > 1:
        images = F.interpolate(images, scale_factor=scale, mode="nearest")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(make_grid(images, nrow=columns, padding=2, pad_value=0.5), path)
