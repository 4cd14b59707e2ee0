"""Checkpoints that survive a kill at any moment, and finding the one to resume from.

A checkpoint is a directory ``checkpoints/step_<N>`` written by ``accelerator.save_state`` (model
as safetensors, optimizer with the smoothing wrapper's state, every RNG) plus the loop's own
state in ``trainer_state.json`` and the task's tensors in ``task_state.safetensors``. It is
written under a temporary name and renamed when complete, so a kill during a save leaves the
previous checkpoint as the latest; ``trainer_state.json`` is the last file written.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

log = logging.getLogger("gradsmooth")

CHECKPOINT_DIR = "checkpoints"
STATE_FILE = "trainer_state.json"
TASK_STATE_FILE = "task_state.safetensors"
_NAME = re.compile(r"^step_(\d+)$")


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def complete_checkpoints(root: Path) -> list[Path]:
    """Return the complete checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = [path for path in root.iterdir() if _NAME.match(path.name) and (path / STATE_FILE).is_file()]
    return sorted(found, key=lambda path: int(_NAME.match(path.name).group(1)))


def resolve_resume(resume: str, run_dir: Path) -> Path | None:
    """Return the checkpoint directory that ``trainer.resume`` names, or None to start fresh.

    ``auto`` takes the newest complete checkpoint of this run directory, if any. A path may name a
    checkpoint directory or a run directory (its newest checkpoint is taken).
    """
    if not resume:
        return None
    if resume == "auto":
        found = complete_checkpoints(run_dir / CHECKPOINT_DIR)
        return found[-1] if found else None

    path = Path(resume).expanduser()
    if (path / STATE_FILE).is_file():
        return path
    found = complete_checkpoints(path / CHECKPOINT_DIR)
    if found:
        return found[-1]
    raise ValueError(
        f"trainer.resume={resume!r} is neither a checkpoint directory (with {STATE_FILE}) nor a run "
        f"directory with complete checkpoints under {CHECKPOINT_DIR}/; use auto or a path that exists"
    )


def save_checkpoint(accelerator, root: Path, step: int, trainer_state: dict, task_state: dict, keep: int) -> Path:
    """Write the checkpoint of ``step`` atomically and keep only the newest ``keep`` complete ones."""
    final = root / checkpoint_name(step)
    partial = root / f"tmp-{checkpoint_name(step)}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)
    accelerator.wait_for_everyone()

    try:
        accelerator.save_state(str(partial), safe_serialization=True)
        if accelerator.is_main_process:
            if task_state:
                save_file({k: v.detach().contiguous().cpu() for k, v in task_state.items()}, partial / TASK_STATE_FILE)
            (partial / STATE_FILE).write_text(json.dumps(trainer_state, indent=1))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(partial, final)
    except OSError as error:
        if accelerator.is_main_process:
            shutil.rmtree(partial, ignore_errors=True)
        raise OSError(
            f"failed to write checkpoint {final}: {error}. Free disk space or point hydra.run.dir at a "
            "writable volume; the previous checkpoint is kept"
        ) from error
    accelerator.wait_for_everyone()

    if accelerator.is_main_process:
        for old in complete_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in root.glob("tmp-step_*"):
            shutil.rmtree(stale, ignore_errors=True)
    return final


def load_checkpoint(accelerator, path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """Restore model, optimizer and RNG states from ``path``; return the loop's and the task's state."""
    try:
        trainer_state = json.loads((path / STATE_FILE).read_text())
        accelerator.load_state(str(path))
        task_file = path / TASK_STATE_FILE
        task_state = load_file(task_file) if task_file.exists() else {}
    except (OSError, RuntimeError, ValueError, KeyError, EOFError, pickle.UnpicklingError, SafetensorError) as error:
        raise ValueError(
            f"checkpoint {path} cannot be loaded into this run: {type(error).__name__}: {error}. "
            "It is corrupted or was written with a different model, optimizer or smoothing setting"
        ) from error
    return trainer_state, task_state


def generator_state_from_list(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.uint8)
