"""The training loop every task runner shares, on Accelerate.

Sections, in order: build (task, model, data, optimizer, schedule), prepare, then per optimizer
step: forward and backward over the accumulation window, clip, step, schedule, the task's
after-step hook (e.g. an EMA update), log, evaluate.
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
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from gradsmooth.optim import OptimConfig, build_optimizer, build_scheduler
from gradsmooth.smoothing import SmoothedOptimizer, SmoothingConfig, smooth
from gradsmooth.tasks import Task, build_task
from gradsmooth.training.checkpoint import (
    CHECKPOINT_DIR,
    generator_state_from_list,
    load_checkpoint,
    resolve_resume,
    save_checkpoint,
)
from gradsmooth.training.diagnostics import DepthDiagnostics, DiagnosticsConfig
from gradsmooth.training.errors import ConfigError
from gradsmooth.training.signals import StopSignal
from gradsmooth.training.metrics import LoggerConfig, MetricsLog, plot_history, wandb_mode
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
    checkpoint_every: optimizer steps between checkpoints (and one at the end); 0 turns them off.
    keep_checkpoints: how many of the newest checkpoints to keep.
    resume: empty to start fresh; ``auto`` to continue from this run directory's newest
        checkpoint when there is one; or the path of a checkpoint or run directory.
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
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    resume: str = ""

    def __post_init__(self) -> None:
        for key in ("max_steps", "grad_accum_steps", "eval_every", "log_every", "keep_checkpoints"):
            if getattr(self, key) < 1:
                raise ValueError(f"trainer.{key} must be >= 1; got {getattr(self, key)}")
        for key in ("grad_clip", "threads", "num_workers", "checkpoint_every"):
            if getattr(self, key) < 0:
                raise ValueError(f"trainer.{key} must be >= 0; got {getattr(self, key)}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(
                f"trainer.mixed_precision must be one of {', '.join(MIXED_PRECISION)}; got {self.mixed_precision!r}"
            )


class SeededSamples(Dataset):
    """A training set whose random augmentation is seeded per sample from (seed, epoch, index).

    Augmentations that draw from torch's global RNG would otherwise depend on when a batch is
    produced. Accelerate's loader fetches one batch ahead, so after a resume the batch after the
    checkpoint would be augmented from another RNG state; worker processes would differ too.
    """

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset = dataset
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.dataset)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, index: int):
        # Only the CPU generator: torch.manual_seed would also reset the GPUs' RNG on every sample.
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed((self.seed * 1_000_003 + self.epoch) * 1_000_033 + index)
            return self.dataset[index]


class BatchStream:
    """Training batches forever, one pass over the loader per epoch, with a restorable position.

    The position is the epoch, the batches already taken from it and the shuffling generator's
    state at the start of the epoch. Restoring replays the epoch's shuffle and skips the batches
    taken, under a forked RNG, so the global RNG state from the checkpoint is left untouched.
    """

    def __init__(self, loader, generator: torch.Generator, samples: Dataset | None = None):
        self.loader = loader
        self.generator = generator
        self.samples = samples
        self.epoch = 0
        self.position = 0
        self.epoch_start_state = generator.get_state()
        self._iterator = None

    def __next__(self):
        while True:
            if self._iterator is None:
                self._start_epoch()
            try:
                batch = next(self._iterator)
            except StopIteration:
                self._iterator = None
                self.epoch += 1
                self.position = 0
                continue
            self.position += 1
            return batch

    def _start_epoch(self) -> None:
        if hasattr(self.loader, "set_epoch"):
            self.loader.set_epoch(self.epoch)
        if isinstance(self.samples, SeededSamples):
            self.samples.set_epoch(self.epoch)
        self.epoch_start_state = self.generator.get_state()
        self._iterator = iter(self.loader)

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "epoch_start_generator_state": self.epoch_start_state.tolist(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.epoch = state["epoch"]
        self.generator.set_state(generator_state_from_list(state["epoch_start_generator_state"]))
        # Starting the epoch draws the loader's base seed, which the interrupted run drew before
        # its checkpoint. So the restart and the skipped batches run under a forked RNG.
        with torch.random.fork_rng(devices=[]):
            self._start_epoch()
            for _ in range(state["position"]):
                next(self._iterator)
        self.position = state["position"]


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


def _describe_optimizer(optimizer) -> str:
    """Name the optimizer classes behind ``optimizer`` (Accelerate, smoothing and combined layers included)."""
    inner = getattr(optimizer, "optimizer", optimizer)
    parts = []
    if isinstance(inner, SmoothedOptimizer):
        parts.append(f"SmoothedOptimizer({inner.config.operator})")
        inner = inner.base
    parts.extend(type(opt).__name__ for opt in getattr(inner, "optimizers", [inner]))
    return "+".join(parts)


def evaluate_round(
    task: Task,
    model,
    loaders: dict,
    step: int,
    accelerator: Accelerator,
    run_dir: Path,
    diagnostics: DepthDiagnostics | None = None,
) -> dict[str, float]:
    """Evaluate every split in ``loaders``, the task's whole-model metrics and the depth diagnostics, with its evaluation weights."""
    unwrapped = accelerator.unwrap_model(model)
    metrics: dict[str, float] = {}
    with task.evaluation_weights(unwrapped):
        for split, loader in loaders.items():
            metrics.update(evaluate(task, model, loader, split, accelerator))
        model.eval()
        with torch.no_grad():
            metrics.update(task.evaluate_model(unwrapped, step, accelerator, run_dir))
            if diagnostics is not None:
                metrics.update(diagnostics.measure_representations(unwrapped, step))
        model.train()
    return metrics


