"""Build a task's table and curve plots from run directories alone.

    python scripts/make_tables.py vit multirun/table-vit/2026-12-04_20-30-00_1a2b3c
    python scripts/make_tables.py vit              # the newest sweep under multirun/table-vit/

Writes ``results/<task>/table.csv``, ``table.md`` and ``curves.png``. A cell is one base
optimizer with one smoothing setting; its value is the task's final metric (``results.json``)
as mean and sample standard deviation over seeds. Failed runs (``failure.json``) and runs that
never finished are counted in their cell and shown, never dropped.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]

# A difference from the baseline counts as real when it exceeds this many standard errors of
# the difference of two means (about a 95% interval under a normal approximation).
REAL_DIFFERENCE_SE = 2.0

# The training curve drawn under the validation metric: the loss, except for GRPO, whose loss is
# near zero by construction (the advantages of a group sum to zero), so its mean reward is drawn.
TRAINING_CURVE = {"grpo": "train/reward"}


@dataclass
class Run:
    path: Path
    optimizer: str
    variant: str
    seed: int
    status: str  # completed, failed or incomplete
    metric: str | None = None
    mode: str = "max"
    value: float | None = None
    history: list[dict] = field(default_factory=list)
    error: str | None = None
    settings: dict = field(default_factory=dict)
    task: str = "?"


def variant_label(smoothing: dict) -> str:
    """Name a smoothing setting: ``baseline`` or e.g. ``window 3, α 0.2``, plus non-default options."""
    operator = smoothing.get("operator", "window")
    if operator == "none":
        return "baseline"

    label = f"{operator} {smoothing.get('window', 3)}, α {smoothing.get('alpha', 0.2)}"
    if operator == "ema":
        label = f"ema {smoothing.get('direction', 'forward')}, α {smoothing.get('alpha', 0.2)}"
    extras = []
    if smoothing.get("kernel", "uniform") != "uniform":
        extras.append(str(smoothing["kernel"]))
    if smoothing.get("target", "update") != "update":
        extras.append(f"{smoothing['target']} target")
    if smoothing.get("normalize", "none") != "none":
        extras.append(str(smoothing["normalize"]))
    if smoothing.get("params", "all") != "all":
        extras.append(str(smoothing["params"]))
    if not smoothing.get("decouple_weight_decay", True):
        extras.append("decay smoothed")
    return label + (f" ({', '.join(extras)})" if extras else "")


def load_run(path: Path) -> Run | None:
    """Read one run directory; return None when it is not a run of the suite."""
    config_file = path / ".hydra" / "config.yaml"
    if not config_file.exists():
        return None
    config = yaml.safe_load(config_file.read_text())
    run = Run(
        path=path,
        optimizer=str(config.get("optim", {}).get("name", "?")),
        variant=variant_label(config.get("smoothing", {})),
        seed=int(config.get("seed", 0)),
        status="incomplete",
        settings=_flatten({k: v for k, v in config.items() if k not in ("seed", "hydra")}),
        task=str(config.get("task", {}).get("name", "?")),
    )

    results_file, failure_file = path / "results.json", path / "failure.json"
    if failure_file.exists():
        run.status = "failed"
        failure = json.loads(failure_file.read_text())
        run.error = f"{failure['error']}: {failure['message']}"
    elif results_file.exists():
        results = json.loads(results_file.read_text())
        run.status = "completed"
        run.metric = results["metric"]
        run.mode = results.get("metric_mode", "max")
        run.value = float(results[run.metric])

    metrics_file = path / "metrics.jsonl"
    if metrics_file.exists():
        run.history = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    return run


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def mixed_settings(cell: "Cell") -> list[str]:
    """Return the config keys, other than the seed, whose values differ between a cell's runs."""
    keys = set().union(*(run.settings for run in cell.runs))
    return sorted(k for k in keys if len({repr(run.settings.get(k)) for run in cell.runs}) > 1)


def find_runs(sweep_dir: Path) -> list[Run]:
    runs = [load_run(path.parent.parent) for path in sorted(sweep_dir.glob("**/.hydra/config.yaml"))]
    return [run for run in runs if run is not None]


@dataclass
class Cell:
    optimizer: str
    variant: str
    runs: list[Run]

    @property
    def values(self) -> list[float]:
        return [run.value for run in self.runs if run.status == "completed"]

    def count(self, status: str) -> int:
        return sum(run.status == status for run in self.runs)

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.values) if self.values else None

    @property
    def std(self) -> float | None:
        return statistics.stdev(self.values) if len(self.values) >= 2 else None


