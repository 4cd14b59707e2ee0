"""The training loop every task runner shares, on Accelerate.

Sections, in order: build (task, model, data, optimizer, schedule), prepare, then per optimizer
step: forward and backward over the accumulation window, clip, step, schedule, log, evaluate.
Work after the backward pass runs only on real optimizer steps (``accelerator.sync_gradients``).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import GradientAccumulationPlugin, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from gradsmooth.optim import OptimConfig, build_optimizer, build_scheduler
from gradsmooth.smoothing import SmoothedOptimizer, SmoothingConfig, smooth
from gradsmooth.tasks import Task, build_task
from gradsmooth.training.errors import ConfigError
from gradsmooth.training.metrics import MetricsLog
from gradsmooth.training.rundir import write_json

log = logging.getLogger("gradsmooth")

MIXED_PRECISION = ("no", "bf16", "fp16")


@dataclass
class TrainerConfig:
    """Loop settings.

    max_steps: optimizer steps to train (each over ``grad_accum_steps`` micro-batches).
    grad_accum_steps: micro-batches per optimizer step; the loss is averaged over them.
    grad_clip: maximum global gradient norm; 0 turns clipping off.
    eval_every, log_every: optimizer steps between evaluations and between log lines.
    mixed_precision: ``no``, ``bf16`` or ``fp16`` autocast through Accelerate.
    cpu: train on the CPU even when a GPU is present.
    threads: torch CPU threads; 0 keeps torch's default.
    num_workers: DataLoader worker processes.
    save_model: write the final weights as ``model.safetensors``.
    progress_bar: show a tqdm bar with loss and learning rate when stderr is a terminal.
    """

    max_steps: int = 1000
    grad_accum_steps: int = 1
    grad_clip: float = 1.0
    eval_every: int = 250
    log_every: int = 50
    mixed_precision: str = "no"
    cpu: bool = False
    threads: int = 0
    num_workers: int = 0
    save_model: bool = True
    progress_bar: bool = True

    def __post_init__(self) -> None:
        for key in ("max_steps", "grad_accum_steps", "eval_every", "log_every"):
            if getattr(self, key) < 1:
                raise ValueError(f"trainer.{key} must be >= 1; got {getattr(self, key)}")
        for key in ("grad_clip", "threads", "num_workers"):
            if getattr(self, key) < 0:
                raise ValueError(f"trainer.{key} must be >= 0; got {getattr(self, key)}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(
                f"trainer.mixed_precision must be one of {', '.join(MIXED_PRECISION)}; got {self.mixed_precision!r}"
            )


def _cycle(loader):
    """Yield batches forever, one pass over ``loader`` per epoch."""
    epoch = 0
    while True:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        yield from loader
        epoch += 1


@torch.no_grad()
def evaluate(task: Task, model, loader, split: str, accelerator: Accelerator) -> dict[str, float]:
    """Sum the task's per-example values over ``split`` on every process and return its metrics."""
    model.eval()
    totals: dict[str, torch.Tensor] = {}
    for batch in loader:
        values = accelerator.gather_for_metrics(task.eval_step(model, batch))
        for key, value in values.items():
            totals[key] = totals.get(key, 0.0) + value.double().sum()
    model.train()
    return task.eval_metrics({k: float(v) for k, v in totals.items()}, split)


def _build(task_settings, model_settings, data_settings, optim, smoothing, trainer, seed):
    """Build the task, model, data loaders, (smoothed) optimizer and LR schedule."""
    task = build_task(task_settings, model_settings, data_settings)
    model = task.build_model()
    generator = torch.Generator().manual_seed(seed)
    train_loader = DataLoader(
        task.train_dataset,
        batch_size=task.batch_size,
        shuffle=True,
        drop_last=True,
        generator=generator,
        num_workers=trainer.num_workers,
    )
    if len(train_loader) == 0:
        raise ValueError(
            f"data.batch_size ({task.batch_size}) is larger than the training set ({len(task.train_dataset)} examples)"
        )
    eval_loaders = {
        split: DataLoader(dataset, batch_size=task.eval_batch_size, num_workers=trainer.num_workers)
        for split, dataset in task.eval_datasets.items()
    }

    optimizer = smooth(build_optimizer(optim, model), model, smoothing)
    scheduler = build_scheduler(optim, optimizer, trainer.max_steps)
    return task, model, train_loader, eval_loaders, optimizer, scheduler


