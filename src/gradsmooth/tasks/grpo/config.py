"""GRPO settings and the checks that run before any model is built.

Every GRPO knob that changes the result is set here and passed to TRL explicitly, so a TRL
release that changes a default does not change a run (TRL 1.16, for example, defaults to
``loss_type="dapo"`` and ``beta=0.0``).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

# TRL 1.16's GRPOConfig.loss_type and scale_rewards choices.
LOSS_TYPES = ("grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo", "luspo", "vespo")
REWARD_SCALINGS = ("group", "batch", "none")
PROMPT_FORMATS = ("auto", "text", "chat")
# owner/name on the Hugging Face Hub (or a bare legacy name such as "gpt2").
_HUB_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}$")


@dataclass
class GRPOTaskConfig:
    """GRPO settings (TRL ``GRPOConfig`` names in brackets).

    num_generations: completions sampled per prompt, the group size [num_generations].
    batch_size: completions per process per micro-step [per_device_train_batch_size]. One
        generation batch is ``batch_size * trainer.grad_accum_steps * processes`` completions,
        which ``num_generations`` must divide.
    beta: KL coefficient against the frozen starting policy; 0 loads no reference model [beta].
    epsilon: clipping range of the importance ratio [epsilon].
    loss_type: how token losses are aggregated: grpo, dr_grpo, dapo, bnpo, ... [loss_type].
    scale_rewards: divide advantages by the reward std of the ``group``, the ``batch`` or ``none``.
    num_iterations: optimisation passes over each generation batch [num_iterations].
    max_completion_length: maximum new tokens per completion [max_completion_length].
    temperature, top_p, top_k: sampling of the training completions; evaluation is greedy.
    correct_reward: reward for an exactly correct final answer in the parseable format.
    format_reward: reward for a parseable answer whether right or wrong; 0 turns it off.
    prompt_format: ``text`` feeds the prompt as is, ``chat`` through the tokenizer's chat
        template, ``auto`` uses the template when the tokenizer has one.
    mask_truncated_completions: leave completions cut at ``max_completion_length`` out of the loss.
    """

    name: str = "grpo"
    num_generations: int = 8
    batch_size: int = 32
    beta: float = 0.0
    epsilon: float = 0.2
    loss_type: str = "dapo"
    scale_rewards: str = "group"
    num_iterations: int = 1
    max_completion_length: int = 48
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    correct_reward: float = 1.0
    format_reward: float = 0.0
    prompt_format: str = "auto"
    mask_truncated_completions: bool = False

    def __post_init__(self) -> None:
        if self.num_generations < 2:
            raise ValueError(
                f"task.num_generations must be >= 2: GRPO's advantage compares a completion with the rest of its group; "
                f"got {self.num_generations}"
            )
        for key in ("batch_size", "num_iterations", "max_completion_length"):
            if getattr(self, key) < 1:
                raise ValueError(f"task.{key} must be >= 1; got {getattr(self, key)}")
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"task.loss_type must be one of {', '.join(LOSS_TYPES)}; got {self.loss_type!r}")
        if self.scale_rewards not in REWARD_SCALINGS:
            raise ValueError(f"task.scale_rewards must be one of {', '.join(REWARD_SCALINGS)}; got {self.scale_rewards!r}")
        if self.prompt_format not in PROMPT_FORMATS:
            raise ValueError(f"task.prompt_format must be one of {', '.join(PROMPT_FORMATS)}; got {self.prompt_format!r}")
        if self.beta < 0:
            raise ValueError(f"task.beta must be >= 0; got {self.beta}")
        if not self.epsilon > 0:
            raise ValueError(f"task.epsilon must be > 0; got {self.epsilon}")
        if not self.temperature > 0:
            raise ValueError(f"task.temperature must be > 0; got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"task.top_p must be in (0, 1]; got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"task.top_k must be >= 0; got {self.top_k}")
        if self.correct_reward <= 0:
            raise ValueError(f"task.correct_reward must be > 0; got {self.correct_reward}")
        if self.format_reward < 0:
            raise ValueError(f"task.format_reward must be >= 0; got {self.format_reward}")


@dataclass
class PolicyConfig:
    """The policy GRPO starts from.

    path: a local directory saved with ``save_pretrained`` (``config.json`` and a tokenizer) or a
        Hugging Face Hub id such as ``Qwen/Qwen2.5-0.5B-Instruct``; null builds the ``model``
        config and warm-starts it on the arithmetic generator's worked solutions.
    dtype: weights dtype of a loaded policy: ``float32``, ``bfloat16`` or ``auto`` (the checkpoint's).
    warm_start_steps: optimizer steps of the supervised warm start.
    warm_start_lr: peak AdamW learning rate of the warm start (linear warmup, cosine decay).
    warm_start_batch_size: worked solutions per warm-start step.
    warm_start_seed: seed of the warm start, the same for every GRPO seed so that a sweep's
        seeds share one starting policy.
    cache_dir: where warm-started policies are cached; null uses ``$GRADSMOOTH_CACHE`` or
        ``~/.cache/gradsmooth``.
    """

    name: str = "warm_start"
    path: Optional[str] = None
    dtype: str = "float32"
    warm_start_steps: int = 300
    warm_start_lr: float = 3e-3
    warm_start_batch_size: int = 64
    warm_start_seed: int = 0
    cache_dir: Optional[str] = None

    def __post_init__(self) -> None:
        if self.dtype not in ("float32", "bfloat16", "auto"):
            raise ValueError(f"policy.dtype must be one of float32, bfloat16, auto; got {self.dtype!r}")
        for key in ("warm_start_steps", "warm_start_batch_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"policy.{key} must be >= 1; got {getattr(self, key)}")
        if not self.warm_start_lr > 0:
            raise ValueError(f"policy.warm_start_lr must be > 0; got {self.warm_start_lr}")


def check_generation_batch(task: GRPOTaskConfig, grad_accum_steps: int, processes: int) -> int:
    """Return the completions per generation batch, raising when ``num_generations`` does not divide it.

    TRL 1.16 generates ``per_device_train_batch_size * processes * steps_per_generation``
    completions at once, ``steps_per_generation`` defaulting to the gradient accumulation steps,
    and each prompt's group must fit whole in one generation batch.
    """
    per_batch = processes * grad_accum_steps
    total = task.batch_size * per_batch
    if total % task.num_generations == 0:
        return total

    step = task.num_generations // math.gcd(task.num_generations, per_batch)
    lower = (task.batch_size // step) * step
    sizes = [size for size in (lower, lower + step) if size >= 1]
    divisors = [g for g in range(2, total + 1) if total % g == 0]
    below = [g for g in divisors if g < task.num_generations][-1:]
    above = [g for g in divisors if g > task.num_generations][:1]
    suggestions = [" or ".join(f"task.batch_size={size}" for size in sizes)]
    if below or above:
        suggestions.append(" or ".join(f"task.num_generations={g}" for g in below + above))
    raise ValueError(
        f"task.num_generations={task.num_generations} does not divide the generation batch of "
        f"task.batch_size ({task.batch_size}) x trainer.grad_accum_steps ({grad_accum_steps}) x processes ({processes}) "
        f"= {total} completions, so a prompt's group would be split; nearest valid settings: {'; '.join(suggestions)}"
    )


def check_policy_path(path: str) -> str:
    """Return ``"local"`` or ``"hub"`` for ``policy.path``, raising when it cannot be a causal LM.

    A local directory must contain ``config.json``. A hub id must be well formed, and with
    ``HF_HUB_OFFLINE=1`` it must already be in the local hub cache.
    """
    local = Path(path).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ValueError(
                f"policy.path {path!r} is a directory without config.json; point it at a model saved with save_pretrained"
            )
        return "local"
    # A hub id has at most one slash; anything else names a local path.
    looks_local = path.startswith((".", "/", "~")) or path.count("/") > 1
    if looks_local or local.exists():
        raise ValueError(f"policy.path {path!r} is not an existing model directory; check the path")
    if not _HUB_ID.match(path) or "--" in path or ".." in path:
        raise ValueError(
            f"policy.path {path!r} is neither a local model directory nor a Hugging Face Hub id such as "
            "'Qwen/Qwen2.5-0.5B-Instruct'"
        )
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(path, "config.json"), str):
            raise ValueError(
                f"policy.path {path!r} is a Hugging Face Hub id, but the hub is offline (HF_HUB_OFFLINE=1) and the "
                "model is not in the local hub cache; download it first or set policy.path to a local directory"
            )
    return "hub"