def compare(cell: Cell, baseline: Cell | None, mode: str) -> tuple[float | None, str]:
    """Return the difference from the baseline and a verdict: better, worse, no real difference."""
    if baseline is None or cell is baseline or cell.mean is None or baseline.mean is None:
        return None, ""
    delta = cell.mean - baseline.mean
    if cell.std is None or baseline.std is None:
        return delta, "too few seeds"
    standard_error = math.sqrt(cell.std**2 / len(cell.values) + baseline.std**2 / len(baseline.values))
    if abs(delta) <= REAL_DIFFERENCE_SE * standard_error:
        return delta, "no real difference"
    improved = delta > 0 if mode == "max" else delta < 0
    return delta, "better" if improved else "worse"


def build_cells(runs: list[Run]) -> tuple[list[str], list[str], dict[tuple[str, str], Cell]]:
    grouped: dict[tuple[str, str], list[Run]] = defaultdict(list)
    for run in runs:
        grouped[(run.optimizer, run.variant)].append(run)
    optimizers = sorted({key[0] for key in grouped})
    variants = sorted({key[1] for key in grouped}, key=lambda v: (v != "baseline", v))
    cells = {key: Cell(key[0], key[1], sorted(members, key=lambda r: r.seed)) for key, members in grouped.items()}
    return optimizers, variants, cells


def format_cell(cell: Cell | None, verdict: str) -> str:
    if cell is None:
        return "missing"
    parts = []
    if cell.mean is not None:
        spread = f" ± {cell.std:.4f}" if cell.std is not None else ""
        parts.append(f"{cell.mean:.4f}{spread} (n={len(cell.values)})")
    if cell.count("failed"):
        parts.append(f"**failed {cell.count('failed')}/{len(cell.runs)}**")
    if cell.count("incomplete"):
        parts.append(f"incomplete {cell.count('incomplete')}/{len(cell.runs)}")
    marks = {"better": " ▲", "worse": " ▼", "no real difference": " ≈"}
    return " ".join(parts) + marks.get(verdict, "")


