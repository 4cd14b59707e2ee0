"""Hydra structured configs: the schema of every config group, checked before any work starts.

Types are checked when Hydra composes the config (a string for ``smoothing.window`` fails there);
ranges and choices are checked by each dataclass's ``__post_init__`` when :func:`validate` builds
the objects. Every component then receives only its own section.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from gradsmooth.data.images import DigitsConfig
from gradsmooth.data.text import HFTextConfig, ShakespeareConfig, TextFilesConfig
from gradsmooth.models.causal_lm import CausalLMConfig
from gradsmooth.optim import OptimConfig
from gradsmooth.smoothing import SmoothingConfig
from gradsmooth.tasks.vit import ViTModelConfig
from gradsmooth.training import TrainerConfig
from gradsmooth.training.errors import ConfigError


@dataclass
class LoggerConfig:
    """Metric destination. ``jsonl``: ``metrics.jsonl`` in the run directory and console lines."""

    name: str = "jsonl"

    def __post_init__(self) -> None:
        # TODO: add logger=wandb (offline unless logged in) through Accelerate's trackers.
        if self.name != "jsonl":
            raise ValueError(f"logger.name must be jsonl; got {self.name!r}")


@dataclass
class RunConfig:
    """One training run. ``task``, ``model`` and ``data`` hold the chosen task's own settings."""

    task: Any = MISSING
    model: Any = MISSING
    data: Any = MISSING
    optim: OptimConfig = field(default_factory=OptimConfig)
    smoothing: SmoothingConfig = field(default_factory=SmoothingConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    seed: int = 0


def register_configs() -> None:
    """Register the run schema and the per-group schemas that the YAML files extend."""
    store = ConfigStore.instance()
    store.store(name="run_schema", node=RunConfig)
    store.store(group="model", name="vit_schema", node=ViTModelConfig)
    store.store(group="data", name="digits_schema", node=DigitsConfig)
    store.store(group="model", name="causal_lm_schema", node=CausalLMConfig)
    store.store(group="data", name="shakespeare_schema", node=ShakespeareConfig)
    store.store(group="data", name="text_files_schema", node=TextFilesConfig)
    store.store(group="data", name="hf_text_schema", node=HFTextConfig)
    try:
        from gradsmooth.data.hf_images import HFImagesConfig
    except ImportError:  # pragma: no cover - the module ships with the package
        pass
    else:
        store.store(group="data", name="hf_images_schema", node=HFImagesConfig)

    if not OmegaConf.has_resolver("unique_id"):
        # A random suffix for run directories, so two runs started in the same second never share one.
        OmegaConf.register_new_resolver("unique_id", lambda: secrets.token_hex(3), use_cache=True)


def validate(cfg: DictConfig) -> RunConfig:
    """Build the typed config objects, raising :class:`ConfigError` on the first invalid value."""
    try:
        return OmegaConf.to_object(cfg)
    except ValueError as error:
        raise ConfigError(str(error)) from error
    except OmegaConfBaseException as error:
        cause = error.__cause__ if isinstance(error.__cause__, ValueError) else error
        raise ConfigError(str(cause)) from error
