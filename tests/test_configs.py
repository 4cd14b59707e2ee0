"""Every config file composes and validates; bad values fail before any work with a clear message."""

from __future__ import annotations

import pytest
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from conftest import CONFIG_DIR, compose, run_config
from gradsmooth.config import RunConfig, validate
from gradsmooth.training.errors import ConfigError

GROUPS = ["task", "model", "data", "optim", "smoothing", "trainer", "logger", "policy"]


def _options(group: str) -> list[str]:
    return sorted(path.stem for path in (CONFIG_DIR / group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in _options(g)])
def test_every_option_composes(group, option):
    config = validate(compose(f"{group}={option}"))
    assert isinstance(config, RunConfig)


@pytest.mark.parametrize("optim", _options("optim"))
def test_task_optim_pairing_applies(optim):
    config = validate(compose("task=vit", f"optim={optim}"))
    assert config.optim.name == optim
    assert config.optim.warmup_steps == 100


def test_task_sets_trainer_values():
    config = validate(compose("task=vit"))
    assert config.trainer.max_steps == 2000


def test_command_line_beats_task_defaults():
    config = validate(compose("task=vit", "model=vit_cifar", "optim.lr=0.5"))
    assert config.model.name == "vit_cifar"
    assert config.optim.lr == 0.5


@pytest.mark.parametrize(
    "override,expected",
    [
        ("smoothing.window=4", ["smoothing.window", "positive odd"]),
        ("smoothing.window=0", ["smoothing.window", "positive odd"]),
        ("smoothing.window=-3", ["smoothing.window", "positive odd"]),
        ("smoothing.alpha=1.5", ["smoothing.alpha", "[0, 1]"]),
        ("smoothing.alpha=-0.1", ["smoothing.alpha", "[0, 1]"]),
        ("smoothing.target=weights", ["smoothing.target", "update, gradient"]),
        ("smoothing.operator=blur", ["smoothing.operator", "window, laplacian, ema, none"]),
        ("smoothing.normalize=l2", ["smoothing.normalize", "none, rescale"]),
        ("smoothing.params=vectors", ["smoothing.params", "all, matrices"]),
        ("smoothing.kernel=gauss", ["smoothing.kernel", "uniform, exponential"]),
        ("smoothing.direction=up", ["smoothing.direction", "forward, backward"]),
        ("optim.name=lion", ["optim.name", "sgd, adam, adamw, muon"]),
        ("optim.lr=0", ["optim.lr", "positive"]),
        ("optim.schedule=linear", ["optim.schedule", "cosine, constant"]),
        ("trainer.max_steps=0", ["trainer.max_steps", ">= 1"]),
        ("trainer.mixed_precision=fp8", ["trainer.mixed_precision", "no, bf16, fp16"]),
        ("model.embed_dim=65", ["model.embed_dim", "divisible"]),
        ("data.val_fraction=0.9", ["data.val_fraction", "(0, 1)"]),
    ],
)
def test_invalid_value_names_key(override, expected):
    with pytest.raises(ConfigError) as error:
        validate(compose(override))
    for text in expected:
        assert text in str(error.value)


@pytest.mark.parametrize(
    "override,key",
    [
        ("smoothing.window=three", "smoothing.window"),
        ("smoothing.alpha=strong", "smoothing.alpha"),
        ("smoothing.decouple_weight_decay=maybe", "smoothing.decouple_weight_decay"),
        ("smoothing.windw=3", "windw"),
    ],
)
def test_wrong_type_fails_at_composition(override, key):
    with pytest.raises((HydraException, OmegaConfBaseException)) as error:
        compose(override)
    assert key in str(error.value)


def test_unknown_group_option_lists_choices():
    with pytest.raises(HydraException) as error:
        compose("optim=lion")
    message = str(error.value)
    assert "optim/lion" in message
    for option in ("adamw", "muon", "sgd"):
        assert option in message


TINY = ["trainer.max_steps=2", "trainer.progress_bar=false", "trainer.save_model=false", "model.depth=2", "model.embed_dim=16", "model.num_heads=2"]


@pytest.mark.parametrize(
    "overrides,expected",
    [
        (["smoothing.stacks=[encoder.layers]"], ["encoder.layers", "blocks"]),
        (["model.depth=1"], ["no stack", "smoothing=none"]),
        (["model.depth=1", "optim=muon", "smoothing=none"], ["optim=muon", "no 2-D matrix"]),
        (["model.patch_size=3"], ["model.patch_size", "divide"]),
        (["data.batch_size=5000"], ["data.batch_size", "larger than the training set"]),
    ],
)
def test_build_error_before_training(overrides, expected, tmp_path):
    with pytest.raises(ConfigError) as error:
        run_config(*TINY, *overrides, run_dir=tmp_path)
    for text in expected:
        assert text in str(error.value)
    assert not (tmp_path / "metrics.jsonl").exists()


@pytest.mark.parametrize("launcher", ["basic", "joblib", "submitit_local", "submitit_slurm"])
def test_launcher_composes(launcher):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from gradsmooth.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=[f"hydra/launcher={launcher}", "sweep=vit"], return_hydra_config=True)
    assert launcher.split("_")[0] in cfg.hydra.launcher._target_.lower()
    assert cfg.hydra.sweeper.params.optim == "sgd,adam,adamw,muon"
