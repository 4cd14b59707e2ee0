"""Draw the depth diagnostics of a task's table sweep: baseline against smoothing, per base optimizer.

    python scripts/make_figures.py vit                 # the newest sweep under multirun/table-vit/
    python scripts/make_figures.py lm multirun/table-lm/2026-12-04_23-00-00
    make figures                                       # vit and lm, from their newest table sweeps

Reads each run's ``diagnostics/depth.jsonl`` and ``diagnostics/updates.jsonl`` (written during
training) and writes, under ``results/analysis/``:

- ``<task>_residual_cosine.png``: the residual cosine matrix at the final evaluation, mean over
  seeds, one panel per optimizer and smoothing setting;
- ``<task>_alignment.png``: the alignment scores over training, mean and spread over seeds;
- ``<task>.md`` and ``<task>.csv``: the final scores per cell, mean ± std over seeds, marked
  against the same optimizer's baseline with the table rule (a difference above 2 standard errors).
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_tables  # noqa: E402

from gradsmooth.analysis.plots import SCORES, draw_heatmap, read_rows, update_means  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

# Final-evaluation scores, and the update measure averaged over the run's measured steps.
COLUMNS = (*SCORES, "adjacent_cos_after")
HIGHER_IS_MORE_STRUCTURED = {
    "residual_alignment": True,
    "adjacent_alignment": True,
    "straightness": True,
    "norm_variation": False,
    "coupling_score": True,
    "adjacent_cos_after": True,
}


def run_diagnostics(run: make_tables.Run) -> dict | None:
    """Return a completed run's final depth row (first stack) and its update means, or None."""
    if run.status != "completed":
        return None
    depth = read_rows(run.path / "diagnostics" / "depth.jsonl")
    if not depth:
        return None
    stack = depth[0]["stack"]
    rows = [row for row in depth if row["stack"] == stack]
    values = {score: rows[-1][score] for score in SCORES if score in rows[-1]}
    updates = read_rows(run.path / "diagnostics" / "updates.jsonl")
    if updates:
        _, after = update_means(updates)["adjacent_cos_after"]
        values["adjacent_cos_after"] = statistics.fmean(after)
    return {"rows": rows, "final": rows[-1], "values": values}


def cell_values(cell: make_tables.Cell, diagnostics: dict) -> dict[str, list[float]]:
    values: dict[str, list[float]] = {column: [] for column in COLUMNS}
    for run in cell.runs:
        found = diagnostics.get(run.path)
        if found is None:
            continue
        for column in COLUMNS:
            if column in found["values"]:
                values[column].append(found["values"][column])
    return values


def describe(values: list[float]) -> str:
    if not values:
        return "missing"
    if len(values) == 1:
        return f"{values[0]:.3f} (n=1)"
    return f"{statistics.fmean(values):.3f} ± {statistics.stdev(values):.3f} (n={len(values)})"


def verdict(values: list[float], baseline: list[float], higher: bool) -> str:
    """Mark a cell against its baseline with the table rule: ▲ more structured, ▼ less, ≈ no real difference."""
    if len(values) < 2 or len(baseline) < 2:
        return ""
    delta = statistics.fmean(values) - statistics.fmean(baseline)
    error = math.sqrt(statistics.variance(values) / len(values) + statistics.variance(baseline) / len(baseline))
    if abs(delta) <= make_tables.REAL_DIFFERENCE_SE * error:
        return " ≈"
    return " ▲" if (delta > 0) == higher else " ▼"


