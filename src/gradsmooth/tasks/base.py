"""The interface every task runner implements for the shared training loop."""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset


def settings_from(cls, values, key: str):
    """Build dataclass ``cls`` from a mapping or an instance, naming ``key`` when a field is unknown."""
    if isinstance(values, cls):
        return values
    values = dict(values)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown {key} setting(s) {unknown}; allowed: {sorted(known)}")
    return cls(**values)


class Task(ABC):
    """A model, its data, its loss and its evaluation.

    The loop calls :meth:`training_step` on training batches and :meth:`eval_step` on evaluation
    batches. ``eval_step`` returns per-example values (1-D tensors); the loop gathers them across
    processes, sums each key over the split and passes the totals to :meth:`eval_metrics`.
    ``metric`` names the result its paper table reports, ``metric_mode`` whether higher is better.
    ``units_per_example`` maps a unit to its count per training example (``{"tokens": 256}`` for
    sequences of 256 targets); the loop logs ``perf/<unit>_per_s`` for each.
    """

    name: str
    metric: str
    metric_mode: str = "max"

    train_dataset: Dataset
    eval_datasets: dict[str, Dataset]
    batch_size: int
    eval_batch_size: int
    units_per_example: dict[str, int] = {}

    @abstractmethod
    def build_model(self) -> nn.Module: ...

    @abstractmethod
    def training_step(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """Return the mean training loss of ``batch``."""

    @abstractmethod
    def eval_step(self, model: nn.Module, batch: Any) -> dict[str, torch.Tensor]: ...

    @abstractmethod
    def eval_metrics(self, totals: dict[str, float], split: str) -> dict[str, float]: ...

    def after_training(self, model: nn.Module, run_dir: Path) -> None:
        """Run once on the main process after the final evaluation (e.g. write samples); does nothing by default."""
