"""Shared fixtures: Hydra composition of the suite's configs and a clean Accelerate state."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Nothing in the test suite may reach a model or data hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "configs"


def compose(*overrides: str):
    """Compose ``configs/config.yaml`` with ``overrides`` as ``train.py`` does, without running."""
    from gradsmooth.config import compose as compose_config

    return compose_config(*overrides)


def run_config(*overrides: str, run_dir: Path):
    """Compose, validate and train one run in-process; return its final metrics."""
    from gradsmooth.config import train_run, validate

    return train_run(validate(compose(*overrides)), run_dir)


@pytest.fixture(scope="module")
def single_thread():
    """Run a module's tiny tensor ops on one thread.

    More threads do not speed up tensors this small, and on a busy 2-core machine OpenMP's
    spin-waiting threads made a 3-step Muon run about 400 times slower (2.7 s against 0.007 s).
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def reset_accelerate_state():
    """Accelerate keeps process-wide singletons; each test starts from a clean one."""
    yield
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()
