"""Metric logging: ``metrics.jsonl`` in the run directory and one grep-able console line."""

from __future__ import annotations

import json
import logging
import math
import netrc
import os
from dataclasses import dataclass, field
from typing import Optional
from pathlib import Path

log = logging.getLogger("gradsmooth")

LOGGERS = ("jsonl", "wandb")
WANDB_MODES = ("auto", "online", "offline")


@dataclass
class LoggerConfig:
    """Metric destinations. ``metrics.jsonl`` and console lines are always written.

    name: ``jsonl`` (local files only) or ``wandb`` (also Weights & Biases, through Accelerate).
    project, entity: the W&B project and team; entity null uses the account's default.
    mode: ``auto`` logs online when W&B credentials exist (WANDB_API_KEY or a ~/.netrc entry)
        and offline otherwise; ``online`` or ``offline`` force one. WANDB_MODE, when set, wins.
    tags: W&B run tags.
    """

    name: str = "jsonl"
    project: str = "gradsmooth"
    entity: Optional[str] = None
    mode: str = "auto"
    tags: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.name not in LOGGERS:
            raise ValueError(f"logger.name must be one of {', '.join(LOGGERS)}; got {self.name!r}")
        if self.mode not in WANDB_MODES:
            raise ValueError(f"logger.mode must be one of {', '.join(WANDB_MODES)}; got {self.mode!r}")
        self.tags = list(self.tags)


def wandb_mode(config: LoggerConfig) -> str:
    """Return ``online`` or ``offline``: online only when asked for or when credentials exist."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if config.mode != "auto":
        return config.mode
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        credentials = netrc.netrc().authenticators("api.wandb.ai")
    except (FileNotFoundError, netrc.NetrcParseError):
        credentials = None
    return "online" if credentials else "offline"


def format_line(step: int, metrics: dict[str, float]) -> str:
    """Render ``step:N key:value ...`` with 4 significant digits."""
    parts = [f"step:{step}"]
    for key, value in metrics.items():
        if isinstance(value, float):
            parts.append(f"{key}:{value:.4g}")
        else:
            parts.append(f"{key}:{value}")
    return " ".join(parts)


class MetricsLog:
    """Append metrics to ``metrics.jsonl``, log them, and pass them to Accelerate's trackers.

    Only the main process writes; ``accelerator.log`` is a no-op when no tracker is set up.
    """

    def __init__(self, run_dir: Path, enabled: bool, accelerator=None):
        self.path = run_dir / "metrics.jsonl"
        self.enabled = enabled
        self.accelerator = accelerator
        self.history: list[dict] = []

    def restore(self, source: Path | None, rows: int) -> None:
        """Start from the first ``rows`` rows of ``source`` (a resumed run) and rewrite ``metrics.jsonl``.

        Rows that the interrupted run logged after its checkpoint are dropped, so the file contains each
        step once. With no source the file starts empty, which also claims the run directory.
        """
        history = []
        if source is not None and source.exists():
            history = [json.loads(line) for line in source.read_text().splitlines() if line.strip()][:rows]
        self.history = history
        if self.enabled:
            tmp = self.path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(json.dumps(row) + "\n" for row in history))
            os.replace(tmp, self.path)

    def write(self, step: int, metrics: dict[str, float]) -> None:
        row = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        self.history.append(row)
        if self.accelerator is not None:
            self.accelerator.log({k: v for k, v in row.items() if k != "step"}, step=step)
        if not self.enabled:
            return
        with self.path.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        log.info(format_line(step, metrics))


def plot_history(history: list[dict], path: Path, title: str) -> None:
    """Draw every logged metric against the step, one panel per metric group, into a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Throughput and the depth diagnostics (their own plot, diagnostics/depth.png) are left out.
    skipped = ("perf/", "smooth/", "depth/")
    keys = [k for k in dict.fromkeys(k for row in history for k in row) if k != "step" and not k.startswith(skipped)]
    keys = [k for k in keys if sum(isinstance(row.get(k), float) for row in history) >= 2]
    if not keys:
        return

    groups = {}
    for key in keys:
        groups.setdefault(key.split("/")[-1], []).append(key)
    figure, axes = plt.subplots(1, len(groups), figsize=(4 * len(groups), 3.2), squeeze=False)
    for axis, (name, members) in zip(axes[0], groups.items()):
        for key in members:
            points = [(row["step"], row[key]) for row in history if isinstance(row.get(key), float)]
            axis.plot(*zip(*points), label=key, marker="." if len(points) < 30 else None)
        axis.set_xlabel("step")
        axis.set_title(name)
        axis.legend(fontsize=7)
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _plain(value):
    value = float(value) if hasattr(value, "item") or isinstance(value, (int, float)) else value
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value
