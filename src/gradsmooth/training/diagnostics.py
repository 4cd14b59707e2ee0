"""Depth diagnostics during training: update measures every few steps, representation measures at evaluation.

Files in the run directory (written by the main process):

- ``diagnostics/updates.jsonl``: per step, stack and slot, the update measures of
  :mod:`gradsmooth.smoothing.diagnostics`; their means over slots go to ``metrics.jsonl`` as
  ``smooth/*``.
- ``diagnostics/depth.jsonl``: per evaluation and stack, the residual cosine matrix, the
  coupling matrix and the scalar measures; the scalars go to ``metrics.jsonl`` as ``depth/*``.
- ``diagnostics/depth.png``: heatmaps of the first and last evaluation and the measures over training.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import default_collate

from gradsmooth.analysis import capture_blocks, coupling_matrix, residual_measures, token_jacobians
from gradsmooth.smoothing import SmoothingConfig
from gradsmooth.smoothing.diagnostics import UpdateProbe, probe_stacks, summarize

log = logging.getLogger("gradsmooth")

DIAGNOSTICS_DIR = "diagnostics"


@dataclass
class DiagnosticsConfig:
    """Depth diagnostics.

    update_every: optimizer steps between update measurements (``smooth/*``); 0 turns them off.
    representations: measure hidden states on a fixed probe batch at every evaluation (``depth/*``).
    probe_examples: validation examples in the probe batch (the first ones of the split).
    coupling_tokens: tokens of the first probe example whose block Jacobians give the coupling
        matrix; 0 turns it off.
    coupling_top_k: singular directions per Jacobian in the coupling measure.
    coupling_max_width: skip the coupling measure for hidden sizes above this, since each
        Jacobian costs a backward pass per hidden unit.
    """

    update_every: int = 50
    representations: bool = True
    probe_examples: int = 16
    coupling_tokens: int = 4
    coupling_top_k: int = 4
    coupling_max_width: int = 256

    def __post_init__(self) -> None:
        for key in ("update_every", "coupling_tokens"):
            if getattr(self, key) < 0:
                raise ValueError(f"diagnostics.{key} must be >= 0; got {getattr(self, key)}")
        for key in ("probe_examples", "coupling_top_k", "coupling_max_width"):
            if getattr(self, key) < 1:
                raise ValueError(f"diagnostics.{key} must be >= 1; got {getattr(self, key)}")


def _to_device(batch, device: torch.device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to_device(item, device) for item in batch)
    if isinstance(batch, dict):
        return {key: _to_device(value, device) for key, value in batch.items()}
    return batch


def _first(batch, count: int):
    """Return the first ``count`` examples of a collated batch."""
    if isinstance(batch, torch.Tensor):
        return batch[:count]
    if isinstance(batch, (tuple, list)):
        return type(batch)(_first(item, count) for item in batch)
    if isinstance(batch, dict):
        return {key: _first(value, count) for key, value in batch.items()}
    return batch


class DepthDiagnostics:
    """Run the depth diagnostics of one training run; the loop calls it at the points named below.

    Around a real optimizer step: :meth:`wants_update`, :meth:`start_update`,
    :meth:`finish_update`. At each evaluation: :meth:`measure_representations`. At the end:
    :meth:`plot`. After a resume: :meth:`restore`.
    """

    def __init__(self, config: DiagnosticsConfig, task, model: nn.Module, optimizer, smoothing: SmoothingConfig,
                 run_dir: Path, main: bool, device: torch.device):
        self.config = config
        self.task = task
        self.main = main
        self.device = device
        self.dir = Path(run_dir) / DIAGNOSTICS_DIR
        if main:
            self.dir.mkdir(parents=True, exist_ok=True)

        stacks = probe_stacks(model, smoothing)
        self.stack_paths = [stack.path for stack in stacks]
        self.update_probe = UpdateProbe(stacks, optimizer) if config.update_every and stacks else None
        self.probe_batch = None
        self.representations = config.representations and bool(stacks)
        if not stacks:
            log.warning("depth diagnostics off: the model has no stack of >= 2 identical blocks")

    # --- updates --------------------------------------------------------------------------------

    def wants_update(self, step: int) -> bool:
        """Return whether optimizer step ``step`` (counted from 1) is measured."""
        return self.update_probe is not None and step % self.config.update_every == 0

    def start_update(self) -> None:
        self.update_probe.start()

    def finish_update(self, step: int) -> dict[str, float]:
        """Measure the step just taken, write its per-slot rows and return the ``smooth/*`` means."""
        results = self.update_probe.finish()
        if self.main and results:
            rows = [{"step": step, "stack": path, "slot": slot, **values} for (path, slot), values in results.items()]
            self._append("updates.jsonl", rows)
        return summarize(results)

    # --- representations ------------------------------------------------------------------------

    @torch.no_grad()
    def measure_representations(self, model: nn.Module, step: int) -> dict[str, float]:
        """Measure the hidden states of the probe batch after every block; return the ``depth/*`` scalars."""
        if not self.representations:
            return {}
        batch = self._probe_batch()
        blocks_per_stack = {path: list(model.get_submodule(path).children()) for path in self.stack_paths}

        metrics, rows = {}, []
        for path, blocks in blocks_per_stack.items():
            with capture_blocks(blocks) as record:
                try:
                    self.task.probe_forward(model, batch)
                except NotImplementedError:
                    log.warning("depth diagnostics off: task %s has no probe_forward", self.task.name)
                    self.representations = False
                    return {}
            scores, cosine = residual_measures(record.states())
            row = {"step": step, "stack": path, **scores, "residual_cosine": cosine.tolist()}

            coupling = self._coupling(model, blocks, batch, record.states().shape[-1])
            if coupling is not None:
                off_diagonal = coupling[~torch.eye(len(coupling), dtype=torch.bool)]
                scores["coupling"] = float(off_diagonal.mean())
                row["coupling"] = coupling.tolist()
                row["coupling_score"] = scores["coupling"]

            prefix = "depth/" if len(blocks_per_stack) == 1 else f"depth/{path}/"
            metrics.update({prefix + name: value for name, value in scores.items()})
            rows.append(row)

        if self.main:
            self._append("depth.jsonl", rows)
        return metrics

    def _probe_batch(self):
        if self.probe_batch is None:
            dataset = self.task.eval_datasets["val"]
            count = min(self.config.probe_examples, len(dataset))
            self.probe_batch = _to_device(default_collate([dataset[i] for i in range(count)]), self.device)
        return self.probe_batch

    def _coupling(self, model: nn.Module, blocks: list[nn.Module], batch, width: int) -> torch.Tensor | None:
        """Return the coupling matrix averaged over the chosen tokens of the first probe example, or None."""
        if not self.config.coupling_tokens or width > self.config.coupling_max_width:
            return None
        with capture_blocks(blocks, keep_calls=True) as record:
            self.task.probe_forward(model, _first(batch, 1))
        tokens = record.inputs[0].shape[1]
        positions = torch.linspace(0, tokens - 1, min(self.config.coupling_tokens, tokens)).round().long().unique()
        matrices = [
            coupling_matrix(token_jacobians(blocks, record, int(position)), self.config.coupling_top_k)
            for position in positions
        ]
        return torch.stack(matrices).mean(dim=0)

    # --- files ----------------------------------------------------------------------------------

    def _append(self, name: str, rows: list[dict]) -> None:
        with (self.dir / name).open("a") as handle:
            for row in rows:
                handle.write(json.dumps(row) + "\n")

    def restore(self, step: int) -> None:
        """Drop the rows that an interrupted run wrote after its checkpoint at ``step``."""
        if not self.main:
            return
        for name in ("updates.jsonl", "depth.jsonl"):
            path = self.dir / name
            if path.exists():
                rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
                kept = "".join(json.dumps(row) + "\n" for row in rows if row["step"] <= step)
                tmp = path.with_suffix(".jsonl.tmp")
                tmp.write_text(kept)
                tmp.replace(path)

    def plot(self) -> None:
        """Draw ``diagnostics/depth.png`` from the files written so far (main process only)."""
        if not self.main:
            return
        from gradsmooth.analysis.plots import plot_run_diagnostics

        plot_run_diagnostics(self.dir, self.dir / "depth.png")
