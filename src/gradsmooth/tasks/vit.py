"""Image classification with a timm Vision Transformer.

The embedded default trains a 6-block ViT on scikit-learn's 8x8 handwritten digits (2x2 patches)
on a CPU in about a minute; ``data=cifar10 model=vit_cifar`` trains a DeiT-Tiny-shaped ViT on
CIFAR-10 through the same code. Reports ``test/acc`` and ``test/loss``.

Deviations from the paper (Meng, Sugolov and Papyan, arXiv 2606.30813):

1. The default data set is 8x8 digits, not CIFAR-10 or ImageNet, so that it runs on a laptop CPU
   without downloads; absolute accuracies are not comparable to the paper's.
2. Augmentation is random shifts of up to one pixel (digits) or crop and flip (hub images),
   not the DeiT recipe's RandAugment, Mixup and CutMix.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from gradsmooth.data.images import DigitsConfig, load_digits_splits
from gradsmooth.tasks.base import Task, settings_from


@dataclass
class VitTaskConfig:
    """ViT task settings. label_smoothing: cross-entropy label smoothing in [0, 1)."""

    name: str = "vit"
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"task.label_smoothing must be in [0, 1); got {self.label_smoothing}")


@dataclass
class ViTModelConfig:
    """timm ``VisionTransformer`` shape. Image size, channels and classes come from the data.

    patch_size: side of a square patch in pixels; the image size must be a multiple of it.
    embed_dim, depth, num_heads, mlp_ratio: width, number of blocks, attention heads, MLP width
        as a multiple of ``embed_dim``.
    drop_rate, attn_drop_rate, drop_path_rate: dropout, attention dropout, stochastic depth.
    """

    name: str = "vit_digits"
    patch_size: int = 2
    embed_dim: int = 64
    depth: int = 6
    num_heads: int = 4
    mlp_ratio: float = 2.0
    qkv_bias: bool = True
    class_token: bool = True
    global_pool: str = "token"
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0

    def __post_init__(self) -> None:
        for key in ("patch_size", "embed_dim", "depth", "num_heads"):
            if getattr(self, key) < 1:
                raise ValueError(f"model.{key} must be >= 1; got {getattr(self, key)}")
        if self.embed_dim % self.num_heads:
            raise ValueError(
                f"model.embed_dim ({self.embed_dim}) must be divisible by model.num_heads ({self.num_heads})"
            )
        if self.global_pool not in ("token", "avg"):
            raise ValueError(f"model.global_pool must be one of token, avg; got {self.global_pool!r}")
        if self.global_pool == "token" and not self.class_token:
            raise ValueError("model.global_pool=token needs model.class_token=true; use global_pool=avg without it")


def load_image_splits(data):
    """Load the image splits named by the data settings (embedded digits or a hub data set)."""
    name = data["name"] if isinstance(data, dict) else data.name
    if name == "digits":
        config = settings_from(DigitsConfig, data, "data")
        return config, load_digits_splits(config)
    if name == "hf_images":
        from gradsmooth.data.hf_images import HFImagesConfig, load_hf_image_splits

        config = settings_from(HFImagesConfig, data, "data")
        return config, load_hf_image_splits(config)
    raise ValueError(f"data.name must be one of digits, hf_images for task=vit; got {name!r}")


class VitTask(Task):
    name = "vit"
    metric = "test/acc"
    metric_mode = "max"

    def __init__(self, task_settings, model_settings, data_settings):
        self.config = settings_from(VitTaskConfig, task_settings, "task")
        self.model_config = settings_from(ViTModelConfig, model_settings, "model")
        data_config, self.splits = load_image_splits(data_settings)

        if self.splits.image_size % self.model_config.patch_size:
            raise ValueError(
                f"model.patch_size ({self.model_config.patch_size}) must divide the image size "
                f"({self.splits.image_size}); pick a patch size that divides it"
            )

        self.train_dataset = self.splits.train
        self.eval_datasets = {"val": self.splits.val, "test": self.splits.test}
        self.batch_size = data_config.batch_size
        self.eval_batch_size = data_config.eval_batch_size

    def build_model(self) -> nn.Module:
        from timm.models.vision_transformer import VisionTransformer

        m = self.model_config
        return VisionTransformer(
            img_size=self.splits.image_size,
            patch_size=m.patch_size,
            in_chans=self.splits.channels,
            num_classes=self.splits.num_classes,
            embed_dim=m.embed_dim,
            depth=m.depth,
            num_heads=m.num_heads,
            mlp_ratio=m.mlp_ratio,
            qkv_bias=m.qkv_bias,
            class_token=m.class_token,
            global_pool=m.global_pool,
            drop_rate=m.drop_rate,
            attn_drop_rate=m.attn_drop_rate,
            drop_path_rate=m.drop_path_rate,
        )

    def training_step(self, model, batch):
        images, labels = batch
        logits = model(images)
        return F.cross_entropy(logits, labels, label_smoothing=self.config.label_smoothing)

    def eval_step(self, model, batch):
        images, labels = batch
        logits = model(images)
        return {
            "loss": F.cross_entropy(logits, labels, reduction="none"),
            "correct": (logits.argmax(dim=-1) == labels).float(),
            "count": torch.ones_like(labels, dtype=torch.float32),
        }

    def probe_forward(self, model, batch):
        images, _ = batch
        model(images)

    def eval_metrics(self, totals, split):
        count = totals["count"]
        return {f"{split}/loss": totals["loss"] / count, f"{split}/acc": totals["correct"] / count}
