"""Task runners, one module each, looked up by ``task.name``."""

from __future__ import annotations

import importlib

from gradsmooth.tasks.base import Task

TASKS = {
    "vit": "gradsmooth.tasks.vit:VitTask",
    "diffusion": "gradsmooth.tasks.diffusion.task:DiffusionTask",
    "lm": "gradsmooth.tasks.lm:LMTask",
    # The supervised warm start of task=grpo, run by the shared loop; GRPO itself runs in TRL.
    "grpo_warm_start": "gradsmooth.tasks.grpo.warm_start:WarmStartTask",
}


def build_task(task_settings, model_settings, data_settings) -> Task:
    """Instantiate the task named by ``task_settings["name"]`` with its model and data settings."""
    name = task_settings["name"] if isinstance(task_settings, dict) else task_settings.name
    if name not in TASKS:
        raise ValueError(f"task.name must be one of {', '.join(TASKS)}; got {name!r}")
    module_name, class_name = TASKS[name].split(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls(task_settings, model_settings, data_settings)


__all__ = ["TASKS", "Task", "build_task"]