def train(
    task_settings,
    model_settings,
    data_settings,
    optim: OptimConfig,
    smoothing: SmoothingConfig,
    trainer: TrainerConfig,
    seed: int,
    run_dir: Path,
) -> dict[str, float]:
    """Train one run and return its final metrics (also written to ``results.json``)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if trainer.threads:
        torch.set_num_threads(trainer.threads)
    accelerator = Accelerator(
        cpu=trainer.cpu,
        mixed_precision=trainer.mixed_precision,
        # Accumulate over exactly grad_accum_steps micro-batches, also across epoch ends.
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=trainer.grad_accum_steps, sync_with_dataloader=False
        ),
    )
    set_seed(seed)
    main = accelerator.is_main_process

    # Build the task, model, data, optimizer and schedule. Every invalid setting fails here,
    # before any training step.
    try:
        task, model, train_loader, eval_loaders, optimizer, scheduler = _build(
            task_settings, model_settings, data_settings, optim, smoothing, trainer, seed
        )
    except ValueError as error:
        raise ConfigError(str(error)) from error

    if isinstance(optimizer, SmoothedOptimizer):
        table = optimizer.describe(model)
        log.info("smoothing %s over stacks:\n%s", optimizer.config, table)
        if main:
            (run_dir / "stacks.txt").write_text(table + "\n")
    else:
        log.info("smoothing off (baseline)")

    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    eval_loaders = {split: accelerator.prepare(loader) for split, loader in eval_loaders.items()}

    n_params = sum(p.numel() for p in model.parameters())
    examples_per_step = task.batch_size * trainer.grad_accum_steps * accelerator.num_processes
    log.info(
        "***** training %s: %s parameters, %d training examples, %d examples per step, %d steps on %d %s process(es) *****",
        task.name,
        f"{n_params:,}",
        len(task.train_dataset),
        examples_per_step,
        trainer.max_steps,
        accelerator.num_processes,
        accelerator.device.type,
    )

    metrics_log = MetricsLog(run_dir, enabled=main)
    batches = _cycle(train_loader)
    step = 0
    loss_sum = torch.zeros((), device=accelerator.device)
    micro_batches = 0
    grad_norm = None
    last_log_time, last_log_step = time.perf_counter(), 0
    # disable=None lets tqdm hide the bar when stderr is not a terminal (CI logs, SLURM files).
    show_bar = main and trainer.progress_bar
    progress = tqdm(total=trainer.max_steps, disable=None if show_bar else True, desc=task.name, dynamic_ncols=True)

    model.train()
    with logging_redirect_tqdm():
        while step < trainer.max_steps:
            # Forward and backward one micro-batch; the optimizer steps at the end of the window.
            batch = next(batches)
            with accelerator.accumulate(model):
                loss = task.training_step(model, batch)
                accelerator.backward(loss)
                if accelerator.sync_gradients and trainer.grad_clip > 0:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), trainer.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            loss_sum += loss.detach()
            micro_batches += 1
            if not accelerator.sync_gradients:
                continue

            # One real optimizer step has happened.
            scheduler.step()
            step += 1
            progress.update(1)

            # Log.
            if step % trainer.log_every == 0 or step == trainer.max_steps:
                train_loss = accelerator.reduce(loss_sum, reduction="mean").item() / micro_batches
                if not math.isfinite(train_loss):
                    raise FloatingPointError(
                        f"training loss is {train_loss} at step {step}; lower optim.lr or enable trainer.grad_clip"
                    )
                now = time.perf_counter()
                steps_per_s = (step - last_log_step) / (now - last_log_time)
                row = {
                    "train/loss": train_loss,
                    "optim/lr": optimizer.param_groups[0]["lr"],
                    "perf/steps_per_s": steps_per_s,
                    "perf/examples_per_s": steps_per_s * examples_per_step,
                }
                for unit, per_example in task.units_per_example.items():
                    row[f"perf/{unit}_per_s"] = row["perf/examples_per_s"] * per_example
                if grad_norm is not None:
                    row["train/grad_norm"] = float(grad_norm)
                metrics_log.write(step, row)
                progress.set_postfix(loss=f"{train_loss:.4f}", lr=f"{row['optim/lr']:.2e}")
                loss_sum.zero_()
                micro_batches = 0
                last_log_time, last_log_step = now, step

            # Evaluate.
            if step % trainer.eval_every == 0 and step != trainer.max_steps:
                metrics_log.write(step, evaluate(task, model, eval_loaders["val"], "val", accelerator))
    progress.close()

    # Final evaluation on every held-out split, results and weights.
    final: dict[str, float] = {}
    for split, loader in eval_loaders.items():
        final.update(evaluate(task, model, loader, split, accelerator))
    metrics_log.write(step, final)

    if main:
        write_json(run_dir / "results.json", {"task": task.name, "metric": task.metric, "step": step, **final})
        task.after_training(accelerator.unwrap_model(model), run_dir)
    if trainer.save_model:
        accelerator.wait_for_everyone()
        accelerator.save_model(model, run_dir, safe_serialization=True)
    accelerator.end_training()
    return final