def write_table(task: str, sweep_dir: Path, optimizers, variants, cells, diagnostics, out_dir: Path) -> None:
    lines = [
        f"# Depth diagnostics: {task}",
        "",
        f"Sweep: `{make_tables._relative(sweep_dir)}`. Final evaluation, first stack, mean ± sample std over seeds. "
        "Marks compare each cell with the same optimizer's baseline: ▲ more structured (higher alignment, "
        "straightness, coupling and update cosine; lower norm variation), ▼ less, ≈ within "
        f"{make_tables.REAL_DIFFERENCE_SE:g} standard errors of the difference.",
        "",
        "| optimizer | smoothing | " + " | ".join(COLUMNS) + " |",
        "|---|---|" + "---|" * len(COLUMNS),
    ]
    csv_rows = []
    for optimizer in optimizers:
        baseline = cells.get((optimizer, "baseline"))
        baseline_values = cell_values(baseline, diagnostics) if baseline else {}
        for variant in variants:
            cell = cells.get((optimizer, variant))
            if cell is None:
                continue
            values = cell_values(cell, diagnostics)
            entries = []
            for column in COLUMNS:
                mark = "" if cell is baseline else verdict(values[column], baseline_values.get(column, []), HIGHER_IS_MORE_STRUCTURED[column])
                entries.append(describe(values[column]) + mark)
                csv_rows.append({"optimizer": optimizer, "smoothing": variant, "measure": column,
                                 "values": " ".join(f"{v:.6g}" for v in values[column])})
            lines.append(f"| {optimizer} | {variant} | " + " | ".join(entries) + " |")
    lines += [
        "",
        "Measures: residual_alignment and adjacent_alignment are the mean cosine similarity of blocks' "
        "residuals (all pairs, consecutive pairs) over probe tokens; straightness is the distance a token "
        "travels across the stack over the length of its path; norm_variation the coefficient of variation "
        "of residual norms across depth; coupling_score the mean off-diagonal coupling of blocks' Jacobians; "
        "adjacent_cos_after the cosine similarity of adjacent blocks' applied updates, averaged over the "
        "measured steps. Definitions: `src/gradsmooth/analysis/` and `src/gradsmooth/smoothing/diagnostics.py`.",
        "",
    ]
    (out_dir / f"{task}.md").write_text("\n".join(lines))
    with (out_dir / f"{task}.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["optimizer", "smoothing", "measure", "values"])
        writer.writeheader()
        writer.writerows(csv_rows)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_heatmaps(task: str, optimizers, variants, cells, diagnostics, path: Path) -> None:
    import numpy as np

    plt = _pyplot()
    figure, axes = plt.subplots(
        len(optimizers), len(variants), figsize=(3.2 * len(variants), 3.2 * len(optimizers)), squeeze=False, layout="constrained"
    )
    image = None
    for row, optimizer in enumerate(optimizers):
        for column, variant in enumerate(variants):
            axis = axes[row][column]
            cell = cells.get((optimizer, variant))
            matrices = [diagnostics[run.path]["final"]["residual_cosine"] for run in (cell.runs if cell else []) if run.path in diagnostics]
            if not matrices:
                axis.set_title(f"{optimizer}, {variant}: missing", fontsize=8)
                axis.axis("off")
                continue
            mean = np.mean(np.array(matrices), axis=0)
            image = draw_heatmap(axis, mean, f"{optimizer}, {variant} (n={len(matrices)})")
    if image is not None:
        figure.colorbar(image, ax=axes, fraction=0.02)
    figure.suptitle(f"{task}: residual cosine similarity across depth, final evaluation", fontsize=10)
    figure.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(figure)


def plot_alignment(task: str, optimizers, variants, cells, diagnostics, path: Path) -> None:
    plt = _pyplot()
    scores = ("residual_alignment", "straightness", "coupling_score")
    figure, axes = plt.subplots(len(optimizers), len(scores), figsize=(4.2 * len(scores), 3.0 * len(optimizers)), squeeze=False)
    for row, optimizer in enumerate(optimizers):
        for column, score in enumerate(scores):
            axis = axes[row][column]
            for variant in variants:
                cell = cells.get((optimizer, variant))
                per_step: dict[int, list[float]] = {}
                for run in cell.runs if cell else []:
                    for depth_row in diagnostics.get(run.path, {}).get("rows", []):
                        if score in depth_row:
                            per_step.setdefault(depth_row["step"], []).append(depth_row[score])
                if not per_step:
                    continue
                steps = sorted(per_step)
                means = [statistics.fmean(per_step[s]) for s in steps]
                spreads = [statistics.pstdev(per_step[s]) for s in steps]
                line = axis.plot(steps, means, marker=".", label=variant, linestyle="--" if variant == "baseline" else "-")
                axis.fill_between(steps, [m - s for m, s in zip(means, spreads)], [m + s for m, s in zip(means, spreads)],
                                  alpha=0.15, color=line[0].get_color())
            axis.set_title(f"{optimizer}: {score}", fontsize=9)
            axis.set_xlabel("step")
            axis.legend(fontsize=7)
    figure.suptitle(f"{task}: depth structure over training (mean ± std over seeds)", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("task", help="task name, e.g. vit")
    parser.add_argument("sweep_dir", nargs="?", type=Path, help="sweep directory (default: newest under multirun/table-TASK)")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "analysis", help="output directory")
    args = parser.parse_args(argv)

    sweep_dir = args.sweep_dir or make_tables.latest_sweep(args.task)
    runs = make_tables.find_runs(sweep_dir)
    if not runs:
        raise SystemExit(f"no run directory (with .hydra/config.yaml) found under {sweep_dir}")
    diagnostics = {run.path: found for run in runs if (found := run_diagnostics(run)) is not None}
    if not diagnostics:
        raise SystemExit(
            f"no run under {sweep_dir} has depth diagnostics (diagnostics/depth.jsonl); rerun the sweep with "
            "diagnostics.representations=true (the default)"
        )

    optimizers, variants, cells = make_tables.build_cells(runs)
    args.out.mkdir(parents=True, exist_ok=True)
    write_table(args.task, sweep_dir, optimizers, variants, cells, diagnostics, args.out)
    plot_heatmaps(args.task, optimizers, variants, cells, diagnostics, args.out / f"{args.task}_residual_cosine.png")
    plot_alignment(args.task, optimizers, variants, cells, diagnostics, args.out / f"{args.task}_alignment.png")
    print(f"wrote {args.out / (args.task + '.md')}, .csv and 2 figures from {len(diagnostics)} of {len(runs)} runs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
