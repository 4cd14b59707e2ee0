"""Checkpoints and resume: a killed run continues exactly, and failures keep the last good checkpoint."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, run_config
from gradsmooth.tasks.diffusion.task import DiffusionTask
from gradsmooth.tasks.lm import LMTask
from gradsmooth.tasks.vit import VitTask
from gradsmooth.training.checkpoint import complete_checkpoints, resolve_resume
from gradsmooth.training.errors import ConfigError

# Per runner: the class whose training_step the simulated kill interrupts, and tiny settings.
# Image batches of 256 make an epoch of 4 batches, so the runs cross epoch boundaries and the
# checkpoint of step 3 (6 micro-batches) falls in the middle of an epoch.
RUNNERS = {
    "vit": (
        VitTask,
        ["task=vit", "model.depth=3", "model.embed_dim=16", "model.num_heads=2", "data.batch_size=256"],
    ),
    "lm": (
        LMTask,
        [
            "task=lm",
            "data=text_files",
            "model.n_layer=3",
            "model.d_model=32",
            "model.n_head=2",
            "task.tokenizer.vocab_size=512",
            "task.sample_tokens=8",
            "data.seq_len=32",
            "data.batch_size=4",
            "data.eval_batch_size=8",
            "data.val_tokens=256",
        ],
    ),
    "diffusion": (
        DiffusionTask,
        [
            "task=diffusion",
            "model.num_layers=2",
            "model.attention_head_dim=8",
            "model.num_attention_heads=2",
            "data.batch_size=256",
            "task.num_samples=16",
            "task.sample_batch_size=8",
            "task.sample_steps=2",
            "task.grid_size=4",
            "task.classifier_steps=20",
        ],
    ),
}

COMMON = [
    "trainer.max_steps=6",
    "trainer.checkpoint_every=3",
    "trainer.log_every=1",
    "trainer.eval_every=2",
    "trainer.grad_accum_steps=2",
    "trainer.progress_bar=false",
    "diagnostics.update_every=2",
]


def _rows_without_timing(path):
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [{k: v for k, v in row.items() if not k.startswith("perf/")} for row in rows]


def _kill_at_call(monkeypatch, cls, call: int, error: BaseException):
    """Make ``cls.training_step`` raise ``error`` on its ``call``-th call."""
    original = cls.training_step
    calls = {"n": 0}

    def interrupted(self, model, batch):
        calls["n"] += 1
        if calls["n"] == call:
            raise error
        return original(self, model, batch)

    monkeypatch.setattr(cls, "training_step", interrupted)
    return original


@pytest.mark.parametrize("runner", sorted(RUNNERS))
def test_kill_and_resume_is_exact(runner, tmp_path, monkeypatch):
    cls, settings = RUNNERS[runner]
    overrides = [*settings, *COMMON]
    if runner == "diffusion":
        overrides.append(f"task.cache_dir={tmp_path / 'classifier-cache'}")
    if runner == "lm":
        from test_lm import make_text

        corpus = tmp_path / "corpus"
        corpus.mkdir()
        for index in range(6):
            (corpus / f"book{index}.txt").write_text(make_text(index + 10, lines=300), encoding="utf-8")
        overrides += [f"data.path={corpus}/*.txt", f"data.cache_dir={tmp_path / 'cache'}"]
    full = run_config(*overrides, run_dir=tmp_path / "full")

    # Killed during step 5 (micro-batch 9 of 12), after the checkpoint of step 3.
    original = _kill_at_call(monkeypatch, cls, 9, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        run_config(*overrides, run_dir=tmp_path / "killed")
    monkeypatch.setattr(cls, "training_step", original)
    assert [path.name for path in complete_checkpoints(tmp_path / "killed" / "checkpoints")] == ["step_00000003"]

    resumed = run_config(*overrides, "trainer.resume=auto", run_dir=tmp_path / "killed")

    assert resumed == full
    expected = load_file(tmp_path / "full" / "model.safetensors")
    actual = load_file(tmp_path / "killed" / "model.safetensors")
    for name in expected:
        assert torch.equal(actual[name], expected[name]), name
    assert _rows_without_timing(tmp_path / "killed" / "metrics.jsonl") == _rows_without_timing(
        tmp_path / "full" / "metrics.jsonl"
    )
    for name in ("updates.jsonl", "depth.jsonl"):
        written = (tmp_path / "killed" / "diagnostics" / name).read_text()
        assert written == (tmp_path / "full" / "diagnostics" / name).read_text(), name


def test_kill_during_save_keeps_previous(tmp_path, monkeypatch):
    from accelerate import Accelerator

    _, settings = RUNNERS["vit"]
    overrides = [*settings, *COMMON]
    original = Accelerator.save_state
    calls = {"n": 0}

    def dies_midway(self, output_dir=None, **kwargs):
        calls["n"] += 1
        result = original(self, output_dir, **kwargs)
        if calls["n"] == 2:
            raise KeyboardInterrupt  # after the files are written, before the rename
        return result

    monkeypatch.setattr(Accelerator, "save_state", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        run_config(*overrides, run_dir=tmp_path)
    monkeypatch.setattr(Accelerator, "save_state", original)

    checkpoints = tmp_path / "checkpoints"
    assert (checkpoints / "tmp-step_00000006").is_dir()
    assert resolve_resume("auto", tmp_path) == checkpoints / "step_00000003"
    final = run_config(*overrides, "trainer.resume=auto", run_dir=tmp_path)
    assert final["test/acc"] >= 0.0
    assert not (checkpoints / "tmp-step_00000006").exists()


def test_nonfinite_loss_stops_and_keeps_checkpoint(tmp_path, monkeypatch):
    _, settings = RUNNERS["vit"]
    original = VitTask.training_step

    def poisoned(self, model, batch):
        loss = original(self, model, batch)
        return loss * float("nan") if self._calls_left() == 0 else loss

    counter = {"n": 0}

    def calls_left(self):
        counter["n"] += 1
        return 9 - counter["n"]

    monkeypatch.setattr(VitTask, "_calls_left", calls_left, raising=False)
    monkeypatch.setattr(VitTask, "training_step", poisoned)
    with pytest.raises(FloatingPointError, match="at step 5"):
        run_config(*settings, *COMMON, run_dir=tmp_path)

    assert [path.name for path in complete_checkpoints(tmp_path / "checkpoints")] == ["step_00000003"]
    assert not (tmp_path / "results.json").exists()


def test_sigterm_saves_checkpoint(tmp_path):
    _, settings = RUNNERS["vit"]
    run_dir = tmp_path / "run"
    command = [
        sys.executable,
        str(ROOT / "train.py"),
        *settings,
        "trainer.max_steps=100000",
        "trainer.checkpoint_every=0",
        "trainer.log_every=1",
        "trainer.progress_bar=false",
        f"hydra.run.dir={run_dir}",
    ]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        time.sleep(0.5)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=240)

    assert process.returncode == 128 + signal.SIGTERM
    assert "received SIGTERM at step" in stdout + stderr
    saved = complete_checkpoints(run_dir / "checkpoints")
    assert len(saved) == 1

    step = json.loads((saved[0] / "trainer_state.json").read_text())["step"]
    resumed = subprocess.run(
        [*command[:-1], f"hydra.run.dir={run_dir}", "trainer.resume=auto", f"trainer.max_steps={step + 2}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert json.loads((run_dir / "results.json").read_text())["step"] == step + 2


def test_corrupted_checkpoint_is_rejected(tmp_path):
    _, settings = RUNNERS["vit"]
    run_config(*settings, *COMMON, run_dir=tmp_path)
    newest = complete_checkpoints(tmp_path / "checkpoints")[-1]
    (newest / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ConfigError, match="cannot be loaded"):
        run_config(*settings, *COMMON, "trainer.resume=auto", run_dir=tmp_path)


def test_mismatched_checkpoint_is_rejected(tmp_path):
    _, settings = RUNNERS["vit"]
    run_config(*settings, *COMMON, run_dir=tmp_path / "small")
    with pytest.raises(ConfigError, match="different model"):
        run_config(*settings, *COMMON, "model.depth=4", f"trainer.resume={tmp_path / 'small'}", run_dir=tmp_path / "big")


def test_resume_path_must_exist(tmp_path):
    _, settings = RUNNERS["vit"]
    with pytest.raises(ConfigError, match="trainer.resume"):
        run_config(*settings, *COMMON, f"trainer.resume={tmp_path / 'nowhere'}", run_dir=tmp_path / "run")


def test_full_disk_during_save_is_reported(tmp_path, monkeypatch):
    import errno

    from accelerate import Accelerator

    _, settings = RUNNERS["vit"]
    original = Accelerator.save_state
    calls = {"n": 0}

    def disk_full(self, output_dir=None, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, output_dir, **kwargs)

    monkeypatch.setattr(Accelerator, "save_state", disk_full)
    with pytest.raises(OSError, match="failed to write checkpoint .* Free disk space"):
        run_config(*settings, *COMMON, run_dir=tmp_path)
    assert [path.name for path in complete_checkpoints(tmp_path / "checkpoints")] == ["step_00000003"]
    assert not list((tmp_path / "checkpoints").glob("tmp-*"))
