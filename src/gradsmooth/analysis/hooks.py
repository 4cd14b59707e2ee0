"""Capture the hidden states around every block of a stack with forward hooks.

The hooks only read: they return None, so the model's outputs are unchanged. The hidden states
are the block's first positional tensor argument (timm ``Block``, Hugging Face ``LlamaDecoderLayer``
and ``GPT2Block`` all take them first) or a ``hidden_states``/``x`` keyword argument, and the
block's output (a tensor, or the first element of a tuple).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import nn

HIDDEN_KEYWORDS = ("hidden_states", "x")


def hidden_input(args: tuple, kwargs: dict) -> torch.Tensor:
    """Return the hidden states a block is called with."""
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    for key in HIDDEN_KEYWORDS:
        if isinstance(kwargs.get(key), torch.Tensor):
            return kwargs[key]
    raise TypeError(
        "cannot find the hidden states of a block call: expected a tensor as the first positional argument "
        f"or as one of the keywords {HIDDEN_KEYWORDS}"
    )


def hidden_output(output: Any) -> torch.Tensor:
    """Return the hidden states a block returns (a tensor or the first element of a tuple)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"cannot find the hidden states in a block output of type {type(output).__name__}")


def replace_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    """Return ``(args, kwargs)`` of a block call with its hidden states replaced by ``hidden``."""
    if args and isinstance(args[0], torch.Tensor):
        return (hidden, *args[1:]), kwargs
    for key in HIDDEN_KEYWORDS:
        if isinstance(kwargs.get(key), torch.Tensor):
            return args, {**kwargs, key: hidden}
    raise TypeError("cannot find the hidden states of a block call to replace")


@dataclass
class BlockCalls:
    """The hidden states entering and leaving each block of a stack during one forward pass.

    ``inputs[l]`` and ``outputs[l]`` are block l's hidden states (detached); ``calls[l]`` the
    ``(args, kwargs)`` it was called with, kept only when requested, to call the block again.
    """

    inputs: list[torch.Tensor] = field(default_factory=list)
    outputs: list[torch.Tensor] = field(default_factory=list)
    calls: list[tuple[tuple, dict]] = field(default_factory=list)

    def states(self) -> torch.Tensor:
        """Return ``(L + 1, N, d)``: the first block's input and every block's output, tokens flattened."""
        if not self.outputs:
            raise RuntimeError("no block ran during the forward pass; is the stack part of the model?")
        stacked = torch.stack([self.inputs[0], *self.outputs])
        return stacked.reshape(stacked.shape[0], -1, stacked.shape[-1])


@contextlib.contextmanager
def capture_blocks(blocks: list[nn.Module], keep_calls: bool = False) -> Iterator[BlockCalls]:
    """Record the hidden states around each of ``blocks`` during the forward passes inside the block.

    Only the last forward pass is kept if the model runs several times.
    """
    record = BlockCalls()
    handles = []

    def before(index: int):
        def hook(module, args, kwargs):
            if index == 0:
                record.inputs.clear()
                record.outputs.clear()
                record.calls.clear()
            record.inputs.append(hidden_input(args, kwargs).detach())
            if keep_calls:
                record.calls.append((args, kwargs))

        return hook

    def after(module, args, kwargs, output):
        record.outputs.append(hidden_output(output).detach())

    try:
        for index, block in enumerate(blocks):
            handles.append(block.register_forward_pre_hook(before(index), with_kwargs=True))
            handles.append(block.register_forward_hook(after, with_kwargs=True))
        yield record
    finally:
        for handle in handles:
            handle.remove()
