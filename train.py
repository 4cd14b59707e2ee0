"""Train one run of the suite: ``python train.py task=vit optim=adam smoothing.window=3``.

Hydra composes ``configs/config.yaml`` with the command-line overrides, the config is validated
before any work starts, and the run writes everything under its own run directory. The last line
printed is the task's final test and sample metrics, e.g. ``test/loss:0.0712 test/acc:0.9778``.

In a multirun (``-m``) a failing job writes ``failure.json`` into its run directory and the
sweep goes on; the sweep lists its failed jobs at the end.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from gradsmooth.config import ConfigError, register_configs, train_run, validate
from gradsmooth.training.failures import FAILURE_FILE, finish_trackers, record_failure
from gradsmooth.training.rundir import RunDirError, claim_run_dir, collect_environment, write_json

log = logging.getLogger("gradsmooth")

register_configs()


def _run_info(cfg: DictConfig, run_dir: Path) -> dict:
    """Name, group and id of the run for trackers: named from its overrides, grouped by sweep."""
    info = {
        "name": run_dir.name,
        "group": None,
        "id": hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:16],
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    if HydraConfig.initialized():
        hydra_cfg = HydraConfig.get()
        info["name"] = ",".join(hydra_cfg.overrides.task) or "default"
        if hydra_cfg.mode == RunMode.MULTIRUN:
            info["group"] = Path(hydra_cfg.sweep.dir).name
    return info


def _shared_run_dir(own: Path, cpu: bool) -> tuple[Path, bool]:
    """Return rank 0's run directory on every process of a multi-process launch, and whether this is rank 0.

    Under torchrun each rank composes its own Hydra run directory. The other ranks drop theirs
    (it contains only their log file), log warnings and errors to the console only, and write
    nothing; rank 0 writes logs, metrics and results.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return own, True

    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list

    state = PartialState(cpu=cpu)
    shared = Path(broadcast_object_list([str(own)], from_process=0)[0])
    if not state.is_main_process:
        root = logging.getLogger()
        for handler in list(root.handlers):
            if isinstance(handler, logging.FileHandler):
                root.removeHandler(handler)
                handler.close()
        root.setLevel(logging.WARNING)
        if own != shared:
            shutil.rmtree(own, ignore_errors=True)
    return shared, state.is_main_process


def _flatten(tree, prefix: str = "") -> dict:
    if not isinstance(tree, dict):
        return {prefix[:-1]: tree}
    flat = {}
    for key, value in tree.items():
        flat.update(_flatten(value, f"{prefix}{key}."))
    return flat


def _write_record(cfg: DictConfig, run_dir: Path) -> None:
    """Write the resolved config and the environment; a resume keeps the first run's and adds its own.

    A resumed run in the same directory writes ``config.resume-<time>.yaml`` and
    ``environment.resume-<time>.json`` next to the originals and warns about every setting
    that differs from the original run's.
    """
    resolved = OmegaConf.to_yaml(cfg, resolve=True)
    original = run_dir / "config.yaml"
    if not original.exists():
        original.write_text(resolved)
        write_json(run_dir / "environment.json", collect_environment())
        return

    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    (run_dir / f"config.resume-{stamp}.yaml").write_text(resolved)
    write_json(run_dir / f"environment.resume-{stamp}.json", collect_environment())
    before = _flatten(OmegaConf.to_container(OmegaConf.load(original)))
    after = _flatten(OmegaConf.to_container(cfg, resolve=True))
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k) and k != "trainer.resume")
    if changed:
        log.warning("the resumed run differs from the original run (config.yaml) in: %s", ", ".join(changed))


def run(cfg: DictConfig, run_dir: Path, multirun: bool = False) -> float:
    """Validate ``cfg``, train in ``run_dir`` and return the task's final metric.

    A failure writes ``failure.json`` into ``run_dir``; in a multirun the job then returns NaN so
    the sweep goes on, otherwise the error propagates (an invalid config exits with status 2).
    """
    is_main = True
    try:
        config = validate(cfg)
        run_dir, is_main = _shared_run_dir(run_dir, config.trainer.cpu)
        if is_main:
            claim_run_dir(run_dir, resume=config.trainer.resume)
            # A resumed run replaces the record of the attempt that failed in this directory.
            (run_dir / FAILURE_FILE).unlink(missing_ok=True)
            _write_record(cfg, run_dir)
            log.info("run directory: %s", run_dir)

        final = train_run(config, run_dir, run_info=_run_info(cfg, run_dir))
    except Exception as error:
        finish_trackers(exit_code=1)
        if isinstance(error, RunDirError):
            # The directory is another run's or cannot be written: write nothing into it.
            log.error("%s", error)
            if multirun:
                return float("nan")
            raise
        record_failure(run_dir, error)
        if isinstance(error, ConfigError):
            log.error("invalid config: %s", error)
            if not multirun:
                raise
        elif not multirun:
            raise
        else:
            log.exception("job failed; the sweep goes on")
        return float("nan")

    # Tasks without a test split (task=lm) report their validation metrics.
    split = "test" if any(key.startswith("test/") for key in final) else "val"
    if is_main:
        print(" ".join(f"{key}:{value:.4f}" for key, value in final.items() if key.startswith((f"{split}/", "sample/"))))
    metric = next((final[key] for key in ("test/acc", "test/loss", "val/acc", "val/bpb", "val/loss") if key in final), None)
    return float(metric) if metric is not None else float("nan")


@hydra.main(version_base="1.3", config_path="configs", config_name="config")
def main(cfg: DictConfig) -> float:
    try:
        return run(cfg, Path(HydraConfig.get().runtime.output_dir), HydraConfig.get().mode == RunMode.MULTIRUN)
    except ConfigError:
        sys.exit(2)
    except RunDirError:
        sys.exit(1)


if __name__ == "__main__":
    main()
