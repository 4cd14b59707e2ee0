"""The warm start: a small causal LM trained briefly on worked solutions, cached on disk.

The policy is built with the LM runner's code (:func:`build_causal_lm` on the ``model`` config,
the byte tokenizer) and trained by the shared training loop on ``prompt + solution`` sequences,
with the loss on the solution tokens only. It is saved with ``save_pretrained`` (model and
tokenizer) under ``<cache>/grpo-warm-start/<key>``, the key being a hash of every setting that
changes the weights, so a second GRPO run with the same settings loads it instead of training.
The directory is written under a temporary name and renamed into place when complete, so jobs
running in parallel never read a half-written policy.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch.utils.data import Dataset

from gradsmooth.data.text import default_cache_dir
from gradsmooth.data.tokenizer import TokenizerConfig, get_tokenizer
from gradsmooth.models.causal_lm import CausalLMConfig, build_causal_lm
from gradsmooth.optim import OptimConfig
from gradsmooth.smoothing import SmoothingConfig
from gradsmooth.tasks.base import Task
from gradsmooth.tasks.grpo.problems import ArithmeticDataConfig, Problem, arithmetic_splits

log = logging.getLogger("gradsmooth")

# Raise when the warm-start recipe changes, so older cached policies are not reused.
WARM_START_VERSION = 1
IGNORE_INDEX = -100


def byte_tokenizer():
    """Return the LM runner's byte tokenizer (257 ids), padding on the left as batched generation needs."""
    tokenizer = get_tokenizer(TokenizerConfig(kind="bytes"), [], Path("."))
    tokenizer.padding_side = "left"
    return tokenizer


class WorkedSolutions(Dataset):
    """``prompt + solution + end-of-text`` token sequences, right-padded; labels only on the solution."""

    def __init__(self, problems: list[Problem], tokenizer):
        eos = tokenizer.eos_token_id
        rows = []
        for problem in problems:
            prompt = tokenizer(problem.prompt, add_special_tokens=False)["input_ids"]
            solution = tokenizer(problem.solution, add_special_tokens=False)["input_ids"] + [eos]
            rows.append((prompt + solution, [IGNORE_INDEX] * len(prompt) + solution))
        self.length = max(len(ids) for ids, _ in rows)
        self.input_ids = torch.full((len(rows), self.length), eos, dtype=torch.long)
        self.labels = torch.full((len(rows), self.length), IGNORE_INDEX, dtype=torch.long)
        for index, (ids, labels) in enumerate(rows):
            self.input_ids[index, : len(ids)] = torch.tensor(ids)
            self.labels[index, : len(labels)] = torch.tensor(labels)

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[index], "labels": self.labels[index]}


@dataclasses.dataclass
class WarmStartSettings:
    """Settings of :class:`WarmStartTask`, built by :func:`warm_start_policy` rather than from a config file."""

    name: str
    train: list[Problem]
    val: list[Problem]
    batch_size: int


class WarmStartTask(Task):
    """Supervised training on worked solutions, for the shared loop; reports ``val/loss`` per solution token."""

    name = "grpo_warm_start"
    metric = "val/loss"
    metric_mode = "min"

    def __init__(self, task_settings: WarmStartSettings, model_settings: CausalLMConfig, data_settings):
        self.model_config = model_settings
        self.tokenizer = byte_tokenizer()
        self.train_dataset = WorkedSolutions(task_settings.train, self.tokenizer)
        self.eval_datasets = {"val": WorkedSolutions(task_settings.val, self.tokenizer)}
        longest = max(self.train_dataset.length, self.eval_datasets["val"].length)
        if longest > model_settings.max_position_embeddings:
            raise ValueError(
                f"worked solutions are up to {longest} tokens, more than model.max_position_embeddings="
                f"{model_settings.max_position_embeddings}; raise it or lower data.max_steps"
            )
        self.batch_size = task_settings.batch_size
        self.eval_batch_size = 256

    def build_model(self):
        return build_causal_lm(self.model_config, len(self.tokenizer), self.tokenizer.eos_token_id)

    def _token_losses(self, model, batch):
        logits = model(input_ids=batch["input_ids"]).logits[:, :-1]
        targets = batch["labels"][:, 1:]
        losses = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="none")
        return losses.view_as(targets), targets != IGNORE_INDEX

    def training_step(self, model, batch):
        losses, mask = self._token_losses(model, batch)
        return losses.sum() / mask.sum()

    def eval_step(self, model, batch):
        losses, mask = self._token_losses(model, batch)
        return {"nats": losses.sum(dim=1), "tokens": mask.sum(dim=1).float()}

    def eval_metrics(self, totals, split):
        return {f"{split}/loss": totals["nats"] / max(totals["tokens"], 1.0)}


