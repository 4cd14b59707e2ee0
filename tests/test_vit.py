"""The ViT runner end to end: short runs in-process and through ``train.py``."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch
from accelerate.utils import set_seed
from safetensors.torch import load_file

from conftest import ROOT, compose, run_config
from gradsmooth.config import validate
from gradsmooth.tasks import build_task

TINY = [
    "trainer.max_steps=2",
    "trainer.eval_every=1",
    "trainer.log_every=1",
    "trainer.progress_bar=false",
    "model.depth=3",
    "model.embed_dim=16",
    "model.num_heads=2",
    "data.batch_size=16",
    "optim.warmup_steps=0",
    "optim.schedule=constant",
]


def _initial_state(*overrides: str) -> dict[str, torch.Tensor]:
    """Rebuild the model that ``train`` starts from: same seed, same construction order."""
    config = validate(compose(*overrides))
    set_seed(config.seed)
    model = build_task(config.task, config.model, config.data).build_model()
    return {name: p.detach().clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize(
    "extra",
    [
        ["optim=adamw"],
        ["optim=adam"],
        ["optim=sgd"],
        ["optim=muon"],
        ["smoothing.target=gradient"],
        ["smoothing.normalize=rescale", "smoothing.params=matrices"],
        ["smoothing=none"],
    ],
    ids=lambda extra: ",".join(extra),
)
def test_short_run_changes_every_parameter(extra, tmp_path):
    overrides = [*TINY, *extra]
    before = _initial_state(*overrides)
    final = run_config(*overrides, run_dir=tmp_path)

    assert {key for key in final if not key.startswith("depth/")} == {"val/loss", "val/acc", "test/loss", "test/acc"}
    assert "depth/residual_alignment" in final
    assert all(torch.isfinite(torch.tensor(value)) for value in final.values())
    after = load_file(tmp_path / "model.safetensors")
    unchanged = [name for name, value in before.items() if torch.equal(value, after[name])]
    assert unchanged == []


def test_metrics_jsonl_rows(tmp_path):
    run_config(*TINY, run_dir=tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_rows = [row for row in rows if "train/loss" in row]
    assert [row["step"] for row in train_rows] == [1, 2]
    assert {"optim/lr", "perf/steps_per_s", "train/grad_norm"} <= set(train_rows[0])
    assert any("val/acc" in row for row in rows)
    assert "test/acc" in rows[-1]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["metric"] == "test/acc"
    assert results["step"] == 2


def test_accumulation_matches_large_batch(tmp_path):
    """Four micro-batches of 8 give the same first step as one batch of 32 (plain SGD)."""
    common = [*TINY, "trainer.max_steps=1", "optim=sgd", "optim.momentum=0", "optim.weight_decay=0", "trainer.grad_clip=0", "data.augment=false"]
    run_config(*common, "data.batch_size=32", run_dir=tmp_path / "large")
    run_config(*common, "data.batch_size=8", "trainer.grad_accum_steps=4", run_dir=tmp_path / "small")
    large = load_file(tmp_path / "large" / "model.safetensors")
    small = load_file(tmp_path / "small" / "model.safetensors")
    for name in large:
        torch.testing.assert_close(small[name], large[name], rtol=1e-5, atol=1e-6)


def _train_py(*overrides: str, cwd=ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *overrides],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
    )


def test_cli_run_directory(tmp_path):
    run_dir = tmp_path / "run"
    result = _train_py(*TINY, f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-2000:]

    last_line = result.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"test/loss:\d+\.\d{4} test/acc:\d+\.\d{4}", last_line)
    for name in ("config.yaml", "environment.json", "metrics.jsonl", "results.json", "stacks.txt", "model.safetensors"):
        assert (run_dir / name).is_file(), name
    assert (run_dir / ".hydra" / "overrides.yaml").is_file()
    environment = json.loads((run_dir / "environment.json").read_text())
    assert environment["packages"]["torch"].startswith("2.14.1")

    # A second run is rejected in a directory that already contains one.
    again = _train_py(*TINY, f"hydra.run.dir={run_dir}")
    assert again.returncode != 0
    assert "already contains a run" in again.stderr + again.stdout


def test_cli_invalid_value_exit_code(tmp_path):
    result = _train_py(*TINY, "smoothing.window=4", f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 2
    assert "smoothing.window must be a positive odd integer" in result.stderr + result.stdout
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_hf_images_parquet_end_to_end(tmp_path):
    """``data=hf_images`` on a small parquet dataset written in the hub's own format."""
    import numpy as np
    from datasets import ClassLabel, Dataset, Features, Image
    from PIL import Image as PILImage

    rng = np.random.default_rng(0)
    features = Features({"img": Image(), "label": ClassLabel(names=["dark", "light"])})
    for split, count in (("train", 48), ("test", 16)):
        labels = [i % 2 for i in range(count)]
        images = [PILImage.fromarray((rng.random((12, 12, 3)) * 100 + 150 * y).astype("uint8")) for y in labels]
        Dataset.from_dict({"img": images, "label": labels}, features=features).to_parquet(str(tmp_path / "data" / f"{split}.parquet"))

    final = run_config(
        *TINY,
        "data=hf_images",
        f"data.path={tmp_path / 'data'}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "data.image_size=8",
        "data.batch_size=8",
        "model.patch_size=4",
        run_dir=tmp_path / "run",
    )
    assert 0.0 <= final["test/acc"] <= 1.0


@pytest.mark.slow
def test_default_run_accuracy(tmp_path):
    """The default job (2,000 steps, about a minute on 2 cores) reaches well above 90% test accuracy."""
    final = run_config("trainer.progress_bar=false", run_dir=tmp_path)
    assert final["test/acc"] > 0.93
