"""Train one run of the suite: ``python train.py task=vit optim=adam smoothing.window=3``.

Hydra composes ``configs/config.yaml`` with the command-line overrides, the config is validated
before any work starts, and the run writes everything under its own run directory. The last line
printed is the task's final metrics, e.g. ``test/loss:0.0712 test/acc:0.9778``.

In a multirun (``-m``) a failing job writes ``failure.json`` into its run directory and the
sweep goes on; the sweep lists its failed jobs at the end.
"""

from __future__ import annotations

import hashlib
import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from gradsmooth.config import ConfigError, register_configs, validate
from gradsmooth.training import train
from gradsmooth.training.failures import finish_trackers, record_failure
from gradsmooth.training.rundir import claim_run_dir, collect_environment, write_json

log = logging.getLogger("gradsmooth")

register_configs()


def _run_info(cfg: DictConfig, run_dir: Path) -> dict:
    """Name, group and id of the run for trackers: named from its overrides, grouped by sweep."""
    hydra_cfg = HydraConfig.get()
    overrides = ",".join(hydra_cfg.overrides.task) or "default"
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    group = Path(hydra_cfg.sweep.dir).name if multirun else None
    return {
        "name": overrides,
        "group": group,
        "id": hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:16],
        "config": OmegaConf.to_container(cfg, resolve=True),
    }


@hydra.main(version_base="1.3", config_path="configs", config_name="config")
def main(cfg: DictConfig) -> float:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN

    try:
        config = validate(cfg)
        claim_run_dir(run_dir)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        write_json(run_dir / "environment.json", collect_environment())
        log.info("run directory: %s", run_dir)

        final = train(
            config.task,
            config.model,
            config.data,
            config.optim,
            config.smoothing,
            config.trainer,
            config.seed,
            run_dir,
            logger=config.logger,
            run_info=_run_info(cfg, run_dir),
        )
    except Exception as error:
        finish_trackers(exit_code=1)
        if isinstance(error, FileExistsError):
            # The directory belongs to another run: write nothing into it.
            log.error("%s", error)
            sys.exit(1)
        record_failure(run_dir, error)
        if isinstance(error, ConfigError):
            log.error("invalid config: %s", error)
            if not multirun:
                sys.exit(2)
        elif not multirun:
            raise
        else:
            log.exception("job failed; the sweep goes on")
        return float("nan")

    print(" ".join(f"{key}:{value:.4f}" for key, value in final.items() if key.startswith("test/")))
    metric = final.get("test/acc", final.get("test/loss"))
    return float(metric) if metric is not None else float("nan")


if __name__ == "__main__":
    main()
