"""Train one run of the suite: ``python train.py task=vit optim=adam smoothing.window=3``.

Hydra composes ``configs/config.yaml`` with the command-line overrides, the config is validated
before any work starts, and the run writes everything under its own run directory. The last line
printed is the task's final metrics, e.g. ``test/acc:0.9778 test/loss:0.0712``.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from gradsmooth.config import ConfigError, register_configs, validate
from gradsmooth.training import train
from gradsmooth.training.rundir import claim_run_dir, collect_environment, write_json

log = logging.getLogger("gradsmooth")

register_configs()


@hydra.main(version_base="1.3", config_path="configs", config_name="config")
def main(cfg: DictConfig) -> float:
    try:
        config = validate(cfg)
    except ConfigError as error:
        log.error("invalid config: %s", error)
        sys.exit(2)

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    claim_run_dir(run_dir)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    write_json(run_dir / "environment.json", collect_environment())
    log.info("run directory: %s", run_dir)

    try:
        final = train(
            config.task,
            config.model,
            config.data,
            config.optim,
            config.smoothing,
            config.trainer,
            config.seed,
            run_dir,
        )
    except ConfigError as error:
        log.error("invalid config: %s", error)
        sys.exit(2)

    # Tasks without a test split (task=lm) report their validation metrics.
    split = "test" if any(key.startswith("test/") for key in final) else "val"
    print(" ".join(f"{key}:{value:.4f}" for key, value in final.items() if key.startswith(f"{split}/")))
    metric = final.get(f"{split}/{'acc' if f'{split}/acc' in final else 'loss'}")
    return float(metric) if metric is not None else float("nan")


if __name__ == "__main__":
    main()