def _build(task_settings, model_settings, data_settings, optim, smoothing, trainer, seed):
    """Build the task, model, data loaders, (smoothed) optimizer and LR schedule."""
    task = build_task(task_settings, model_settings, data_settings)
    model = task.build_model()
    generator = torch.Generator().manual_seed(seed)
    train_loader = DataLoader(
        SeededSamples(task.train_dataset, seed),
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
    return task, model, train_loader, generator, eval_loaders, optimizer, scheduler


def train(
    task_settings,
    model_settings,
    data_settings,
    optim: OptimConfig,
    smoothing: SmoothingConfig,
    trainer: TrainerConfig,
    seed: int,
    run_dir: Path,
    logger: LoggerConfig | None = None,
    run_info: dict | None = None,
    diagnostics: DiagnosticsConfig | None = None,
) -> dict[str, float]:
    """Train one run and return its final metrics (also written to ``results.json``).

    ``run_info`` names the run for trackers: ``name``, ``group``, ``id`` and the resolved
    ``config`` as a plain dict.
    """
    logger = logger or LoggerConfig()
    diagnostics = diagnostics or DiagnosticsConfig()
    run_info = run_info or {}
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
        log_with="wandb" if logger.name == "wandb" else None,
    )
    set_seed(seed)
    main = accelerator.is_main_process

    # Build the task, model, data, optimizer and schedule. Every invalid setting fails here,
    # before any training step.
    try:
        task, model, train_loader, generator, eval_loaders, optimizer, scheduler = _build(
            task_settings, model_settings, data_settings, optim, smoothing, trainer, seed
        )
        resume_from = resolve_resume(trainer.resume, run_dir)
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
    depth = DepthDiagnostics(
        diagnostics, task, accelerator.unwrap_model(model), optimizer, smoothing, run_dir, main, accelerator.device
    )

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

    if logger.name == "wandb":
        wandb_settings = {
            "mode": wandb_mode(logger),
            "dir": str(run_dir),
            "name": run_info.get("name"),
            "group": run_info.get("group"),
            "id": run_info.get("id"),
            "entity": logger.entity,
            "tags": logger.tags,
        }
        accelerator.init_trackers(logger.project, config=run_info.get("config"), init_kwargs={"wandb": wandb_settings})
    metrics_log = MetricsLog(run_dir, enabled=main, accelerator=accelerator)
    batches = BatchStream(train_loader, generator, train_loader.dataset)
    step = 0
    loss_sum = torch.zeros((), device=accelerator.device)
    micro_batches = 0
    grad_norm = None

    # Resume: model, optimizer (with the smoothing wrapper) and RNG states through Accelerate, then
    # the schedule, the data position, the partial loss sum and the task's own state.
    if resume_from is not None:
        try:
            state, task_state = load_checkpoint(accelerator, resume_from)
        except ValueError as error:
            raise ConfigError(str(error)) from error
        written_by, used_now = state.get("optimizer"), _describe_optimizer(optimizer)
        if written_by != used_now:
            raise ConfigError(
                f"checkpoint {resume_from} was written by optimizer {written_by}, but this run uses {used_now}; "
                "resume with the same optim and smoothing settings"
            )
        step = state["step"]
        scheduler.load_state_dict(state["scheduler"])
        batches.load_state_dict(state["batches"])
        loss_sum.fill_(state["loss_sum"])
        micro_batches = state["micro_batches"]
        task.load_state_dict(task_state)
        metrics_log.restore(resume_from.parent.parent / "metrics.jsonl", state["metrics_rows"])
        depth.restore(step)
        log.info("resumed from %s at step %d", resume_from, step)
    else:
        metrics_log.restore(None, 0)

    def checkpoint() -> Path:
        state = {
            "step": step,
            "scheduler": scheduler.state_dict(),
            "batches": batches.state_dict(),
            "loss_sum": loss_sum.item(),
            "micro_batches": micro_batches,
            "metrics_rows": len(metrics_log.history),
            "optimizer": _describe_optimizer(optimizer),
        }
        return save_checkpoint(
            accelerator, run_dir / CHECKPOINT_DIR, step, state, task.state_dict(), trainer.keep_checkpoints
        )

    stop = StopSignal(accelerator)
    # Throughput counts from here, so the first line after a resume is not inflated.
    last_log_time, last_log_step = time.perf_counter(), step
    # disable=None lets tqdm hide the bar when stderr is not a terminal (CI logs, SLURM files).
    show_bar = main and trainer.progress_bar
    progress = tqdm(total=trainer.max_steps, disable=None if show_bar else True, desc=task.name, dynamic_ncols=True)

    model.train()
    progress.update(step)
    with logging_redirect_tqdm(), stop:
        while step < trainer.max_steps:
            # Forward and backward one micro-batch; the optimizer steps at the end of the window.
            batch = next(batches)
            with accelerator.accumulate(model):
                loss = task.training_step(model, batch)
                accelerator.backward(loss)
                if accelerator.sync_gradients and trainer.grad_clip > 0:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), trainer.grad_clip)
                probing = accelerator.sync_gradients and depth.wants_update(step + 1)
                if probing:
                    depth.start_update()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            loss_sum += loss.detach()
            micro_batches += 1
            if not accelerator.sync_gradients:
                continue

            # One real optimizer step has happened.
            scheduler.step()
            task.after_optimizer_step(accelerator.unwrap_model(model))
            step += 1
            progress.update(1)
            if not torch.isfinite(loss.detach()).all():
                raise FloatingPointError(
                    f"training loss is {loss.item()} at step {step}; the run stops and keeps its last "
                    "checkpoint. Lower optim.lr or enable trainer.grad_clip"
                )

            # Log.
            if probing:
                metrics_log.write(step, depth.finish_update(step))
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
                val_loaders = {"val": eval_loaders["val"]}
                metrics_log.write(step, evaluate_round(task, model, val_loaders, step, accelerator, run_dir, depth))

            # Checkpoint, periodically and at the end, or now when SIGTERM or SIGINT arrived.
            if trainer.checkpoint_every and (step % trainer.checkpoint_every == 0 or step == trainer.max_steps):
                checkpoint()
            if stop.requested():
                path = checkpoint()
                log.error(
                    "received %s at step %d; saved %s. Continue with trainer.resume=auto and the same hydra.run.dir",
                    stop.name, step, path,
                )
                raise SystemExit(128 + stop.signum)
    progress.close()

    # Final evaluation on every held-out split, results and weights.
    final = evaluate_round(task, model, eval_loaders, step, accelerator, run_dir, depth)
    metrics_log.write(step, final)

    if main:
        write_json(
            run_dir / "results.json",
            {"task": task.name, "metric": task.metric, "metric_mode": task.metric_mode, "step": step, **final},
        )
        plot_history(metrics_log.history, run_dir / "curves.png", title=str(run_dir))
        depth.plot()
        if logger.name == "wandb" and (run_dir / "curves.png").exists():
            import wandb

            accelerator.get_tracker("wandb", unwrap=True).log({"plots/curves": wandb.Image(str(run_dir / "curves.png"))})
        task.after_training(accelerator.unwrap_model(model), run_dir)
    if trainer.save_model:
        accelerator.wait_for_everyone()
        accelerator.save_model(model, run_dir, safe_serialization=True)
        extra = task.extra_weights(accelerator.unwrap_model(model))
        if main:
            for name, state in extra.items():
                tensors = {key: value.detach().contiguous().cpu() for key, value in state.items()}
                save_file(tensors, run_dir / f"{name}.safetensors")
    accelerator.end_training()
    return final
