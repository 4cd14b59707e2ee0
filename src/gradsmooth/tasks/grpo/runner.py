"""Run GRPO with TRL's ``GRPOTrainer`` and the suite's optimizer, run directory and metrics.

TRL owns the loop: generation, rewards, advantages, the clipped policy loss and the optimizer
steps. The suite builds the optimizer (``build_optimizer`` wrapped by ``smooth``) and its LR
schedule and passes both through ``optimizers=``, so TRL steps the smoothed optimizer. A
:class:`SuiteCallback` renames TRL's logged values to the suite's ``split/name`` metrics, writes
them to ``metrics.jsonl`` with the console line, and measures greedy held-out accuracy before
training, every ``trainer.eval_every`` steps and at the end.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

import torch
from transformers import PrinterCallback, TrainerCallback

from gradsmooth.optim import OptimConfig, build_optimizer, build_scheduler
from gradsmooth.smoothing import SmoothedOptimizer, SmoothingConfig, smooth
from gradsmooth.tasks.base import settings_from
from gradsmooth.tasks.grpo.config import GRPOTaskConfig, PolicyConfig, check_generation_batch, check_policy_path
from gradsmooth.tasks.grpo.problems import (
    DATA_CONFIGS,
    ArithmeticDataConfig,
    Problem,
    answer_format_of,
    has_answer_format,
    is_correct,
    load_problems,
)
from gradsmooth.training.errors import ConfigError
from gradsmooth.training.metrics import LoggerConfig, MetricsLog, plot_history, wandb_mode
from gradsmooth.training.rundir import write_json

log = logging.getLogger("gradsmooth")

METRIC = "val/acc"
# TRL 1.16 log keys -> the suite's metric names; keys not listed here are not recorded.
TRL_METRICS = {
    "loss": "train/loss",
    "grad_norm": "train/grad_norm",
    "learning_rate": "optim/lr",
    "reward": "train/reward",
    "reward_std": "train/reward_std",
    "frac_reward_zero_std": "train/frac_reward_zero_std",
    "completions/mean_length": "completions/mean_length",
    "completions/clipped_ratio": "completions/clipped_ratio",
    "kl": "train/kl",
    "entropy": "train/entropy",
    "clip_ratio/region_mean": "train/clip_ratio",
    "rewards/correct_reward/mean": "train/reward_correct",
    "rewards/format_reward/mean": "train/reward_format",
}


def correct_reward(prompts, completions, answer, answer_format: str, **kwargs) -> list[float]:
    """Return 1.0 for each completion whose parsed final answer equals its problem's answer, else 0.0."""
    return [float(is_correct(_text(c), a, answer_format)) for c, a in zip(completions, answer)]


def format_reward(prompts, completions, answer_format: str, **kwargs) -> list[float]:
    """Return 1.0 for each completion that states an answer in the parseable format, right or wrong."""
    return [float(has_answer_format(_text(c), answer_format)) for c in completions]


def _text(completion) -> str:
    """Return a completion's text; chat prompts give completions as a list of messages."""
    if isinstance(completion, list):
        return "".join(message.get("content", "") for message in completion)
    return completion


def use_chat_template(task: GRPOTaskConfig, tokenizer) -> bool:
    if task.prompt_format == "auto":
        return getattr(tokenizer, "chat_template", None) is not None
    if task.prompt_format == "chat" and getattr(tokenizer, "chat_template", None) is None:
        raise ConfigError("task.prompt_format=chat, but the policy's tokenizer has no chat template; use text or auto")
    return task.prompt_format == "chat"


def render_prompt(tokenizer, prompt: str, chat: bool) -> str:
    """Return the text the policy is conditioned on: the prompt, or the chat template applied to it."""
    if not chat:
        return prompt
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)


