"""Two CPU processes (torchrun, gloo) against one: same parameters, one run directory."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from conftest import ROOT

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
TINY = [
    "trainer.max_steps=3",
    "trainer.log_every=1",
    "trainer.eval_every=2",
    "trainer.checkpoint_every=0",
    "trainer.progress_bar=false",
    "trainer.cpu=true",
    "model.depth=3",
    "model.embed_dim=16",
    "model.num_heads=2",
    # Augmentation draws from each process's own RNG, so it is off for an exact comparison.
    "data.augment=false",
]


def _run(command: list[str]) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_ranks_hold_identical_parameters(tmp_path):
    _run([*TORCHRUN, str(ROOT / "tests" / "ddp_worker.py"), str(tmp_path)])
    rank0 = load_file(tmp_path / "rank0.safetensors")
    rank1 = load_file(tmp_path / "rank1.safetensors")
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name


def test_two_processes_match_one(tmp_path):
    """Two processes with batches of 8 take the same steps as one process with batches of 16."""
    # Each rank would name its own run directory; they must agree on rank 0's.
    _run([*TORCHRUN, str(ROOT / "train.py"), *TINY, "data.batch_size=8", f"hydra.run.dir={tmp_path}/two_${{unique_id:}}"])
    _run([sys.executable, str(ROOT / "train.py"), *TINY, "data.batch_size=16", f"hydra.run.dir={tmp_path}/one"])

    two = [path for path in tmp_path.iterdir() if path.name.startswith("two_")]
    assert len(two) == 1
    two, one = two[0], tmp_path / "one"

    expected = load_file(one / "model.safetensors")
    actual = load_file(two / "model.safetensors")
    for name in expected:
        # Summation order differs between one process and an all-reduce over two.
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-4, atol=1e-5)

    rows_one, rows_two = _rows(one), _rows(two)
    assert [row["step"] for row in rows_two] == [row["step"] for row in rows_one]
    lr_one = [row["optim/lr"] for row in rows_one if "optim/lr" in row]
    lr_two = [row["optim/lr"] for row in rows_two if "optim/lr" in row]
    assert lr_two == lr_one
    loss_one = [row["train/loss"] for row in rows_one if "train/loss" in row]
    loss_two = [row["train/loss"] for row in rows_two if "train/loss" in row]
    torch.testing.assert_close(torch.tensor(loss_two), torch.tensor(loss_one), rtol=1e-4, atol=1e-5)


def test_fsdp2_shards_match_unsharded(tmp_path):
    """Each rank holds the same shard of every block, so smoothing runs on the local shards."""
    _run([*TORCHRUN, str(ROOT / "tests" / "fsdp_worker.py"), str(tmp_path)])
    for rank in (0, 1):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["max_difference"] < 1e-6
        assert "normalize=rescale is not supported on FSDP2" in result["rescale"]
        assert "FSDP1 (FullyShardedDataParallel)" in result["fsdp1"]
