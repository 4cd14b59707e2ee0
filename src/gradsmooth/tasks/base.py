"""The interface every task runner implements for the shared training loop."""

from __future__ import annotations

import contextlib
import dataclasses
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Iterator

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

    Optional hooks, all no-ops by default: :meth:`after_optimizer_step` (e.g. an EMA update),
    :meth:`evaluation_weights` (swap in the weights to evaluate), :meth:`evaluate_model` (metrics
    of the whole model, such as sample quality, once per evaluation round) and
    :meth:`extra_weights` (more state dicts saved next to ``model.safetensors``) and
    :meth:`probe_forward` (a forward pass for the depth diagnostics). The loop passes
    these hooks the unwrapped model, never the Accelerate/DDP wrapper.

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

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Return tensors the task needs for an exact resume (an EMA of the weights, say); none by default."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`state_dict` returned; a task with no state accepts only an empty dict."""
        if state:
            raise ValueError(f"task {self.name} keeps no state, but the checkpoint contains task state {sorted(state)}")

    def after_optimizer_step(self, model: nn.Module) -> None:
        """Run after every real optimizer step and LR-schedule step, never after a micro-batch."""

    @contextlib.contextmanager
    def evaluation_weights(self, model: nn.Module) -> Iterator[None]:
        """Swap the weights to evaluate into ``model`` for the duration of the block, then restore the trained ones."""
        yield

    def evaluate_model(self, model: nn.Module, step: int, accelerator, run_dir: Path) -> dict[str, float]:
        """Return metrics computed from the whole model once per evaluation round (after the splits).

        Called on every process, in eval mode under ``torch.no_grad`` inside
        :meth:`evaluation_weights`. Collective calls on ``accelerator`` are allowed, and only the
        main process should write to ``run_dir``.
        """
        return {}

    def extra_weights(self, model: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
        """Return named state dicts that the loop saves as ``<name>.safetensors`` next to the model."""
        return {}

    def probe_forward(self, model: nn.Module, batch: Any) -> None:
        """Run ``model`` forward on ``batch`` (collated validation examples) for the depth diagnostics.

        Raise ``NotImplementedError`` (the default) when the task has no such forward; the
        representation diagnostics are then skipped.
        """
        raise NotImplementedError

    def after_training(self, model: nn.Module, run_dir: Path) -> None:
        """Run once on the main process after the final evaluation (e.g. write samples); does nothing by default."""