@torch.no_grad()
def greedy_accuracy(model, tokenizer, problems: list[Problem], answer_format: str, max_new_tokens: int, batch_size: int, chat: bool) -> dict[str, float]:
    """Decode every problem greedily and return ``val/acc``, ``val/format`` and ``val/mean_length`` (tokens)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    correct = formatted = tokens = 0
    try:
        for start in range(0, len(problems), batch_size):
            batch = problems[start : start + batch_size]
            texts = [render_prompt(tokenizer, p.prompt, chat) for p in batch]
            inputs = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            output = model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            completions = output[:, inputs["input_ids"].shape[1] :]
            for problem, ids in zip(batch, completions):
                ended = (ids == tokenizer.eos_token_id).nonzero()
                length = int(ended[0]) + 1 if len(ended) else len(ids)
                text = tokenizer.decode(ids[:length], skip_special_tokens=True)
                correct += is_correct(text, problem.answer, answer_format)
                formatted += has_answer_format(text, answer_format)
                tokens += length
    finally:
        tokenizer.padding_side = padding_side
        model.train(was_training)
    count = max(len(problems), 1)
    return {"val/acc": correct / count, "val/format": formatted / count, "val/mean_length": tokens / count}


class _WandbTracker:
    """The ``log(values, step)`` interface of Accelerate's trackers, over an open W&B run."""

    def __init__(self, run):
        self.run = run

    def log(self, values: dict, step: int) -> None:
        self.run.log(values, step=step)


class SuiteCallback(TrainerCallback):
    """Record TRL's logs as suite metrics and measure greedy held-out accuracy during training."""

    def __init__(self, metrics_log: MetricsLog, evaluate, eval_every: int, max_steps: int):
        self.metrics_log = metrics_log
        self.evaluate = evaluate
        self.eval_every = eval_every
        self.max_steps = max_steps
        self.initial: dict[str, float] = {}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.initial = self.evaluate(model)
        self.metrics_log.write(state.global_step, self.initial)

    def on_log(self, args, state, control, logs=None, **kwargs):
        row = {name: float(logs[key]) for key, name in TRL_METRICS.items() if logs and logs.get(key) is not None}
        if row:
            self.metrics_log.write(state.global_step, row)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        step = state.global_step
        if step % self.eval_every == 0 and step != self.max_steps:
            self.metrics_log.write(step, self.evaluate(model))


def load_settings(task_settings, policy_settings, data_settings) -> tuple[GRPOTaskConfig, PolicyConfig, object]:
    """Build the task, policy and data settings of a GRPO run, raising ``ValueError`` on any invalid one."""
    task = settings_from(GRPOTaskConfig, task_settings, "task")
    if policy_settings is None:
        raise ValueError("task=grpo needs the policy settings; compose it with the policy group (policy=warm_start)")
    policy = settings_from(PolicyConfig, policy_settings, "policy")
    name = data_settings["name"] if isinstance(data_settings, dict) else data_settings.name
    if name not in DATA_CONFIGS:
        raise ValueError(f"data.name must be one of {', '.join(DATA_CONFIGS)} for task=grpo; got {name!r}")
    data = settings_from(DATA_CONFIGS[name], data_settings, "data")
    if policy.path is None and not isinstance(data, ArithmeticDataConfig):
        raise ValueError(
            f"data={name} needs a pretrained policy in policy.path (e.g. Qwen/Qwen2.5-0.5B-Instruct); "
            "the warm start (policy.path=null) covers only data=arithmetic"
        )
    if policy.path is not None:
        check_policy_path(policy.path)
    return task, policy, data


