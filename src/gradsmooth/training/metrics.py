"""Metric logging: ``metrics.jsonl`` in the run directory and one grep-able console line."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

log = logging.getLogger("gradsmooth")


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
    """Append metrics to ``metrics.jsonl`` and log them on the main process only."""

    def __init__(self, run_dir: Path, enabled: bool):
        self.path = run_dir / "metrics.jsonl"
        self.enabled = enabled
        self.history: list[dict] = []

    def write(self, step: int, metrics: dict[str, float]) -> None:
        row = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        self.history.append(row)
        if not self.enabled:
            return
        with self.path.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        log.info(format_line(step, metrics))


def _plain(value):
    value = float(value) if hasattr(value, "item") or isinstance(value, (int, float)) else value
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value
