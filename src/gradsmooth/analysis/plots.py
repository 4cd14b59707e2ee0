"""Plots of the depth diagnostics, for one run and for baseline against smoothing across runs."""

from __future__ import annotations

import json
from pathlib import Path

SCORES = ("residual_alignment", "adjacent_alignment", "straightness", "norm_variation", "coupling_score")
UPDATE_MEASURES = ("adjacent_cos", "roughness")


def read_rows(path: Path) -> list[dict]:
    """Return the JSON rows of a ``.jsonl`` file, or [] when it does not exist."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def update_means(rows: list[dict]) -> dict[str, tuple[list[int], list[float]]]:
    """Average each update measure over the slots (and stacks) of every step: name -> (steps, values)."""
    by_step: dict[int, list[dict]] = {}
    for row in rows:
        by_step.setdefault(row["step"], []).append(row)
    curves = {}
    for measure in UPDATE_MEASURES:
        for when in ("before", "after"):
            key = f"{measure}_{when}"
            steps = sorted(by_step)
            curves[key] = (steps, [sum(r[key] for r in by_step[s]) / len(by_step[s]) for s in steps])
    return curves


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def draw_heatmap(axis, matrix, title: str, vmin: float = -1.0, vmax: float = 1.0):
    """Draw one depth x depth matrix with block indices on both axes; return the image for a colour bar."""
    image = axis.imshow(matrix, vmin=vmin, vmax=vmax, cmap="RdBu_r")
    axis.set_title(title, fontsize=9)
    axis.set_xlabel("block")
    axis.set_ylabel("block")
    return image


def plot_run_diagnostics(diagnostics_dir: Path, path: Path) -> None:
    """Draw one run's residual cosine heatmaps (first and last evaluation) and its measures over training."""
    depth = read_rows(diagnostics_dir / "depth.jsonl")
    updates = read_rows(diagnostics_dir / "updates.jsonl")
    if not depth and not updates:
        return

    plt = _pyplot()
    figure, axes = plt.subplots(1, 4, figsize=(17, 3.6))
    if depth:
        stack = depth[0]["stack"]
        rows = [row for row in depth if row["stack"] == stack]
        for axis, row in zip(axes[:2], (rows[0], rows[-1])):
            image = draw_heatmap(axis, row["residual_cosine"], f"residual cosine, step {row['step']}")
        figure.colorbar(image, ax=axes[1], fraction=0.046)
        for score in SCORES:
            points = [(row["step"], row[score]) for row in rows if score in row]
            if points:
                axes[2].plot(*zip(*points), marker=".", label=score)
        axes[2].set_xlabel("step")
        axes[2].set_title("representation measures", fontsize=9)
        axes[2].legend(fontsize=7)
    if updates:
        for key, (steps, values) in update_means(updates).items():
            axes[3].plot(steps, values, label=key, linestyle="--" if key.endswith("before") else "-")
        axes[3].set_xlabel("step")
        axes[3].set_title("update measures (mean over slots)", fontsize=9)
        axes[3].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