def write_tables(task: str, sweep_dir: Path, runs: list[Run], out_dir: Path) -> None:
    optimizers, variants, cells = build_cells(runs)
    completed = [run for run in runs if run.status == "completed"]
    metric = completed[0].metric if completed else "?"
    mode = completed[0].mode if completed else "max"
    out_dir.mkdir(parents=True, exist_ok=True)

    rows = []
    for optimizer in optimizers:
        baseline = cells.get((optimizer, "baseline"))
        for variant in variants:
            cell = cells.get((optimizer, variant))
            if cell is None:
                rows.append({"optimizer": optimizer, "variant": variant, "status": "missing"})
                continue
            delta, verdict = compare(cell, baseline, mode)
            rows.append(
                {
                    "optimizer": optimizer,
                    "variant": variant,
                    "status": "ok" if not cell.count("failed") and not cell.count("incomplete") else "partial",
                    "metric": metric,
                    "n_completed": len(cell.values),
                    "n_failed": cell.count("failed"),
                    "n_incomplete": cell.count("incomplete"),
                    "mean": cell.mean,
                    "std": cell.std,
                    "values": " ".join(f"{v:.6f}" for v in cell.values),
                    "delta_vs_baseline": delta,
                    "verdict": verdict,
                }
            )
    columns = ["optimizer", "variant", "status", "metric", "n_completed", "n_failed", "n_incomplete", "mean", "std", "values", "delta_vs_baseline", "verdict"]
    with (out_dir / "table.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)

    environment = _environment(completed or runs)
    seeds = sorted({run.seed for run in runs})
    direction = "higher is better" if mode == "max" else "lower is better"
    lines = [
        f"# {task}: {metric} ({direction})",
        "",
        f"Built by `scripts/make_tables.py` from {len(runs)} run directories in `{_relative(sweep_dir)}` "
        f"({len(completed)} completed, {sum(r.status == 'failed' for r in runs)} failed, "
        f"{sum(r.status == 'incomplete' for r in runs)} incomplete); seeds {seeds}.",
        f"Hardware: {environment}.",
        "",
        "| optimizer | " + " | ".join(variants) + " |",
        "|---|" + "---|" * len(variants),
    ]
    for optimizer in optimizers:
        baseline = cells.get((optimizer, "baseline"))
        entries = []
        for variant in variants:
            cell = cells.get((optimizer, variant))
            verdict = compare(cell, baseline, mode)[1] if cell is not None else ""
            entries.append(format_cell(cell, verdict))
        lines.append(f"| {optimizer} | " + " | ".join(entries) + " |")
    lines += [
        "",
        "Each cell: mean ± sample standard deviation of the final metric over n seeds. Marks compare "
        "with the same optimizer's baseline: ▲ better, ▼ worse, ≈ no real difference. A difference "
        f"counts as real when |Δ mean| > {REAL_DIFFERENCE_SE:g} × sqrt(s₁²/n₁ + s₂²/n₂), about a 95% "
        "interval under a normal approximation; with 3 seeds this is a coarse screen, not a test.",
        "Failed and incomplete runs are counted in their cell and never dropped; `missing` marks a "
        "cell with no run directory at all.",
    ]
    mixed = {key: mixed_settings(cell) for key, cell in cells.items()}
    mixed = {key: keys for key, keys in mixed.items() if keys}
    if mixed:
        lines += ["", "WARNING: these cells mix runs that differ in more than the seed, so their spread is not seed noise:", ""]
        lines += [f"- {optimizer}, {variant}: {', '.join(keys)}" for (optimizer, variant), keys in sorted(mixed.items())]
    failures = [run for run in runs if run.status == "failed"]
    if failures:
        lines += ["", "Failed runs:", ""]
        lines += [f"- `{_relative(run.path)}` ({run.optimizer}, {run.variant}, seed {run.seed}): {run.error}" for run in failures]
    (out_dir / "table.md").write_text("\n".join(lines) + "\n")

    plot_curves(task, metric, optimizers, variants, cells, out_dir / "curves.png")


def _relative(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def _environment(runs: list[Run]) -> str:
    for run in runs:
        path = run.path / "environment.json"
        if path.exists():
            env = json.loads(path.read_text())
            devices = ", ".join(env.get("cuda_devices") or []) or "no GPU"
            return (
                f"{env.get('platform')}, {env.get('cpu_count')} CPU cores, {devices}, "
                f"torch {env.get('packages', {}).get('torch')}, {env.get('torch_threads')} torch thread(s) per run"
            )
    return "unknown (no environment.json)"


def plot_curves(task, metric, optimizers, variants, cells, path: Path) -> None:
    """Save :func:`curves_figure` as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure = curves_figure(task, metric, optimizers, variants, cells)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def curves_figure(task, metric, optimizers, variants, cells):
    """Draw the validation metric and the training loss (GRPO: reward) against the step, mean ± std over seeds."""
    import matplotlib.pyplot as plt

    # A test metric exists only at the end, so its validation counterpart is drawn; other metrics
    # (val/bpb, sample/fd) are logged at every evaluation and drawn as they are.
    split, name = metric.split("/", 1)
    curve_keys = [f"val/{name}" if split == "test" else metric, TRAINING_CURVE.get(task, "train/loss")]
    figure, axes = plt.subplots(
        len(curve_keys), len(optimizers), figsize=(4 * len(optimizers), 3 * len(curve_keys)), squeeze=False
    )
    for column, optimizer in enumerate(optimizers):
        for row, key in enumerate(curve_keys):
            axis = axes[row][column]
            for variant in variants:
                cell = cells.get((optimizer, variant))
                if cell is None:
                    continue
                steps, means, stds = _mean_curve(cell, key)
                if not steps:
                    continue
                line = axis.plot(steps, means, label=variant, linewidth=1.2)[0]
                axis.fill_between(
                    steps, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)],
                    color=line.get_color(), alpha=0.15,
                )
            axis.set_title(f"{optimizer}: {key}", fontsize=9)
            axis.set_xlabel("step")
            if key == "train/loss":
                axis.set_yscale("log")
    axes[0][0].legend(fontsize=7)
    figure.suptitle(f"{task}: mean ± std over seeds (completed runs)", fontsize=10)
    figure.tight_layout()
    return figure


def _mean_curve(cell: Cell, key: str) -> tuple[list[int], list[float], list[float]]:
    per_step: dict[int, list[float]] = defaultdict(list)
    for run in cell.runs:
        if run.status != "completed":
            continue
        for row in run.history:
            value = row.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                per_step[row["step"]].append(float(value))
    steps = sorted(per_step)
    means = [statistics.fmean(per_step[s]) for s in steps]
    stds = [statistics.pstdev(per_step[s]) for s in steps]
    return steps, means, stds


def latest_sweep(task: str) -> Path:
    sweeps = sorted((ROOT / "multirun" / f"table-{task}").glob("*/"))
    if not sweeps:
        raise SystemExit(f"no sweep found under multirun/table-{task}/; run `make table-{task}` first")
    return sweeps[-1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("task", help="task name, e.g. vit")
    parser.add_argument("sweep_dir", nargs="?", type=Path, help="sweep directory (default: newest under multirun/table-TASK)")
    parser.add_argument("--out", type=Path, help="output directory (default: results/TASK)")
    args = parser.parse_args(argv)

    sweep_dir = args.sweep_dir or latest_sweep(args.task)
    runs = find_runs(sweep_dir)
    if not runs:
        raise SystemExit(f"no run directory (with .hydra/config.yaml) found under {sweep_dir}")
    tasks = {run.task for run in runs}
    if tasks != {args.task}:
        raise SystemExit(f"the runs under {sweep_dir} are of task(s) {sorted(tasks)}, not {args.task!r}")
    out_dir = args.out or ROOT / "results" / args.task
    write_tables(args.task, sweep_dir, runs, out_dir)
    print(f"wrote {out_dir / 'table.md'}, table.csv and curves.png from {len(runs)} runs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
