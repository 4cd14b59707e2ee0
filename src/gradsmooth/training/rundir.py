"""A self-describing run directory: resolved config, environment, metrics, results."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import torch

PACKAGES = (
    "torch",
    "torchvision",
    "timm",
    "transformers",
    "datasets",
    "diffusers",
    "accelerate",
    "trl",
    "hydra-core",
    "omegaconf",
    "numpy",
)


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10, cwd=Path(__file__).parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def collect_environment() -> dict:
    """Return the git commit and dirty flag, package versions, hardware and command line."""
    versions = {}
    for package in PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None

    status = _git("status", "--porcelain", "--untracked-files=no")
    devices = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return {
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": None if status is None else bool(status),
        "command": [sys.executable, *sys.argv],
        "python": platform.python_version(),
        "packages": versions,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda_devices": devices,
    }


def write_json(path: Path, payload: dict) -> None:
    """Write ``payload`` to ``path`` through a temporary file, so a reader never sees half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    os.replace(tmp, path)


class RunDirError(OSError):
    """The run directory belongs to another run or cannot be written."""


def claim_run_dir(run_dir: Path, resume: str = "") -> None:
    """Create ``run_dir`` for a new run, or raise if another run already wrote metrics there.

    With ``resume`` set the directory may hold the run being resumed.
    """
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise RunDirError(
            f"run directory {run_dir} cannot be created or written: {error.strerror or error}; "
            "set hydra.run.dir to a writable path"
        ) from error
    if (run_dir / "metrics.jsonl").exists() and not resume:
        raise RunDirError(
            f"run directory {run_dir} already contains a run (metrics.jsonl exists); "
            "choose a new hydra.run.dir, remove the old run, or continue it with trainer.resume=auto"
        )
