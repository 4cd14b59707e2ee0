"""Image-classification data: scikit-learn's handwritten digits (embedded) and the shared types.

Every loader returns an :class:`ImageSplits`: train, validation and test ``torch`` datasets of
``(image, label)`` pairs, images as float tensors of shape (channels, size, size), normalised with
the training split's mean and standard deviation (or, for diffusion, scaled to [-1, 1]).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset


@dataclass
class ImageSplits:
    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int
    channels: int
    image_size: int


DIGITS_SCALES = ("standardize", "symmetric")


@dataclass
class DigitsConfig:
    """scikit-learn's 1,797 8x8 handwritten digits, split once with a fixed stratified seed.

    val_fraction, test_fraction: shares of the 1,797 images held out (stratified by class).
    split_seed: seed of the split; fixed apart from the run seed so every run sees the same split.
    augment: shift training images by up to ``max_shift`` pixels (zero padding).
    scale: ``standardize`` (subtract the training split's mean, divide by its standard deviation)
        or ``symmetric`` (map the pixel range [0, 16] linearly onto [-1, 1], as diffusion expects).
    image_size: side in pixels; any value other than 8 resizes the images bilinearly.
    batch_size, eval_batch_size: examples per batch for training and for evaluation.
    """

    name: str = "digits"
    val_fraction: float = 0.15
    test_fraction: float = 0.2
    split_seed: int = 0
    augment: bool = True
    max_shift: int = 1
    scale: str = "standardize"
    image_size: int = 8
    batch_size: int = 64
    eval_batch_size: int = 512

    def __post_init__(self) -> None:
        if not (0 < self.val_fraction < 1 and 0 < self.test_fraction < 1 and self.val_fraction + self.test_fraction < 1):
            raise ValueError(
                f"data.val_fraction and data.test_fraction must be in (0, 1) with a sum below 1; "
                f"got {self.val_fraction} and {self.test_fraction}"
            )
        if self.max_shift < 0:
            raise ValueError(f"data.max_shift must be >= 0; got {self.max_shift}")
        if self.scale not in DIGITS_SCALES:
            raise ValueError(f"data.scale must be one of {', '.join(DIGITS_SCALES)}; got {self.scale!r}")
        if self.image_size < 1:
            raise ValueError(f"data.image_size must be an integer >= 1; got {self.image_size}")
        check_batch_sizes(self.batch_size, self.eval_batch_size)


def check_batch_sizes(batch_size: int, eval_batch_size: int) -> None:
    if batch_size < 1 or eval_batch_size < 1:
        raise ValueError(f"data.batch_size and data.eval_batch_size must be >= 1; got {batch_size} and {eval_batch_size}")


class TensorImages(Dataset):
    """Images held in one tensor, with optional random shifts for training."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, max_shift: int = 0):
        self.images = images
        self.labels = labels
        self.max_shift = max_shift

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        image = self.images[index]
        if self.max_shift:
            image = random_shift(image, self.max_shift)
        return image, self.labels[index]


def random_shift(image: torch.Tensor, max_shift: int) -> torch.Tensor:
    """Translate ``image`` (C, H, W) by up to ``max_shift`` pixels in each direction, padding with zeros."""
    dy, dx = torch.randint(-max_shift, max_shift + 1, (2,)).tolist()
    padded = torch.nn.functional.pad(image, (max_shift, max_shift, max_shift, max_shift))
    height, width = image.shape[-2:]
    top, left = max_shift + dy, max_shift + dx
    return padded[:, top : top + height, left : left + width]


def load_digits_splits(config: DigitsConfig) -> ImageSplits:
    """Load the digits, split them stratified by class, scale them and resize them if asked."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = digits.images.astype(np.float32) / 16.0
    labels = digits.target.astype(np.int64)
    indices = np.arange(len(labels))

    held_out = config.val_fraction + config.test_fraction
    train_idx, rest_idx = train_test_split(indices, test_size=held_out, stratify=labels, random_state=config.split_seed)
    val_idx, test_idx = train_test_split(
        rest_idx,
        test_size=config.test_fraction / held_out,
        stratify=labels[rest_idx],
        random_state=config.split_seed,
    )

    if config.scale == "symmetric":
        tensor = torch.from_numpy(images * 2.0 - 1.0).unsqueeze(1)
    else:
        mean, std = images[train_idx].mean(), images[train_idx].std()
        tensor = torch.from_numpy((images - mean) / std).unsqueeze(1)
    if config.image_size != tensor.shape[-1]:
        size = (config.image_size, config.image_size)
        tensor = torch.nn.functional.interpolate(tensor, size=size, mode="bilinear", antialias=True, align_corners=False)
    target = torch.from_numpy(labels)

    def subset(idx, shift):
        return TensorImages(tensor[idx], target[idx], max_shift=shift)

    shift = config.max_shift if config.augment else 0
    return ImageSplits(
        train=subset(train_idx, shift),
        val=subset(val_idx, 0),
        test=subset(test_idx, 0),
        num_classes=10,
        channels=1,
        image_size=config.image_size,
    )
