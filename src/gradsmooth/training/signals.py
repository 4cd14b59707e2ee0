"""Turn SIGTERM (what SLURM sends before it kills a job) and SIGINT (Ctrl-C) into a stop request.

The loop checks the request after each optimizer step, saves a checkpoint and exits. With several
processes the request is summed across them, so every rank stops at the same step.
"""

from __future__ import annotations

import signal
import threading

import torch


class StopSignal:
    """Context manager that records SIGTERM and SIGINT instead of dying at once."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, accelerator):
        self.accelerator = accelerator
        self.signum: int | None = None
        self._previous = {}

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    def __enter__(self):
        # Handlers can only be set from the main thread; elsewhere signals keep their default.
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def requested(self) -> bool:
        local = self.signum or 0
        if self.accelerator.num_processes == 1:
            return bool(local)
        flag = torch.tensor([local], device=self.accelerator.device)
        agreed = int(self.accelerator.reduce(flag, reduction="sum").item())
        if agreed and not self.signum:
            self.signum = signal.SIGTERM
        return bool(agreed)
