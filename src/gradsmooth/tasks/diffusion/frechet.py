"""Sample quality as a Fréchet distance between feature Gaussians of generated and real images.

Two feature spaces: a small digit classifier trained once on the training split and cached on
disk (the CPU-scale stand-in for FID, reported as ``sample/fd``), and Inception-v3 through
torchmetrics' ``FrechetInceptionDistance`` (FID at paper scale, reported as ``sample/fid``).
Images enter both in [-1, 1].
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Iterable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger("gradsmooth")

# Bump when DigitClassifier or its training recipe changes, so that cached weights are retrained.
CLASSIFIER_VERSION = "1"


def feature_statistics(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the mean and the unbiased covariance (float64) of ``features`` (examples x dims)."""
    features = features.double()
    if features.shape[0] < 2:
        raise ValueError(f"a covariance needs at least 2 feature vectors; got {features.shape[0]}")
    mean = features.mean(dim=0)
    centred = features - mean
    covariance = centred.T @ centred / (features.shape[0] - 1)
    return mean, covariance


def frechet_distance(mean1: torch.Tensor, cov1: torch.Tensor, mean2: torch.Tensor, cov2: torch.Tensor) -> float:
    """Return the Fréchet distance between N(mean1, cov1) and N(mean2, cov2).

    d² = |mean1 - mean2|² + tr(cov1) + tr(cov2) - 2 tr((cov1^½ cov2 cov1^½)^½), computed in
    float64 with symmetric eigendecompositions; eigenvalues below zero (round-off of
    positive semi-definite matrices) are clamped to zero.
    """
    mean1, cov1, mean2, cov2 = (value.double() for value in (mean1, cov1, mean2, cov2))
    eigenvalues, eigenvectors = torch.linalg.eigh((cov1 + cov1.T) / 2)
    sqrt_cov1 = eigenvectors @ torch.diag(eigenvalues.clamp_min(0).sqrt()) @ eigenvectors.T
    middle = sqrt_cov1 @ cov2 @ sqrt_cov1
    trace_sqrt = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp_min(0).sqrt().sum()
    distance = (mean1 - mean2).square().sum() + cov1.trace() + cov2.trace() - 2 * trace_sqrt
    return float(distance)