def warm_start_key(model: CausalLMConfig, data: ArithmeticDataConfig, policy) -> str:
    """Hash every setting that changes the warm-started weights."""
    settings = {
        "version": WARM_START_VERSION,
        "model": dataclasses.asdict(model),
        "data": {k: v for k, v in dataclasses.asdict(data).items() if k != "eval_batch_size"},
        "steps": policy.warm_start_steps,
        "lr": policy.warm_start_lr,
        "batch_size": policy.warm_start_batch_size,
        "seed": policy.warm_start_seed,
        "torch": torch.__version__.split("+")[0],
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def warm_start_policy(model: CausalLMConfig, data: ArithmeticDataConfig, policy, trainer) -> Path:
    """Return the directory of the warm-started policy, training and caching it when it is not cached yet."""
    from gradsmooth.training import TrainerConfig, train
    from gradsmooth.training.diagnostics import DiagnosticsConfig

    root = Path(policy.cache_dir) if policy.cache_dir else default_cache_dir()
    target = root / "grpo-warm-start" / warm_start_key(model, data, policy)
    if (target / "config.json").is_file():
        log.info("warm start: reusing the cached policy %s", target)
        return target

    log.info("warm start: training %s for %d steps on worked solutions into %s", model.name, policy.warm_start_steps, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        train_problems, val_problems = arithmetic_splits(data)
        settings = WarmStartSettings("grpo_warm_start", train_problems, val_problems, policy.warm_start_batch_size)
        loop = TrainerConfig(
            max_steps=policy.warm_start_steps,
            eval_every=max(policy.warm_start_steps // 4, 1),
            log_every=max(policy.warm_start_steps // 10, 1),
            cpu=trainer.cpu,
            threads=trainer.threads,
            checkpoint_every=0,
            save_model=True,
            progress_bar=trainer.progress_bar,
        )
        optim = OptimConfig(name="adamw", lr=policy.warm_start_lr, weight_decay=0.1, betas=[0.9, 0.95], warmup_steps=min(50, policy.warm_start_steps // 10))
        # No depth diagnostics: the warm start is a means to a policy, not a run to analyse.
        no_diagnostics = DiagnosticsConfig(update_every=0, representations=False)
        train(
            settings,
            model,
            None,
            optim,
            SmoothingConfig(operator="none"),
            loop,
            policy.warm_start_seed,
            scratch,
            diagnostics=no_diagnostics,
        )

        # The loop saved the weights as model.safetensors; rebuild the model around them and save
        # model and tokenizer in the Hugging Face layout that GRPOTrainer loads.
        tokenizer = byte_tokenizer()
        trained = build_causal_lm(model, len(tokenizer), tokenizer.eos_token_id)
        trained.load_state_dict(load_file(scratch / "model.safetensors"))
        trained.save_pretrained(str(scratch), safe_serialization=True)
        tokenizer.save_pretrained(str(scratch))
        try:
            os.rename(scratch, target)
        except OSError:
            # Another job finished the same warm start first; its copy is identical in settings.
            if not (target / "config.json").is_file():
                raise
            log.info("warm start: another run cached %s first; using that copy", target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target
