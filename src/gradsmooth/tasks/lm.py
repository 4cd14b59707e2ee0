"""Language-model pretraining: a decoder-only transformer trained on next-token prediction.

The embedded default trains a 6-block Llama-style model (width 128, about 1.8M parameters) with a
2,048-token byte-level BPE on Shakespeare's works, holding out Hamlet, Twelfth Night, Julius
Caesar, The Winter's Tale and the Sonnets for validation. ``data=hf_text`` reads FineWeb-Edu or
any text data set through ``datasets``. ``+experiment=lm_d12_fineweb_muon`` is the paper-scale
configuration: a 12-layer, 768-wide model under Muon for block matrices and AdamW for the rest.

Metrics: ``train/loss`` and ``val/loss`` in nats per target token, ``val/bpb`` (bits per UTF-8 byte
of the validation text, comparable across tokenizers), ``val/unigram_loss`` (the loss of the
training split's smoothed unigram distribution on the same validation tokens, a floor every
trained model must beat) and ``perf/tokens_per_s``. At the end a few samples are generated,
logged and written to ``samples.txt`` in the run directory.

Training sequences are packed windows of ``data.seq_len + 1`` tokens with no padding and no
masked targets, so every micro-batch holds exactly ``batch_size * seq_len`` target tokens. The
loop's mean of per-micro-batch mean losses is therefore the mean over all target tokens of the
accumulation window, and gradient accumulation equals one large batch.

Deviations from the paper (Meng, Sugolov and Papyan, arXiv 2606.30813) and from the authors'
nanochat-based setup:

1. The default corpus is about 5 MB of Shakespeare with a 2,048-token BPE, not FineWeb-Edu with a
   65,536-token vocabulary, and the default model has 1.8M parameters, so losses are not
   comparable to the paper's.
2. The nanochat-style model is approximated by ``LlamaForCausalLM`` (``model=nanochat_d12``): it
   uses a SwiGLU MLP instead of ReLU², RMSNorm with learned scales, and no QK normalisation or
   logit soft-capping.
3. The schedule is linear warmup then cosine decay (``optim.schedule``), not nanochat's
   constant-then-linear-warmdown schedule, and one AdamW learning rate serves the embeddings and
   the output layer, which nanochat gives separate rates.
4. The BPE is trained with ``tokenizers``' byte-level BPE on the training split, not with
   nanochat's tokenizer on FineWeb-Edu.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import List

import torch
import torch.nn.functional as F
from torch import nn

from gradsmooth.data.text import DATA_CONFIGS, PackedSequences, load_text_splits, tokenize_documents
from gradsmooth.data.tokenizer import TokenizerConfig, get_tokenizer, token_byte_lengths
from gradsmooth.models.causal_lm import CausalLMConfig, build_causal_lm, generate_samples, resolve_vocab_size
from gradsmooth.tasks.base import Task, settings_from

log = logging.getLogger("gradsmooth")


@dataclass
class LMTaskConfig:
    """LM task settings.

    tokenizer: a :class:`~gradsmooth.data.tokenizer.TokenizerConfig` mapping (kind, vocab_size,
        path, train_chars).
    samples: prompts continued by the trained model at the end of training; empty turns it off.
    sample_tokens: new tokens generated per prompt.
    temperature, top_k: sampling settings of the generated samples.
    """

    name: str = "lm"
    tokenizer: dict = field(default_factory=dict)
    samples: List[str] = field(default_factory=lambda: ["ROMEO.\n", "To be, or not", "The king"])
    sample_tokens: int = 64
    temperature: float = 0.8
    top_k: int = 40

    def __post_init__(self) -> None:
        self.tokenizer = settings_from(TokenizerConfig, self.tokenizer, "task.tokenizer")
        if self.sample_tokens < 1:
            raise ValueError(f"task.sample_tokens must be >= 1; got {self.sample_tokens}")
        if self.temperature <= 0:
            raise ValueError(f"task.temperature must be > 0; got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"task.top_k must be >= 0; got {self.top_k}")


def load_data_config(data):
    """Build the data config named by ``data.name`` (shakespeare, text_files or hf_text)."""
    name = data["name"] if isinstance(data, dict) else data.name
    if name not in DATA_CONFIGS:
        raise ValueError(f"data.name must be one of {', '.join(DATA_CONFIGS)} for task=lm; got {name!r}")
    return settings_from(DATA_CONFIGS[name], data, "data")


def unigram_loss(train_tokens: torch.Tensor, targets: torch.Tensor, vocab_size: int) -> float:
    """Return the mean cross-entropy in nats of ``targets`` under the add-one unigram of ``train_tokens``."""
    counts = torch.bincount(train_tokens.long(), minlength=vocab_size).double() + 1.0
    log_probs = counts.log() - counts.sum().log()
    return float(-log_probs[targets.long()].mean())


class LMTask(Task):
    name = "lm"
    metric = "val/bpb"
    metric_mode = "min"

    def __init__(self, task_settings, model_settings, data_settings):
        self.config = settings_from(LMTaskConfig, task_settings, "task")
        self.model_config = settings_from(CausalLMConfig, model_settings, "model")
        self.data_config = data = load_data_config(data_settings)

        if data.seq_len > self.model_config.max_position_embeddings:
            raise ValueError(
                f"data.seq_len ({data.seq_len}) exceeds the model's context, model.max_position_embeddings "
                f"({self.model_config.max_position_embeddings}); lower data.seq_len or raise the model's context"
            )

        # Corpus, tokenizer, token streams.
        splits = load_text_splits(data)
        log.info("corpus: %s", splits.description)
        self.tokenizer = get_tokenizer(self.config.tokenizer, splits.train, splits.cache_dir)
        self.vocab_size = resolve_vocab_size(self.model_config, len(self.tokenizer))
        train_tokens = tokenize_documents(self.tokenizer, splits.train)
        val_tokens = tokenize_documents(self.tokenizer, splits.val)[: data.val_tokens + 1]
        if len(val_tokens) < data.seq_len + 1:
            raise ValueError(
                f"the validation text has {len(val_tokens)} tokens, fewer than data.seq_len + 1 = {data.seq_len + 1}; "
                "lower data.seq_len or hold out more text"
            )

        # Packed datasets and the loop's interface.
        self.train_dataset = PackedSequences(train_tokens, data.seq_len)
        self.eval_datasets = {"val": PackedSequences(val_tokens, data.seq_len)}
        self.batch_size = data.batch_size
        self.eval_batch_size = data.eval_batch_size
        self.units_per_example = {"tokens": data.seq_len}
        self.token_bytes = token_byte_lengths(self.tokenizer)

        evaluated = val_tokens[1 : len(self.eval_datasets["val"]) * data.seq_len + 1]
        self.unigram_val_loss = unigram_loss(train_tokens, evaluated, self.vocab_size)
        log.info(
            "tokens: %s training (%d sequences of %d), %s validation; vocabulary %d; unigram val/loss %.4f",
            f"{len(train_tokens):,}",
            len(self.train_dataset),
            data.seq_len,
            f"{len(evaluated):,}",
            self.vocab_size,
            self.unigram_val_loss,
        )

    def build_model(self) -> nn.Module:
        return build_causal_lm(self.model_config, self.vocab_size, self.tokenizer.eos_token_id)

    def _token_losses(self, model, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, targets = batch[:, :-1], batch[:, 1:]
        logits = model(input_ids=inputs).logits
        losses = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
        return losses.view_as(targets), targets

    def training_step(self, model, batch):
        losses, _ = self._token_losses(model, batch)
        return losses.mean()

    def eval_step(self, model, batch):
        losses, targets = self._token_losses(model, batch)
        return {
            "nats": losses.sum(dim=1),
            "tokens": torch.full((len(targets),), targets.shape[1], dtype=torch.float32, device=targets.device),
            "bytes": self.token_bytes.to(targets.device)[targets].sum(dim=1).float(),
        }

    def probe_forward(self, model, batch):
        # No KV cache: the coupling measure calls each block again with the arguments it saw.
        model(input_ids=batch[:, :-1], use_cache=False)

    def eval_metrics(self, totals, split):
        return {
            f"{split}/loss": totals["nats"] / totals["tokens"],
            f"{split}/bpb": totals["nats"] / (math.log(2) * max(totals["bytes"], 1.0)),
            f"{split}/unigram_loss": self.unigram_val_loss,
        }

    def after_training(self, model, run_dir: Path) -> None:
        """Generate a continuation of each ``task.samples`` prompt, log it and write ``samples.txt``."""
        if not self.config.samples:
            return
        samples = generate_samples(
            model,
            self.tokenizer,
            list(self.config.samples),
            max_new_tokens=self.config.sample_tokens,
            temperature=self.config.temperature,
            top_k=self.config.top_k,
            seed=0,
        )
        separator = "\n" + "-" * 40 + "\n"
        for sample in samples:
            log.info("sample:\n%s", sample)
        (Path(run_dir) / "samples.txt").write_text(separator.join(samples) + "\n")
