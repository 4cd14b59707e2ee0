"""Hydra structured configs: the schema of every config group, checked before any work starts.

Types are checked when Hydra composes the config (a string for ``smoothing.window`` fails there);
ranges and choices are checked by each dataclass's ``__post_init__`` when :func:`validate` builds
the objects. Every component then receives only its own section.
"""

from __future__ import annotations

import secrets
from pathlib import Path
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
from gradsmooth.tasks.diffusion.config import DiTModelConfig
from gradsmooth.tasks.grpo.config import PolicyConfig
from gradsmooth.tasks.grpo.problems import ArithmeticDataConfig, GSM8KDataConfig
from gradsmooth.tasks.vit import ViTModelConfig
from gradsmooth.training import TrainerConfig
from gradsmooth.training.diagnostics import DiagnosticsConfig
from gradsmooth.training.metrics import LoggerConfig
from gradsmooth.training.errors import ConfigError


@dataclass
class RunConfig:
    """One training run. ``task``, ``model`` and ``data`` hold the chosen task's own settings."""

    task: Any = MISSING
    model: Any = MISSING
    data: Any = MISSING
    # The policy GRPO starts from (task=grpo only); null for every other task.
    policy: Any = None
    optim: OptimConfig = field(default_factory=OptimConfig)
    smoothing: SmoothingConfig = field(default_factory=SmoothingConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    diagnostics: DiagnosticsConfig = field(default_factory=DiagnosticsConfig)
    seed: int = 0


def register_configs() -> None:
    """Register the run schema and the per-group schemas that the YAML files extend."""
    store = ConfigStore.instance()
    store.store(name="run_schema", node=RunConfig)
    store.store(group="model", name="vit_schema", node=ViTModelConfig)
    store.store(group="model", name="dit_schema", node=DiTModelConfig)
    store.store(group="data", name="digits_schema", node=DigitsConfig)
    store.store(group="model", name="causal_lm_schema", node=CausalLMConfig)
    store.store(group="data", name="shakespeare_schema", node=ShakespeareConfig)
    store.store(group="data", name="text_files_schema", node=TextFilesConfig)
    store.store(group="data", name="hf_text_schema", node=HFTextConfig)
    store.store(group="data", name="arithmetic_schema", node=ArithmeticDataConfig)
    store.store(group="data", name="gsm8k_schema", node=GSM8KDataConfig)
    store.store(group="policy", name="policy_schema", node=PolicyConfig)
    try:
        from gradsmooth.data.hf_images import HFImagesConfig
    except ImportError:  # pragma: no cover - the module ships with the package
        pass
    else:
        store.store(group="data", name="hf_images_schema", node=HFImagesConfig)

    if not OmegaConf.has_resolver("unique_id"):
        # A random suffix for run directories, so two runs started in the same second never share one.
        OmegaConf.register_new_resolver("unique_id", lambda: secrets.token_hex(3), use_cache=True)


CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


def compose(*overrides: str) -> DictConfig:
    """Compose ``configs/config.yaml`` with ``overrides`` as ``train.py`` does, without running.

    Reads the repository's ``configs/`` folder, so it works from a source checkout.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register_configs()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides))


def validate(cfg: DictConfig) -> RunConfig:
    """Build the typed config objects, raising :class:`ConfigError` on the first invalid value."""
    try:
        return OmegaConf.to_object(cfg)
    except ValueError as error:
        raise ConfigError(str(error)) from error
    except OmegaConfBaseException as error:
        cause = error.__cause__ if isinstance(error.__cause__, ValueError) else error
        raise ConfigError(str(cause)) from error


def train_run(config: RunConfig, run_dir: Path, run_info: dict | None = None) -> dict[str, float]:
    """Train the validated run ``config`` in ``run_dir`` and return its final metrics."""
    from gradsmooth.training import train

    task_name = config.task.get("name") if isinstance(config.task, dict) else getattr(config.task, "name", None)
    if task_name == "grpo":
        # TRL owns the GRPO loop, so this task has its own runner instead of the shared loop.
        from gradsmooth.tasks.grpo.runner import train_grpo

        runner, extra = train_grpo, {"policy_settings": config.policy}
    else:
        runner, extra = train, {"diagnostics": config.diagnostics}

    return runner(
        config.task,
        config.model,
        config.data,
        config.optim,
        config.smoothing,
        config.trainer,
        config.seed,
        run_dir,
        logger=config.logger,
        run_info=run_info,
        **extra,
    )