def load_policy(path: str | Path, dtype: str):
    """Load a causal LM and its tokenizer (padding on the left) from a directory or hub id."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch_dtype)
    except (OSError, ValueError) as error:
        raise ConfigError(f"policy.path {str(path)!r} could not be loaded as a causal LM with its tokenizer: {error}") from error
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"the tokenizer at policy.path {str(path)!r} has no end-of-text (eos) token")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return model, tokenizer


def _grpo_args(task: GRPOTaskConfig, optim: OptimConfig, trainer, seed: int, run_dir: Path, answer_format: str):
    """Return TRL's ``GRPOConfig`` with every setting that changes the run given explicitly."""
    from trl import GRPOConfig

    use_cpu = trainer.cpu or not torch.cuda.is_available()
    reward_weights = [task.correct_reward] + ([task.format_reward] if task.format_reward > 0 else [])
    return GRPOConfig(
        output_dir=str(run_dir / "trl"),
        # Loop, batch and logging.
        max_steps=trainer.max_steps,
        per_device_train_batch_size=task.batch_size,
        gradient_accumulation_steps=trainer.grad_accum_steps,
        max_grad_norm=trainer.grad_clip if trainer.grad_clip > 0 else None,
        learning_rate=optim.lr,
        logging_steps=trainer.log_every,
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        disable_tqdm=not trainer.progress_bar,
        dataloader_num_workers=trainer.num_workers,
        seed=seed,
        data_seed=seed,
        use_cpu=use_cpu,
        bf16=trainer.mixed_precision == "bf16",
        fp16=trainer.mixed_precision == "fp16",
        activation_checkpointing=False,
        # GRPO.
        num_generations=task.num_generations,
        max_completion_length=task.max_completion_length,
        temperature=task.temperature,
        top_p=task.top_p,
        top_k=task.top_k,
        beta=task.beta,
        epsilon=task.epsilon,
        epsilon_high=task.epsilon,
        loss_type=task.loss_type,
        scale_rewards=task.scale_rewards,
        num_iterations=task.num_iterations,
        importance_sampling_level="token",
        multi_objective_aggregation="sum_then_normalize",
        reward_weights=reward_weights,
        mask_truncated_completions=task.mask_truncated_completions,
        shuffle_dataset=True,
        remove_unused_columns=False,
        disable_dropout=True,
        log_completions=False,
        use_vllm=False,
    )


