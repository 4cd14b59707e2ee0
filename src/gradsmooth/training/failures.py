"""Record a failed run in its own directory and report a sweep's failed jobs at its end."""

from __future__ import annotations

import json
import logging
import traceback
from pathlib import Path

from hydra.experimental.callback import Callback

from gradsmooth.training.rundir import write_json

log = logging.getLogger("gradsmooth")

FAILURE_FILE = "failure.json"


def record_failure(run_dir: Path, error: BaseException) -> None:
    """Write ``failure.json`` (error type, message, traceback) so tables show the cell as failed."""
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(
        run_dir / FAILURE_FILE,
        {
            "error": type(error).__name__,
            "message": str(error),
            "traceback": "".join(traceback.format_exception(error)),
        },
    )


def finish_trackers(exit_code: int) -> None:
    """Finish an open W&B run, so the next job of a sweep starts its own."""
    try:
        import wandb
    except ImportError:  # pragma: no cover - wandb is a dependency
        return
    if wandb.run is not None:
        wandb.run.finish(exit_code=exit_code)


class SweepReport(Callback):
    """At the end of a multirun, list the jobs that failed and exit with status 1 if any did.

    Every job has run by then, because a failing job returns instead of raising.
    """

    def on_multirun_end(self, config, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        failures = sorted(sweep_dir.glob(f"*/{FAILURE_FILE}"))
        if not failures:
            log.info("sweep %s: every job completed", sweep_dir)
            return
        for path in failures:
            failure = json.loads(path.read_text())
            log.error("sweep job %s failed: %s: %s", path.parent.name, failure["error"], failure["message"])
        log.error("sweep %s: %d job(s) failed; their cells are marked failed in the tables", sweep_dir, len(failures))
        raise SystemExit(1)
