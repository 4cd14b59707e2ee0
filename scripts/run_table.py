"""Run a task's table sweep, then build its table and plots from the run directories.

    python scripts/run_table.py vit                    # CPU scale: configs/sweep/vit.yaml
    python scripts/run_table.py vit --scale paper      # GPU scale: configs/sweep/vit_paper.yaml
    python scripts/run_table.py vit --launcher submitit_slurm -- hydra.launcher.partition=gpu

The sweep goes to a new directory ``multirun/table-<task>/<time>``; the table to
``results/<task>/`` (CPU scale) or ``results/<task>/paper/``. A failed job does not stop the
sweep; its cell is marked failed and this script exits with status 1 after writing the table.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_tables  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("task", help="task name; the sweep file is configs/sweep/TASK.yaml")
    parser.add_argument("--scale", choices=("cpu", "paper"), default="cpu")
    parser.add_argument(
        "--launcher",
        default="joblib",
        help="Hydra launcher: basic (one job at a time), joblib (parallel on this machine), submitit_slurm",
    )
    parser.add_argument("--jobs", type=int, default=2, help="parallel jobs for the joblib launcher")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides, after --")
    args = parser.parse_args(argv)

    sweep = args.task if args.scale == "cpu" else f"{args.task}_paper"
    if not (ROOT / "configs" / "sweep" / f"{sweep}.yaml").exists():
        parser.error(f"no sweep file configs/sweep/{sweep}.yaml for task {args.task!r} at scale {args.scale}")

    sweep_dir = ROOT / "multirun" / f"table-{args.task}" / time.strftime("%Y-%m-%d_%H-%M-%S")
    command = [
        sys.executable,
        str(ROOT / "train.py"),
        "-m",
        f"sweep={sweep}",
        f"hydra.sweep.dir={sweep_dir}",
        f"hydra/launcher={args.launcher}",
    ]
    if args.launcher == "joblib":
        command.append(f"hydra.launcher.n_jobs={args.jobs}")
    command += args.overrides

    print("running:", " ".join(command), flush=True)
    returncode = subprocess.run(command, cwd=ROOT).returncode

    out_dir = ROOT / "results" / args.task
    if args.scale == "paper":
        out_dir = out_dir / "paper"
    make_tables.main([args.task, str(sweep_dir), "--out", str(out_dir)])
    if returncode != 0:
        print(f"the sweep exited with status {returncode}; see the failed cells in {out_dir / 'table.md'}")
    return returncode


if __name__ == "__main__":
    sys.exit(main())