def train_grpo(
    task_settings,
    model_settings,
    data_settings,
    optim: OptimConfig,
    smoothing: SmoothingConfig,
    trainer,
    seed: int,
    run_dir: Path,
    logger: LoggerConfig | None = None,
    run_info: dict | None = None,
    policy_settings=None,
) -> dict[str, float]:
    """Post-train a policy with GRPO and return its final metrics (also written to ``results.json``).

    Takes the shared loop's arguments plus ``policy_settings``, the policy to start from.

    Every invalid setting raises :class:`ConfigError` before any model is built or trained.
    """
    from datasets import Dataset
    from trl import GRPOTrainer

    from gradsmooth.models.causal_lm import CausalLMConfig
    from gradsmooth.tasks.grpo.warm_start import warm_start_policy

    logger = logger or LoggerConfig()
    run_info = run_info or {}
    run_dir = Path(run_dir)

    # Check every setting before any model is built.
    try:
        task, policy, data = load_settings(task_settings, policy_settings, data_settings)
        model_config = settings_from(CausalLMConfig, model_settings, "model")
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        # NOTE: every process would write metrics and results, so GRPO is limited to one process.
        if world_size > 1:
            raise ValueError(f"task=grpo runs on one process; it was launched on {world_size} (WORLD_SIZE)")
        check_generation_batch(task, trainer.grad_accum_steps, world_size)
        # NOTE: resuming GRPO is not supported: TRL would need the run's checkpoints, which
        # this runner does not write (save_strategy="no").
        if trainer.resume:
            raise ValueError("trainer.resume is not supported for task=grpo; start a new run instead")
    except ValueError as error:
        raise ConfigError(str(error)) from error
    if trainer.threads:
        torch.set_num_threads(trainer.threads)
    answer_format = answer_format_of(data)

    # Problems, then the policy: loaded from policy.path or warm-started (and cached) here.
    try:
        train_problems, val_problems = load_problems(data)
    except ValueError as error:
        raise ConfigError(str(error)) from error
    log.info("problems: %d training, %d held out (%s)", len(train_problems), len(val_problems), data.name)
    path = policy.path or warm_start_policy(model_config, data, policy, trainer)
    model, tokenizer = load_policy(path, policy.dtype)
    chat = use_chat_template(task, tokenizer)
    torch.manual_seed(seed)

    # The suite's optimizer: the base optimizer, wrapped by smoothing unless it is off.
    try:
        optimizer = smooth(build_optimizer(optim, model), model, smoothing)
    except ValueError as error:
        raise ConfigError(str(error)) from error
    scheduler = build_scheduler(optim, optimizer, trainer.max_steps)
    if isinstance(optimizer, SmoothedOptimizer):
        table = optimizer.describe(model)
        log.info("smoothing %s over stacks:\n%s", optimizer.config, table)
        (run_dir / "stacks.txt").write_text(table + "\n")
    else:
        log.info("smoothing off (baseline)")

    prompts = [problem.prompt for problem in train_problems]
    if chat:
        prompts = [[{"role": "user", "content": prompt}] for prompt in prompts]
    dataset = Dataset.from_dict({"prompt": prompts, "answer": [problem.answer for problem in train_problems]})
    rewards = [functools.partial(correct_reward, answer_format=answer_format)]
    if task.format_reward > 0:
        rewards.append(functools.partial(format_reward, answer_format=answer_format))

    tracker = None
    if logger.name == "wandb":
        # NOTE: no test covers logger=wandb for task=grpo; the shared loop's W&B test does not reach here.
        import wandb

        wandb_run = wandb.init(
            project=logger.project,
            entity=logger.entity,
            name=run_info.get("name"),
            group=run_info.get("group"),
            id=run_info.get("id"),
            dir=str(run_dir),
            mode=wandb_mode(logger),
            config=run_info.get("config"),
            tags=logger.tags,
        )
        tracker = _WandbTracker(wandb_run)
    metrics_log = MetricsLog(run_dir, enabled=True, accelerator=tracker)
    metrics_log.restore(None, 0)

    eval_batch_size = data.eval_batch_size

    def evaluate(current_model) -> dict[str, float]:
        return greedy_accuracy(current_model, tokenizer, val_problems, answer_format, task.max_completion_length, eval_batch_size, chat)

    callback = SuiteCallback(metrics_log, evaluate, trainer.eval_every, trainer.max_steps)
    grpo = GRPOTrainer(
        model=model,
        reward_funcs=rewards,
        args=_grpo_args(task, optim, trainer, seed, run_dir, answer_format),
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[callback],
        optimizers=(optimizer, scheduler),
    )
    # The suite's callback writes the console line; TRL's would print every log dict again.
    grpo.remove_callback(PrinterCallback)
    log.info(
        "***** GRPO: %s parameters, %d prompts of %d completions per step, %d steps, policy %s *****",
        f"{sum(p.numel() for p in model.parameters()):,}",
        task.batch_size * trainer.grad_accum_steps * world_size // task.num_generations,
        task.num_generations,
        trainer.max_steps,
        path,
    )
    grpo.train()

    # Final held-out accuracy, results and weights.
    final = evaluate(grpo.model)
    metrics_log.write(grpo.state.global_step, final)
    final[f"{METRIC}_initial"] = callback.initial.get(METRIC, float("nan"))
    write_json(
        run_dir / "results.json",
        {"task": "grpo", "metric": METRIC, "metric_mode": "max", "step": grpo.state.global_step, "policy": str(path), **final},
    )
    plot_history(metrics_log.history, run_dir / "curves.png", title=str(run_dir))
    if trainer.save_model:
        grpo.model.save_pretrained(str(run_dir / "policy"), safe_serialization=True)
        tokenizer.save_pretrained(str(run_dir / "policy"))
    if tracker is not None:
        tracker.run.finish()
    return final
