"""The smoothing benchmark runs end to end at tiny shapes and writes its page and raw figures."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from conftest import ROOT

pytestmark = pytest.mark.usefixtures("single_thread")


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_smoothing", ROOT / "scripts" / "bench_smoothing.py")
    module = importlib.util.module_from_spec(spec)
    # dataclasses look their module up in sys.modules while the file runs.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_quick_run_writes_page(tmp_path):
    bench = load_bench()

    page = bench.main(["--quick", "--repeats", "2", "--output-dir", str(tmp_path)])

    text = page.read_text()
    raw = json.loads((tmp_path / "smoothing-cpu.json").read_text())
    assert "CPU-only" in text
    for heading in ("### Targets", "### Whole training step", "### Optimizer step alone", "### Extra memory"):
        assert heading in text
    assert set(raw["training_step"]["samples"]) == {"AdamW", "AdamW + update, window 3", "AdamW + gradient, window 3"}
    assert all(len(values) == 2 for values in raw["smoothing_pass"]["4"]["samples"].values())
    assert raw["memory"]["variants"]["gradient, window 3"]["persistent"] == 0
    assert raw["memory"]["variants"]["update, window 3"]["persistent"] == raw["memory"]["smoothed_bytes"]
    assert bench.main(["--render", "--output-dir", str(tmp_path)]).read_text() == text


def test_pass_bytes_counts_kernels():
    from gradsmooth.smoothing import smooth

    bench = load_bench()
    model = bench.BlockStack(bench.QUICK, 4)
    base = bench.AdamWWithoutStep(bench.decay_groups(model), lr=1e-3)
    smoothed = sum(p.numel() * 4 for p in model.parameters())
    matrices = sum(p.numel() * 4 for p in model.parameters() if p.ndim == 2)

    update = bench.pass_bytes(smooth(base, model, target="update", window=3))
    gradient = bench.pass_bytes(smooth(base, model, target="gradient", window=3))

    # Window 3 on 4 blocks: each slot has 4 diagonal entries and 6 neighbour entries, and an
    # accumulation moves 3 tensors' bytes. Update: copy (2), subtract (3), decay of the matrices (2).
    # Gradient: the diagonal writes new tensors (2), the copy back into .grad (2).
    assert update == 5 * smoothed + 2 * matrices + 3 * smoothed * 10 // 4
    assert gradient == 4 * smoothed + 3 * smoothed * 6 // 4
