"""Tokenizers behind the ``transformers`` interface: a byte-level BPE trained locally, or plain bytes.

Both kinds are :class:`transformers.PreTrainedTokenizerFast` objects built on a ``tokenizers``
byte-level model, so every token stands for a whole number of UTF-8 bytes (the end-of-text token
for none). :func:`token_byte_lengths` uses that to turn a loss in nats per token into bits per
byte. Trained tokenizers are saved with ``save_pretrained`` under a cache directory keyed by kind,
vocabulary size and a hash of the training text, so a second run reuses the first one's.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import torch

log = logging.getLogger("gradsmooth")

TOKENIZER_KINDS = ("bpe", "bytes")
EOS_TOKEN = "<|endoftext|>"
BYTE_VOCAB_SIZE = 257  # 256 byte values and the end-of-text token
MIN_BPE_VOCAB_SIZE = 512


@dataclass
class TokenizerConfig:
    """Tokenizer choice of a language-model task.

    kind: ``bpe`` (byte-level BPE trained on the training split) or ``bytes`` (one token per byte
        and an end-of-text token, 257 ids).
    vocab_size: BPE vocabulary size including the 256 byte tokens and the end-of-text token; the
        trained vocabulary can come out smaller on a small corpus. Ignored for ``bytes``.
    path: directory of a tokenizer saved with ``save_pretrained``, loaded instead of training one.
    train_chars: at most this many characters of the training split are used to train the BPE.
    """

    kind: str = "bpe"
    vocab_size: int = 2048
    path: Optional[str] = None
    train_chars: int = 20_000_000

    def __post_init__(self) -> None:
        if self.kind not in TOKENIZER_KINDS:
            raise ValueError(f"task.tokenizer.kind must be one of {', '.join(TOKENIZER_KINDS)}; got {self.kind!r}")
        if self.kind == "bpe" and self.vocab_size < MIN_BPE_VOCAB_SIZE:
            raise ValueError(f"task.tokenizer.vocab_size must be >= {MIN_BPE_VOCAB_SIZE} for kind=bpe; got {self.vocab_size}")
        if self.train_chars < 1:
            raise ValueError(f"task.tokenizer.train_chars must be >= 1; got {self.train_chars}")


def _wrap(backend):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        clean_up_tokenization_spaces=False,
    )


def build_byte_tokenizer():
    """Return a tokenizer with one token per byte value (ids 0-255 in byte order) and end-of-text (256)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    # ByteLevel maps byte b to a printable character; ordering the vocabulary by b gives id == b.
    chars = sorted(alphabet, key=_byte_of)
    vocab = {char: index for index, char in enumerate(chars)}
    vocab[EOS_TOKEN] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([EOS_TOKEN])
    return _wrap(backend)


def _byte_of(char: str) -> int:
    """Invert the GPT-2 byte-to-character table that ``tokenizers``' ByteLevel uses."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    code = ord(char)
    if code in printable:
        return code
    others = [b for b in range(256) if b not in printable]
    return others[code - 256]


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int):
    """Train a byte-level BPE on ``texts`` with ``tokenizers`` and return it as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    return _wrap(backend)


def load_tokenizer(path: str | Path):
    """Load a tokenizer saved with ``save_pretrained`` and check that it has the end-of-text token."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not (path / "tokenizer.json").is_file():
        raise ValueError(f"task.tokenizer.path {str(path)!r} contains no tokenizer.json; save one with save_pretrained")
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if tokenizer.eos_token_id is None:
        raise ValueError(f"the tokenizer at {str(path)!r} has no end-of-text (eos) token")
    return tokenizer


def get_tokenizer(config: TokenizerConfig, train_text: list[str], cache_dir: Path):
    """Return the configured tokenizer: loaded from ``config.path``, from the cache, or trained now.

    A cached tokenizer whose vocabulary size disagrees with the one recorded in its cache key is
    rejected, because reusing it would silently change the model's output layer.
    """
    if config.path:
        return load_tokenizer(config.path)
    if config.kind == "bytes":
        return build_byte_tokenizer()

    sample = _sample(train_text, config.train_chars)
    digest = hashlib.sha256("\x00".join(sample).encode("utf-8")).hexdigest()[:16]
    directory = Path(cache_dir) / "tokenizers" / f"bpe-{config.vocab_size}-{digest}"
    if (directory / "tokenizer.json").is_file():
        tokenizer = load_tokenizer(directory)
        if len(tokenizer) > config.vocab_size:
            raise ValueError(
                f"the cached tokenizer at {directory} has {len(tokenizer)} tokens, more than "
                f"task.tokenizer.vocab_size={config.vocab_size}; delete that directory to train a new one"
            )
        log.info("tokenizer: reusing %s (%d tokens)", directory, len(tokenizer))
        return tokenizer

    log.info("tokenizer: training a byte-level BPE of up to %d tokens on %s characters", config.vocab_size, f"{sum(map(len, sample)):,}")
    tokenizer = train_bpe_tokenizer(sample, config.vocab_size)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(directory))
    log.info("tokenizer: saved %d tokens to %s", len(tokenizer), directory)
    return tokenizer


def _sample(texts: list[str], max_chars: int) -> list[str]:
    """Take documents from the front of ``texts`` until ``max_chars`` characters are collected."""
    sample, total = [], 0
    for text in texts:
        if total >= max_chars:
            break
        sample.append(text[: max_chars - total])
        total += len(sample[-1])
    return sample


def token_byte_lengths(tokenizer) -> torch.Tensor:
    """Return the number of UTF-8 bytes each token id decodes to (0 for special tokens).

    Holds for byte-level vocabularies, where every character of a token string stands for one byte.
    """
    special = set(tokenizer.all_special_ids)
    lengths = torch.zeros(len(tokenizer), dtype=torch.long)
    for token, index in tokenizer.get_vocab().items():
        if index not in special:
            lengths[index] = len(token)
    return lengths
