"""Sweeps: every sweep file runs, a failing job leaves the others and the table intact, W&B
offline runs, the table builder's rules, and the analysis notebook."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import CONFIG_DIR, ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import make_figures  # noqa: E402
import make_tables  # noqa: E402
from test_lm import make_text  # noqa: E402

TINY_VIT = ["model.depth=2", "model.embed_dim=16", "model.num_heads=2"]
TINY_TRAINER = [
    "trainer.max_steps=2",
    "trainer.eval_every=1",
    "trainer.log_every=1",
    "trainer.progress_bar=false",
    "trainer.save_model=false",
]
TINY = [*TINY_TRAINER, *TINY_VIT]
# Tiny models and data for the other tasks' sweep files.
TINY_TASK = {
    "lm": [
        "model.n_layer=2",
        "model.d_model=32",
        "model.n_head=2",
        "task.tokenizer.vocab_size=512",
        "task.sample_tokens=4",
        "data.seq_len=32",
        "data.batch_size=4",
        "data.eval_batch_size=8",
        "data.val_tokens=256",
    ],
    "diffusion": [
        "model.num_layers=2",
        "model.num_attention_heads=2",
        "model.attention_head_dim=8",
        "data.batch_size=16",
        "task.num_samples=16",
        "task.sample_batch_size=8",
        "task.sample_steps=2",
        "task.grid_size=4",
        "task.classifier_steps=20",
    ],
    "grpo": [
        "model.n_layer=2",
        "model.d_model=32",
        "model.n_head=2",
        "data.train_size=100",
        "data.val_size=8",
        "policy.warm_start_steps=2",
        "policy.warm_start_batch_size=8",
        "task.batch_size=8",
        "task.num_generations=4",
        "task.max_completion_length=8",
    ],
}
TINY_TASK["lm_paper"] = [
    *TINY_TASK["lm"],
    "model.n_kv_head=2",
    "trainer.grad_accum_steps=1",
    "trainer.mixed_precision=no",
    "optim.warmup_steps=0",
    "task.tokenizer.train_chars=100000",
]
TINY_TASK["diffusion_paper"] = [
    *TINY_TASK["diffusion"],
    "model.patch_size=4",
    "data.image_size=8",
    "task.frechet_features=digits_classifier",
    "task.sample_batch_size=8",
    "trainer.mixed_precision=no",
    "optim.warmup_steps=0",
]


def _write_text_parquet(root: Path) -> None:
    """A small corpus in the hub's parquet format, standing in for FineWeb-Edu."""
    from datasets import Dataset

    documents = [make_text(index, lines=40) for index in range(12)]
    Dataset.from_dict({"text": documents}).to_parquet(str(root / "train.parquet"))
TINY_TASK["grpo_paper"] = [item for item in TINY_TASK["grpo"] if not item.startswith(("model.", "data.", "policy."))] + [
    "trainer.grad_accum_steps=1",
    "trainer.mixed_precision=no",
    "policy.dtype=float32",
    "data.eval_batch_size=8",
    "optim.warmup_steps=0",
]


def _multirun(*overrides: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "-m", *overrides],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=900,
        env={**os.environ, **(env or {})},
    )


def _write_image_parquet(root: Path) -> None:
    """A two-class image set in the hub's parquet format, standing in for CIFAR-10."""
    import numpy as np
    from datasets import ClassLabel, Dataset, Features, Image
    from PIL import Image as PILImage

    rng = np.random.default_rng(0)
    features = Features({"img": Image(), "label": ClassLabel(names=["dark", "light"])})
    for split, count in (("train", 40), ("test", 8)):
        labels = [i % 2 for i in range(count)]
        images = [PILImage.fromarray((rng.random((8, 8, 3)) * 100 + 150 * y).astype("uint8")) for y in labels]
        Dataset.from_dict({"img": images, "label": labels}, features=features).to_parquet(str(root / f"{split}.parquet"))


SWEEPS = sorted(path.stem for path in (CONFIG_DIR / "sweep").glob("*.yaml"))


