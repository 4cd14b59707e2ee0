"""Image-classification data from the Hugging Face hub or from local files, through ``datasets``.

:func:`load_hf_image_splits` reads any dataset that ``datasets.load_dataset`` can open (a hub id
such as ``uoft-cs/cifar10``, a parquet file, an image folder) and returns the same
:class:`~gradsmooth.data.images.ImageSplits` as the embedded digits loader: float tensors of shape
(channels, image_size, image_size) normalised per channel, and integer labels.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from gradsmooth.data.images import ImageSplits, check_batch_sizes

logger = logging.getLogger(__name__)

ALLOWED_CHANNELS = (1, 3)
PIL_MODES = {1: "L", 3: "RGB"}
MAX_STATS_IMAGES = 10_000


@dataclass
class HFImagesConfig:
    """An image-classification dataset read with ``datasets.load_dataset``.

    name: name of this data config.
    path: first argument of ``datasets.load_dataset``: a hub id (``uoft-cs/cifar10``), a builder
        name used with ``data_files`` or ``data_dir`` (``parquet``, ``imagefolder``), or a local
        directory.
    data_dir: directory passed to ``load_dataset`` as ``data_dir``, for example the root of an
        image folder with one subdirectory per split and one per class below it.
    data_files: mapping from split name to a file or glob, passed to ``load_dataset``.
    image_column, label_column: columns holding the images and the integer or ``ClassLabel``
        labels. Image folders use ``image`` and ``label``.
    train_split, test_split: split names used for training and for the test set.
    val_split: split used for validation. None carves ``val_fraction`` of the training split out,
        stratified by class, with ``split_seed``.
    val_fraction: share of the training split held out for validation when ``val_split`` is None,
        in (0, 1).
    split_seed: seed of the validation carve, of the ``max_train_examples`` subset and of the
        image sample for the normalisation statistics. It is separate from the run seed, so every
        run uses the same split.
    image_size: side in pixels of the square images returned; every image is resized to it.
    channels: 1 (images converted to PIL mode ``L``) or 3 (mode ``RGB``).
    augment: apply RandomCrop(image_size, padding=image_size // 8) if ``crop`` and a random
        horizontal flip if ``hflip`` to training images. Validation and test images are never
        augmented.
    crop: include the padded random crop when ``augment`` is on.
    hflip: include the random horizontal flip when ``augment`` is on.
    mean, std: per-channel normalisation of images scaled to [0, 1]. None computes the value
        from up to 10,000 images of the training split.
    batch_size, eval_batch_size: examples per batch for training and for evaluation.
    cache_dir: cache directory passed to ``load_dataset``; None uses the ``datasets`` default.
    max_train_examples: keep at most this many training examples (a seeded random subset), for
        quick runs. The validation carve happens first, so it does not change the validation set.
    """

    name: str = "hf_images"
    path: str = "uoft-cs/cifar10"
    data_dir: Optional[str] = None
    data_files: Optional[Dict[str, str]] = None
    image_column: str = "img"
    label_column: str = "label"
    train_split: str = "train"
    val_split: Optional[str] = None
    test_split: str = "test"
    val_fraction: float = 0.1
    split_seed: int = 0
    image_size: int = 32
    channels: int = 3
    augment: bool = True
    crop: bool = True
    hflip: bool = True
    mean: Optional[List[float]] = None
    std: Optional[List[float]] = None
    batch_size: int = 128
    eval_batch_size: int = 512
    cache_dir: Optional[str] = None
    max_train_examples: Optional[int] = None

    def __post_init__(self) -> None:
        for key in ("path", "image_column", "label_column", "train_split", "test_split"):
            value = getattr(self, key)
            if not value:
                raise ValueError(f"data.{key} must be a non-empty string; got {value!r}")

        for key in ("data_dir", "cache_dir", "val_split"):
            value = getattr(self, key)
            if value is not None and not value:
                raise ValueError(f"data.{key} must be null or a non-empty string; got {value!r}")

        if self.data_files is not None and len(self.data_files) == 0:
            raise ValueError("data.data_files must be null or a non-empty mapping from split name to file or glob; got {}")
        if self.image_column == self.label_column:
            raise ValueError(
                f"data.image_column and data.label_column must name different columns; both are {self.image_column!r}"
            )
        if self.train_split == self.test_split:
            raise ValueError(
                f"data.train_split and data.test_split must name different splits; both are {self.train_split!r}"
            )
        if self.val_split == self.train_split:
            raise ValueError(
                f"data.val_split must differ from data.train_split ({self.train_split!r}); "
                f"set data.val_split=null to carve data.val_fraction of the training split instead"
            )

        if not 0 < self.val_fraction < 1:
            raise ValueError(f"data.val_fraction must be in (0, 1); got {self.val_fraction}")
        if self.split_seed < 0:
            raise ValueError(f"data.split_seed must be >= 0; got {self.split_seed}")
        if self.image_size < 1:
            raise ValueError(f"data.image_size must be an integer >= 1; got {self.image_size}")
        if self.channels not in ALLOWED_CHANNELS:
            raise ValueError(f"data.channels must be one of {list(ALLOWED_CHANNELS)}; got {self.channels}")

        for key in ("mean", "std"):
            values = getattr(self, key)
            if values is not None and len(values) != self.channels:
                raise ValueError(
                    f"data.{key} must be null or a list of {self.channels} floats, one per channel "
                    f"(data.channels={self.channels}); got {list(values)}"
                )
        if self.std is not None and any(value <= 0 for value in self.std):
            raise ValueError(f"data.std must contain only values > 0; got {list(self.std)}")

        if self.max_train_examples is not None and self.max_train_examples < 1:
            raise ValueError(f"data.max_train_examples must be null or an integer >= 1; got {self.max_train_examples}")
        check_batch_sizes(self.batch_size, self.eval_batch_size)


class HFImageDataset(Dataset):
    """A split of a ``datasets.Dataset`` as ``(image tensor, int label)`` pairs.

    Each image is converted to ``mode`` ("L" or "RGB") and then passed through ``transform``.
    """

    def __init__(self, dataset, image_column: str, label_column: str, mode: str, transform: Callable):
        self.dataset = dataset
        self.image_column = image_column
        self.label_column = label_column
        self.mode = mode
        self.transform = transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        row = self.dataset[index]
        image = row[self.image_column]
        # NOTE: Pillow 13 convert clips 16-bit grayscale ("I;16") values above 255 instead of rescaling them.
        if image.mode != self.mode:
            image = image.convert(self.mode)
        return self.transform(image), int(row[self.label_column])


def load_hf_image_splits(config: HFImagesConfig) -> ImageSplits:
    """Load the splits named in ``config``, carve validation if needed, and build normalised datasets."""
    splits = _load_splits(config)
    train = _prepare_split(config, splits["train_split"], config.train_split)
    test = _prepare_split(config, splits["test_split"], config.test_split)
    train_labels = _read_labels(config, train, config.train_split)
    test_labels = _read_labels(config, test, config.test_split)

    if config.val_split is None:
        train_idx, val_idx = stratified_split(train_labels, config.val_fraction, config.split_seed)
        if len(val_idx) == 0 or len(train_idx) == 0:
            raise ValueError(
                f"data.val_fraction={config.val_fraction} of the {len(train_labels)} examples in split "
                f"{config.train_split!r} leaves an empty training or validation set; "
                f"change data.val_fraction or set data.val_split"
            )
        val = train.select(val_idx)
        val_labels = train_labels[val_idx]
        train = train.select(train_idx)
        train_labels = train_labels[train_idx]
    else:
        val = _prepare_split(config, splits["val_split"], config.val_split)
        val_labels = _read_labels(config, val, config.val_split)

    if config.max_train_examples is not None and len(train) > config.max_train_examples:
        rng = np.random.default_rng(config.split_seed)
        keep = np.sort(rng.permutation(len(train))[: config.max_train_examples])
        train = train.select(keep)
        train_labels = train_labels[keep]

    num_classes = _count_classes(config, train.features[config.label_column], [train_labels, val_labels, test_labels])
    mode = PIL_MODES[config.channels]
    mean, std = _normalisation(config, train, mode)

    def wrap(split, augment: bool) -> HFImageDataset:
        transform = build_transform(config.image_size, mean, std, augment=augment, crop=config.crop, hflip=config.hflip)
        return HFImageDataset(split, config.image_column, config.label_column, mode, transform)

    return ImageSplits(
        train=wrap(train, config.augment),
        val=wrap(val, False),
        test=wrap(test, False),
        num_classes=num_classes,
        channels=config.channels,
        image_size=config.image_size,
    )


def build_transform(image_size: int, mean, std, *, augment: bool, crop: bool = True, hflip: bool = True):
    """Build the torchvision v2 pipeline: resize, optional crop and flip, scale to [0, 1], normalise.

    ``mean`` and ``std`` None leave out the normalisation, which the statistics pass relies on.
    """
    from torchvision.transforms import v2

    steps = [v2.ToImage(), v2.Resize((image_size, image_size), antialias=True)]
    if augment and crop:
        steps.append(v2.RandomCrop(image_size, padding=image_size // 8))
    if augment and hflip:
        steps.append(v2.RandomHorizontalFlip())
    steps.append(v2.ToDtype(torch.float32, scale=True))
    if mean is not None:
        steps.append(v2.Normalize(list(mean), list(std)))
    return v2.Compose(steps)


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split indices of ``labels`` into (keep, held_out) with ``fraction`` of each class held out.

    Each class contributes round(fraction * class size) examples to ``held_out``. Both index
    arrays come back sorted, and the same labels, fraction and seed always give the same split.
    """
    rng = np.random.default_rng(seed)
    held_out = []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        held_out.append(members[: int(round(fraction * len(members)))])
    held_out_idx = np.sort(np.concatenate(held_out)) if held_out else np.array([], dtype=np.int64)
    keep_idx = np.setdiff1d(np.arange(len(labels)), held_out_idx)
    return keep_idx, held_out_idx


def _load_splits(config: HFImagesConfig) -> Dict[str, object]:
    """Prepare the dataset with a ``datasets`` builder and return the requested splits by config key.

    These are the steps of ``datasets.load_dataset``, run one by one. In datasets 5.2.0,
    ``load_dataset`` raises ``Instruction "<split>" corresponds to no data!`` when any split is
    empty, even an unused one, so each requested split is checked before it is opened.
    """
    from datasets import load_dataset_builder

    kwargs = {}
    if config.data_dir is not None:
        kwargs["data_dir"] = config.data_dir
    if config.data_files is not None:
        kwargs["data_files"] = dict(config.data_files)
    if config.cache_dir is not None:
        kwargs["cache_dir"] = config.cache_dir
    try:
        builder = load_dataset_builder(config.path, **kwargs)
        builder.download_and_prepare()
    except (ConnectionError, OSError) as error:
        # The hub is unreachable (offline machine) or a local path is missing.
        raise ValueError(
            f"data.path={config.path!r} could not be loaded: {type(error).__name__}: {str(error).rstrip('.')}. "
            "Point data.path at a local directory of parquet files or an image folder, or download "
            "the data set where the hub is reachable"
        ) from error

    available = builder.info.splits
    requested = {"train_split": config.train_split, "test_split": config.test_split}
    if config.val_split is not None:
        requested["val_split"] = config.val_split
    for key, split in requested.items():
        if split not in available:
            raise ValueError(
                f"data.{key}={split!r}: split not found in dataset {config.path!r}; available splits: {list(available)}"
            )
        if available[split].num_examples == 0:
            raise ValueError(f"split {split!r} of dataset {config.path!r} is empty")
    return {key: builder.as_dataset(split=split) for key, split in requested.items()}


def _prepare_split(config: HFImagesConfig, split, split_name: str):
    """Keep only the image and label columns, decode images as PIL, and reject an empty split."""
    from datasets import Image, Value

    columns = list(split.column_names)
    for key, column in (("image_column", config.image_column), ("label_column", config.label_column)):
        if column not in columns:
            raise ValueError(
                f"column {column!r} not found in split {split_name!r} of dataset {config.path!r}; "
                f"available columns: {columns}. Set data.{key} to one of them"
            )
    if len(split) == 0:
        raise ValueError(f"split {split_name!r} of dataset {config.path!r} is empty")

    split = split.select_columns([config.image_column, config.label_column])
    feature = split.features[config.image_column]
    # Parquet written without the datasets metadata stores images as {bytes, path} structs or as
    # file paths. Casting the column to Image() makes datasets decode them to PIL images.
    is_struct = isinstance(feature, dict) and "bytes" in feature
    is_path = isinstance(feature, Value) and feature.dtype in ("string", "large_string")
    if isinstance(feature, Image):
        if not feature.decode:
            split = split.cast_column(config.image_column, Image())
    elif is_struct or is_path:
        split = split.cast_column(config.image_column, Image())
    else:
        raise ValueError(
            f"column {config.image_column!r} of split {split_name!r} has type {feature}, not Image; "
            f"set data.image_column to the column that contains the images"
        )
    return split


def _read_labels(config: HFImagesConfig, split, split_name: str) -> np.ndarray:
    from datasets import ClassLabel, Value

    feature = split.features[config.label_column]
    is_integer = isinstance(feature, Value) and feature.dtype.startswith(("int", "uint"))
    if not (isinstance(feature, ClassLabel) or is_integer):
        raise ValueError(
            f"column {config.label_column!r} of split {split_name!r} has type {feature}, but a ClassLabel "
            f"or integer column is expected; set data.label_column to the column that contains the class ids"
        )
    labels = np.asarray(split[config.label_column], dtype=np.int64)
    if labels.min() < 0:
        raise ValueError(
            f"column {config.label_column!r} of split {split_name!r} contains the negative label {labels.min()}; "
            f"every example needs a class id >= 0"
        )
    return labels


def _count_classes(config: HFImagesConfig, feature, label_arrays: List[np.ndarray]) -> int:
    """Return ClassLabel.num_classes, or the largest label + 1 for plain integer labels."""
    from datasets import ClassLabel

    largest = max(int(labels.max()) for labels in label_arrays if len(labels))
    if not isinstance(feature, ClassLabel):
        return largest + 1
    if largest >= feature.num_classes:
        raise ValueError(
            f"column {config.label_column!r} contains label {largest}, but its ClassLabel feature "
            f"declares only {feature.num_classes} classes"
        )
    return feature.num_classes


def _normalisation(config: HFImagesConfig, train, mode: str) -> tuple[List[float], List[float]]:
    """Return the configured mean and std, computing whichever is None from the training split."""
    if config.mean is not None and config.std is not None:
        return list(config.mean), list(config.std)

    unnormalised = build_transform(config.image_size, None, None, augment=False)
    images = HFImageDataset(train, config.image_column, config.label_column, mode, unnormalised)
    count = min(len(images), MAX_STATS_IMAGES)
    rng = np.random.default_rng(config.split_seed)
    sample = np.sort(rng.permutation(len(images))[:count])

    total = torch.zeros(config.channels, dtype=torch.float64)
    total_squares = torch.zeros(config.channels, dtype=torch.float64)
    for index in sample:
        image = images[int(index)][0].to(torch.float64)
        total += image.sum(dim=(1, 2))
        total_squares += image.square().sum(dim=(1, 2))
    pixels = count * config.image_size * config.image_size
    mean = total / pixels
    std = (total_squares / pixels - mean.square()).clamp_min(0).sqrt()
    if config.std is None and bool((std < 1e-6).any()):
        raise ValueError(
            f"the training images have a constant channel (std {std.tolist()}), so they cannot be normalised; "
            f"set data.mean and data.std explicitly"
        )

    mean_list = list(config.mean) if config.mean is not None else mean.tolist()
    std_list = list(config.std) if config.std is not None else std.tolist()
    logger.info("normalisation from %d training images: mean %s, std %s", count, mean_list, std_list)
    return mean_list, std_list