class DigitClassifier(nn.Module):
    """A small CNN; its 64 pooled, post-ReLU activations are the features of ``sample/fd``."""

    num_features = 64

    def __init__(self, channels: int = 1, num_classes: int = 10):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(64, self.num_features, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(self.num_features, num_classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(images))


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gradsmooth"


def load_or_train_classifier(
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    steps: int,
    cache_dir: Optional[Union[str, Path]] = None,
) -> DigitClassifier:
    """Return a :class:`DigitClassifier` trained on ``images`` and ``labels``, from the cache if present.

    The cache file name hashes the images, the labels, ``steps`` and :data:`CLASSIFIER_VERSION`,
    so other data (another split, size or scaling) trains a new classifier. Training is seeded
    and runs on the CPU.
    """
    digest = hashlib.sha256()
    digest.update(images.detach().cpu().float().contiguous().numpy().tobytes())
    digest.update(labels.detach().cpu().long().numpy().tobytes())
    digest.update(f"{steps}-{num_classes}-{CLASSIFIER_VERSION}".encode())
    path = Path(cache_dir or default_cache_dir()) / f"digit-classifier-{digest.hexdigest()[:16]}.safetensors"

    from safetensors.torch import load_file, save_file

    classifier = DigitClassifier(images.shape[1], num_classes)
    if path.is_file():
        classifier.load_state_dict(load_file(path))
        log.info("digit classifier for sample/fd loaded from %s", path)
        return classifier.eval()

    train_classifier(classifier, images, labels, steps)
    with torch.no_grad():
        accuracy = (classifier(images).argmax(dim=-1) == labels).float().mean().item()
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write to a temporary name first, so a concurrent run never reads a half-written file.
    partial = path.with_suffix(f".{os.getpid()}.partial")
    save_file(classifier.state_dict(), partial, metadata={"train_accuracy": f"{accuracy:.4f}"})
    os.replace(partial, path)
    log.info("digit classifier for sample/fd trained (%d steps, train accuracy %.4f), cached at %s", steps, accuracy, path)
    return classifier.eval()


def train_classifier(classifier: DigitClassifier, images: torch.Tensor, labels: torch.Tensor, steps: int) -> None:
    """Train with Adam on random one-pixel shifts of ``images``, seeded independently of the run."""
    from gradsmooth.data.images import random_shift

    generator = torch.Generator().manual_seed(0)
    fork = torch.random.fork_rng(devices=[])
    with fork:
        torch.manual_seed(0)
        optimizer = torch.optim.Adam(classifier.parameters(), lr=2e-3)
        classifier.train()
        for _ in range(steps):
            index = torch.randint(len(images), (min(128, len(images)),), generator=generator)
            batch = torch.stack([random_shift(image, 1) for image in images[index]])
            loss = F.cross_entropy(classifier(batch), labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    classifier.eval()


class ClassifierFrechet:
    """Fréchet distance in a classifier's feature space against fixed reference images."""

    metric_name = "sample/fd"

    def __init__(self, classifier: DigitClassifier):
        self.classifier = classifier.eval()
        self.device = torch.device("cpu")
        self.reference: Optional[tuple[torch.Tensor, torch.Tensor]] = None

    def set_reference(self, reference_images: Iterable[torch.Tensor], device: torch.device) -> None:
        """Move the classifier to ``device`` and store the feature statistics of the reference images."""
        self.device = torch.device(device)
        self.classifier.to(self.device)
        self.reference = feature_statistics(torch.cat([self._features(batch) for batch in reference_images]))

    @torch.no_grad()
    def _features(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(images.to(self.device).float().clamp(-1, 1)).double().cpu()

    def __call__(self, images: torch.Tensor) -> float:
        if self.reference is None:
            raise RuntimeError("call set_reference before computing a Fréchet distance")
        return frechet_distance(*feature_statistics(self._features(images)), *self.reference)


class InceptionFID:
    """FID through torchmetrics' ``FrechetInceptionDistance``, against fixed reference images.

    ``feature`` is 2048 (Inception-v3 pool features) or any ``nn.Module`` that maps images in
    [0, 1] to feature vectors. torchmetrics 1.9 loads the Inception weights through torch-fidelity
    and downloads them on first use, so the tests pass a small local module instead. Grayscale
    images are repeated to three channels for Inception.

    NOTE: the download and Inception features (``feature=2048``) have not been run here, for
    lack of a network; only the torchmetrics path with a local module is tested.
    """

    metric_name = "sample/fid"

    def __init__(self, feature: Union[int, nn.Module] = 2048, image_shape: tuple[int, int, int] = (3, 32, 32)):
        from torchmetrics.image.fid import FrechetInceptionDistance

        self.custom = isinstance(feature, nn.Module)
        input_shape = tuple(image_shape) if self.custom else (3, *image_shape[1:])
        self.metric = FrechetInceptionDistance(
            feature=feature, normalize=True, reset_real_features=False, input_img_size=input_shape
        )
        self.device = torch.device("cpu")
        self.has_reference = False

    def set_reference(self, reference_images: Iterable[torch.Tensor], device: torch.device) -> None:
        """Move the metric to ``device`` and accumulate the features of the reference images."""
        self.device = torch.device(device)
        self.metric = self.metric.to(self.device)
        with torch.no_grad():
            for batch in reference_images:
                self.metric.update(self._prepare(batch), real=True)
        self.has_reference = True

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        images = (images.to(self.device).float().clamp(-1, 1) + 1) / 2
        if not self.custom and images.shape[1] == 1:
            images = images.repeat(1, 3, 1, 1)
        return images

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> float:
        if not self.has_reference:
            raise RuntimeError("call set_reference before computing the FID")
        self.metric.reset()  # keeps the reference features, because reset_real_features=False
        for chunk in images.split(256):
            self.metric.update(self._prepare(chunk), real=False)
        return float(self.metric.compute())
