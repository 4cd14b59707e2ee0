"""Decoder-only language models from ``transformers`` configs, randomly initialised.

``arch=llama`` builds a ``LlamaForCausalLM`` (RoPE, RMSNorm, SwiGLU MLP, no biases) and
``arch=gpt2`` a ``GPT2LMHeadModel`` (learned positions, LayerNorm, GELU MLP, biases). GPT-2 stores
its projections as ``Conv1D`` weights of shape (in, out), the transpose of ``nn.Linear``, so
Muon's shape-based learning-rate adjustment sees rows and columns swapped for ``arch=gpt2``. The vocabulary
size comes from the tokenizer unless the config fixes it, in which case the two must agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

ARCHITECTURES = ("llama", "gpt2")


@dataclass
class CausalLMConfig:
    """Shape of a decoder-only transformer.

    arch: ``llama`` or ``gpt2``.
    n_layer, d_model, n_head: blocks, width and attention heads.
    n_kv_head: key/value heads for grouped-query attention (``llama`` only); None uses ``n_head``.
    head_dim: width of one head; None uses ``d_model // n_head`` (``llama`` only, GPT-2 fixes it).
    d_ff: MLP hidden width; None uses 4 * d_model for ``gpt2`` and 8/3 * d_model rounded up to a
        multiple of 64 for ``llama`` (SwiGLU, the same parameter count as 4 * d_model GELU).
    max_position_embeddings: maximum sequence length the model accepts.
    vocab_size: None takes the tokenizer's size; a number must equal it.
    tie_word_embeddings: share the input embedding and the output layer.
    dropout: dropout on residuals, attention and embeddings.
    rope_theta: RoPE base (``llama`` only).
    initializer_range: standard deviation of the normal initialisation of weights.
    compile: wrap the model's forward in ``torch.compile``.
    """

    name: str = "llama_tiny"
    arch: str = "llama"
    n_layer: int = 6
    d_model: int = 128
    n_head: int = 4
    n_kv_head: Optional[int] = None
    head_dim: Optional[int] = None
    d_ff: Optional[int] = None
    max_position_embeddings: int = 512
    vocab_size: Optional[int] = None
    tie_word_embeddings: bool = False
    dropout: float = 0.0
    rope_theta: float = 10000.0
    initializer_range: float = 0.02
    compile: bool = False

    def __post_init__(self) -> None:
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"model.arch must be one of {', '.join(ARCHITECTURES)}; got {self.arch!r}")
        for key in ("n_layer", "d_model", "n_head", "max_position_embeddings"):
            if getattr(self, key) < 1:
                raise ValueError(f"model.{key} must be >= 1; got {getattr(self, key)}")
        for key in ("n_kv_head", "head_dim", "d_ff", "vocab_size"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ValueError(f"model.{key} must be >= 1 or null; got {value}")
        if self.head_dim is None and self.d_model % self.n_head:
            raise ValueError(f"model.d_model ({self.d_model}) must be divisible by model.n_head ({self.n_head})")
        if self.arch == "gpt2" and (self.head_dim is not None or self.n_kv_head is not None):
            raise ValueError("model.head_dim and model.n_kv_head must be null for model.arch=gpt2")
        if self.n_kv_head is not None and self.n_head % self.n_kv_head:
            raise ValueError(f"model.n_head ({self.n_head}) must be a multiple of model.n_kv_head ({self.n_kv_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout must be in [0, 1); got {self.dropout}")


def resolve_vocab_size(config: CausalLMConfig, tokenizer_size: int) -> int:
    """Return the model's vocabulary size, raising when a fixed one disagrees with the tokenizer's."""
    if config.vocab_size is None:
        return tokenizer_size
    if config.vocab_size != tokenizer_size:
        raise ValueError(
            f"model.vocab_size={config.vocab_size} disagrees with the tokenizer, which has {tokenizer_size} tokens; "
            "set model.vocab_size=null to take the tokenizer's size, or use a tokenizer of that size"
        )
    return config.vocab_size


def transformers_config(config: CausalLMConfig, vocab_size: int, eos_token_id: int):
    """Return the ``transformers`` config object for ``config``."""
    if config.arch == "llama":
        from transformers import LlamaConfig

        d_ff = config.d_ff or 64 * -(-8 * config.d_model // (3 * 64))
        return LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=config.d_model,
            intermediate_size=d_ff,
            num_hidden_layers=config.n_layer,
            num_attention_heads=config.n_head,
            num_key_value_heads=config.n_kv_head or config.n_head,
            head_dim=config.head_dim or config.d_model // config.n_head,
            max_position_embeddings=config.max_position_embeddings,
            rope_theta=config.rope_theta,
            attention_dropout=config.dropout,
            initializer_range=config.initializer_range,
            tie_word_embeddings=config.tie_word_embeddings,
            bos_token_id=eos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=eos_token_id,
        )
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=vocab_size,
        n_embd=config.d_model,
        n_layer=config.n_layer,
        n_head=config.n_head,
        n_inner=config.d_ff,
        n_positions=config.max_position_embeddings,
        resid_pdrop=config.dropout,
        embd_pdrop=config.dropout,
        attn_pdrop=config.dropout,
        initializer_range=config.initializer_range,
        tie_word_embeddings=config.tie_word_embeddings,
        bos_token_id=eos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=eos_token_id,
    )


def build_causal_lm(config: CausalLMConfig, vocab_size: int, eos_token_id: int) -> nn.Module:
    """Build a randomly initialised causal LM; the caller seeds ``torch`` for reproducible weights."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(transformers_config(config, vocab_size, eos_token_id))
    if config.compile:
        # In place, so parameter names and stack discovery see the plain module.
        # NOTE: no test exercises compile (the test machines are CPU-only); it is meant for GPU runs.
        model.compile()
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@torch.no_grad()
def generate_samples(model: nn.Module, tokenizer, prompts: list[str], max_new_tokens: int, temperature: float, top_k: int, seed: int) -> list[str]:
    """Sample a continuation of each prompt with ``model.generate`` and return prompt plus text."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    samples = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
        if ids.numel() == 0:
            ids = torch.tensor([[tokenizer.eos_token_id]])
        output = model.generate(
            input_ids=ids.to(device),
            attention_mask=torch.ones_like(ids).to(device),
            max_new_tokens=max_new_tokens,
            do_sample=True,
            temperature=temperature,
            top_k=top_k,
            pad_token_id=tokenizer.eos_token_id,
        )
        samples.append(tokenizer.decode(output[0], skip_special_tokens=True))
    torch.random.set_rng_state(generator_state)
    model.train(was_training)
    return samples