@pytest.mark.parametrize("sweep", SWEEPS)
def test_sweep_file_runs(sweep, tmp_path):
    """Every job of the sweep runs 2 steps on a tiny model; paper sweeps read a local parquet set."""
    overrides = [f"sweep={sweep}", *TINY_TRAINER, *TINY_TASK.get(sweep, TINY_VIT), f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    if sweep == "lm":
        corpus = tmp_path / "corpus"
        corpus.mkdir()
        for index in range(4):
            (corpus / f"book{index}.txt").write_text(make_text(index + 10, lines=200), encoding="utf-8")
        overrides += ["data=text_files", f"data.path={corpus}/*.txt", f"data.cache_dir={tmp_path / 'cache'}"]
    if sweep == "diffusion":
        overrides.append(f"task.cache_dir={tmp_path / 'classifier-cache'}")
    if sweep.startswith("grpo"):
        overrides.append(f"policy.cache_dir={tmp_path / 'cache'}")
    if sweep == "grpo_paper":
        from test_grpo import _tiny_policy, _write_gsm8k

        files = _write_gsm8k(tmp_path / "gsm8k")
        overrides += [
            "data.path=json",
            "data.config_name=null",
            f"data.data_files={{train: {files['train']}, test: {files['test']}}}",
            f"policy.path={_tiny_policy(tmp_path / 'policy')}",
        ]
    elif sweep == "lm_paper":
        (tmp_path / "data").mkdir()
        _write_text_parquet(tmp_path / "data")
        overrides += [
            f"data.path={tmp_path / 'data'}",
            "data.config_name=null",
            "data.streaming=false",
            "data.val_documents=2",
            f"data.cache_dir={tmp_path / 'cache'}",
        ]
    elif sweep.endswith("_paper"):
        _write_image_parquet(tmp_path / "data")
        overrides += [f"data.path={tmp_path / 'data'}", f"data.cache_dir={tmp_path / 'cache'}", "data.image_size=8"]
        if sweep == "vit_paper":
            overrides += ["data.batch_size=8", "model.patch_size=4", "trainer.mixed_precision=no", "optim.warmup_steps=0"]
        else:
            overrides.append(f"task.cache_dir={tmp_path / 'classifier-cache'}")
    result = _multirun(*overrides)
    assert result.returncode == 0, result.stderr[-3000:]

    jobs = [path for path in (tmp_path / "sweep").iterdir() if path.is_dir()]
    completed = [job for job in jobs if (job / "results.json").exists()]
    assert len(jobs) >= 4
    assert len(completed) == len(jobs)


def test_failed_job_marks_cell(tmp_path):
    sweep_dir = tmp_path / "sweep"
    # Job 1 has an invalid window; job 0 must still complete and the sweep report the failure.
    result = _multirun(*TINY, "smoothing.window=3,4", f"hydra.sweep.dir={sweep_dir}")
    assert result.returncode == 1
    assert "1 job(s) failed" in result.stderr + result.stdout
    assert (sweep_dir / "0" / "results.json").exists()
    assert (sweep_dir / "1" / "failure.json").exists()
    assert not (sweep_dir / "1" / "results.json").exists()

    make_tables.main(["vit", str(sweep_dir), "--out", str(tmp_path / "results")])
    table = (tmp_path / "results" / "table.md").read_text()
    assert "**failed 1/1**" in table
    assert "window 3, α 0.2" in table
    rows = {row["variant"]: row for row in csv.DictReader((tmp_path / "results" / "table.csv").open())}
    assert rows["window 4, α 0.2"]["n_failed"] == "1"
    assert rows["window 3, α 0.2"]["n_completed"] == "1"


def test_wandb_offline_multirun(tmp_path):
    sweep_dir = tmp_path / "sweep"
    result = _multirun(
        *TINY,
        "logger=wandb",
        "seed=0,1",
        f"hydra.sweep.dir={sweep_dir}",
        env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"},
    )
    assert result.returncode == 0, result.stderr[-3000:]

    records = sorted(sweep_dir.glob("*/wandb/offline-run-*/run-*.wandb"))
    assert len(records) == 2
    assert len({path.name for path in records}) == 2
    for path in records:
        content = path.read_bytes()
        # Offline records are protobuf; metric names and the run's group appear as plain bytes.
        for key in (b"train/loss", b"val/acc", b"test/acc", b"optim/lr", sweep_dir.name.encode()):
            assert key in content, (path, key)


def _cell(values, failed=0):
    runs = [make_tables.Run(Path("."), "adamw", "v", seed, "completed", value=v) for seed, v in enumerate(values)]
    runs += [make_tables.Run(Path("."), "adamw", "v", 100 + i, "failed") for i in range(failed)]
    return make_tables.Cell("adamw", "v", runs)


def test_compare_rule():
    baseline = _cell([0.90, 0.91, 0.92])
    assert make_tables.compare(_cell([0.95, 0.96, 0.97]), baseline, "max")[1] == "better"
    assert make_tables.compare(_cell([0.85, 0.86, 0.87]), baseline, "max")[1] == "worse"
    assert make_tables.compare(_cell([0.905, 0.915, 0.925]), baseline, "max")[1] == "no real difference"
    # For a loss, lower is better.
    assert make_tables.compare(_cell([0.85, 0.86, 0.87]), baseline, "min")[1] == "better"
    assert make_tables.compare(_cell([0.95]), baseline, "max")[1] == "too few seeds"


def test_cell_format_keeps_failures():
    text = make_tables.format_cell(_cell([0.9, 0.92], failed=1), "")
    assert "(n=2)" in text
    assert "failed 1/3" in text
    assert make_tables.format_cell(None, "") == "missing"


def test_notebook_executes(tmp_path):
    import nbformat
    from nbclient import NotebookClient

    sweep_dir = tmp_path / "runs" / "table-vit" / "2026-01-01_00-00-00"
    result = _multirun(*TINY, "diagnostics.update_every=1", "smoothing=none,window", "seed=0,1", f"hydra.sweep.dir={sweep_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    make_tables.main(["vit", str(sweep_dir), "--out", str(tmp_path / "results" / "vit")])

    # The depth figures and their table, as make figures writes them.
    analysis = tmp_path / "results" / "analysis"
    make_figures.main(["vit", str(sweep_dir), "--out", str(analysis)])
    assert (analysis / "vit_residual_cosine.png").stat().st_size > 0
    assert (analysis / "vit_alignment.png").stat().st_size > 0
    table = (analysis / "vit.md").read_text()
    assert "| adamw | baseline |" in table
    assert "(n=2)" in table
    rows = list(csv.DictReader((analysis / "vit.csv").open()))
    residual = [row for row in rows if row["measure"] == "residual_alignment"]
    assert [len(row["values"].split()) for row in residual] == [2, 2]

    notebook = nbformat.read(ROOT / "notebooks" / "analysis.ipynb", as_version=4)
    os.environ["GRADSMOOTH_RESULTS"] = str(tmp_path / "results")
    os.environ["GRADSMOOTH_RUNS"] = str(tmp_path / "runs")
    try:
        NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()
    finally:
        del os.environ["GRADSMOOTH_RESULTS"]
        del os.environ["GRADSMOOTH_RUNS"]

    outputs = "".join(
        output.get("text", "") for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs
    )
    assert "tasks with a table: ['vit']" in outputs
    assert "vit: depth diagnostics of 4 runs" in outputs
    images = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs if "image/png" in o.get("data", {})]
    assert images
