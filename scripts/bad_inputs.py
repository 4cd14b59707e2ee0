"""Try each bad input through the real entry code and record the error it gets.

    python scripts/bad_inputs.py          # writes docs/bad_inputs.md from real attempts

``tests/test_bad_inputs.py`` runs the same cases and checks that each error names the problem and
that no run leaves output that looks valid (``results.json``, ``model.safetensors`` or a complete
checkpoint newer than the input's own).
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# A tiny ViT so each attempt that gets as far as training costs a second or two.
BASE = [
    "trainer.max_steps=2",
    "trainer.log_every=1",
    "trainer.eval_every=1",
    "trainer.checkpoint_every=1",
    "trainer.progress_bar=false",
    "model.depth=2",
    "model.embed_dim=16",
    "model.num_heads=2",
]

VALID_OUTPUTS = ("results.json", "model.safetensors")


@dataclass
class Case:
    """One bad input: Hydra overrides, optional files it needs, and text its error must contain."""

    name: str
    category: str
    overrides: list[str]
    expected: str
    setup: Callable[[Path], list[str]] | None = None


def _trained_run(workdir: Path, *extra: str) -> Path:
    """Train a tiny run with checkpoints into ``workdir/source`` and return that directory."""
    import train

    from gradsmooth.config import compose

    source = workdir / "source"
    train.run(compose(*BASE, *extra), source)
    return source


def _corrupt_weights(workdir: Path) -> list[str]:
    source = _trained_run(workdir)
    newest = sorted((source / "checkpoints").glob("step_*"))[-1]
    (newest / "model.safetensors").write_bytes(b"\0" * 64)
    return [f"trainer.resume={source}"]


def _truncate_state(workdir: Path) -> list[str]:
    source = _trained_run(workdir)
    newest = sorted((source / "checkpoints").glob("step_*"))[-1]
    (newest / "trainer_state.json").write_text('{"step": 2, "sched')
    return [f"trainer.resume={newest}"]


def _delete_optimizer_state(workdir: Path) -> list[str]:
    source = _trained_run(workdir)
    newest = sorted((source / "checkpoints").glob("step_*"))[-1]
    (newest / "optimizer.bin").unlink()
    return [f"trainer.resume={newest}"]


def _smaller_model(workdir: Path) -> list[str]:
    source = _trained_run(workdir)
    return [f"trainer.resume={source}", "model.depth=3"]


def _other_optimizer(workdir: Path) -> list[str]:
    source = _trained_run(workdir)
    return [f"trainer.resume={source}", "optim=sgd"]


def _used_run_dir(workdir: Path) -> list[str]:
    source = _trained_run(workdir)
    return [f"+run_dir={source}"]


def _file_in_path(workdir: Path) -> list[str]:
    blocker = workdir / "a_file"
    blocker.write_text("not a directory")
    return [f"+run_dir={blocker / 'run'}"]


def _parquet(workdir: Path, garbage: bool = False) -> Path:
    import numpy as np
    from datasets import ClassLabel, Dataset, Features, Image
    from PIL import Image as PILImage

    folder = workdir / "images"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    features = Features({"img": Image(), "label": ClassLabel(names=["a", "b"])})
    for split, count in (("train", 24), ("test", 8)):
        if garbage:
            (folder / f"{split}.parquet").write_bytes(b"PAR1 this is not parquet")
            continue
        images = [PILImage.fromarray((rng.random((8, 8, 3)) * 255).astype("uint8")) for _ in range(count)]
        Dataset.from_dict({"img": images, "label": [i % 2 for i in range(count)]}, features=features).to_parquet(
            str(folder / f"{split}.parquet")
        )
    return folder


def _hub_images(workdir: Path, *extra: str, garbage: bool = False) -> list[str]:
    folder = _parquet(workdir, garbage=garbage)
    return [
        "data=hf_images",
        f"data.path={folder}",
        f"data.cache_dir={workdir / 'cache'}",
        "data.image_size=8",
        "data.batch_size=8",
        "model.patch_size=4",
        *extra,
    ]


CASES = [
    # Config values and types.
    Case("even window", "config value", ["smoothing.window=4"], "smoothing.window must be a positive odd integer"),
    Case("zero window", "config value", ["smoothing.window=0"], "smoothing.window must be a positive odd integer"),
    Case("alpha above 1", "config value", ["smoothing.alpha=1.5"], "smoothing.alpha must be a number in [0, 1]"),
    Case("negative alpha", "config value", ["smoothing.alpha=-0.1"], "smoothing.alpha must be a number in [0, 1]"),
    Case("unknown target", "config value", ["smoothing.target=weights"], "smoothing.target must be one of update, gradient"),
    Case("unknown operator", "config value", ["smoothing.operator=blur"], "smoothing.operator must be one of"),
    Case("unknown normalization", "config value", ["smoothing.normalize=l2"], "smoothing.normalize must be one of none, rescale"),
    Case("unknown optimizer name", "config value", ["optim.name=lion"], "optim.name must be one of sgd, adam, adamw, muon"),
    Case("negative learning rate", "config value", ["optim.lr=-1"], "optim.lr must be positive"),
    Case("one Adam beta", "config value", ["optim.betas=[0.9]"], "optim.betas must be two numbers"),
    Case("zero steps", "config value", ["trainer.max_steps=0"], "trainer.max_steps must be >= 1"),
    Case("zero accumulation", "config value", ["trainer.grad_accum_steps=0"], "trainer.grad_accum_steps must be >= 1"),
    Case("unknown precision", "config value", ["trainer.mixed_precision=fp8"], "trainer.mixed_precision must be one of no, bf16, fp16"),
    Case("zero batch size", "config value", ["data.batch_size=0"], "data.batch_size and data.eval_batch_size must be >= 1"),
    Case("heads do not divide width", "config value", ["model.embed_dim=18", "model.num_heads=4"], "must be divisible by model.num_heads"),
    Case("patch does not divide image", "config value", ["model.patch_size=3"], "must divide the image size"),
    Case("window is text", "config type", ["smoothing.window=three"], "smoothing.window"),
    Case("seed is text", "config type", ["seed=abc"], "seed"),
    Case("flag is not a boolean", "config type", ["smoothing.decouple_weight_decay=maybe"], "smoothing.decouple_weight_decay"),
    Case("misspelt key", "config type", ["smoothing.windw=3"], "windw"),
    Case("unknown group option", "config type", ["optim=lion"], "optim/lion"),
    # Model structure.
    Case("stack path matches nothing", "model", ["smoothing.stacks=[encoder.layers]"], "matches no module"),
    Case("no repeated blocks", "model", ["model.depth=1"], "found no stack of >= 2 identical blocks"),
    Case("Muon with no block matrix", "model", ["model.depth=1", "optim=muon", "smoothing=none"], "optim=muon found no 2-D matrix"),
    # Data.
    Case("missing data directory", "data", ["data=hf_images", "data.path=/nonexistent/images"], "/nonexistent/images"),
    Case("corrupted parquet file", "data", [], "parquet", setup=lambda w: _hub_images(w, garbage=True)),
    Case("missing image column", "data", [], "data.image_column", setup=lambda w: _hub_images(w, "data.image_column=picture")),
    Case("batch larger than the data", "data", ["data.batch_size=5000"], "larger than the training set"),
    # Checkpoints.
    Case("resume path does not exist", "checkpoint", ["trainer.resume=/nonexistent/run"], "trainer.resume='/nonexistent/run'"),
    Case("corrupted checkpoint weights", "checkpoint", [], "cannot be loaded", setup=_corrupt_weights),
    Case("truncated trainer state", "checkpoint", [], "cannot be loaded", setup=_truncate_state),
    Case("missing optimizer state", "checkpoint", [], "cannot be loaded", setup=_delete_optimizer_state),
    Case("checkpoint of another model", "checkpoint", [], "different model", setup=_smaller_model),
    Case("checkpoint of another optimizer", "checkpoint", [], "was written by optimizer", setup=_other_optimizer),
    # Paths.
    Case("run directory of another run", "path", [], "already contains a run", setup=_used_run_dir),
    Case("run directory under a file", "path", [], "cannot be created or written", setup=_file_in_path),
]


def attempt(case: Case, workdir: Path) -> tuple[str, str, list[str]]:
    """Run ``case`` through ``train.run``; return the error type, its message and valid-looking leftovers."""
    import train
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from gradsmooth.config import compose

    extra = case.setup(workdir) if case.setup else []
    run_dir = workdir / "run"
    overrides = [o for o in [*case.overrides, *extra] if not o.startswith("+run_dir=")]
    for override in extra:
        if override.startswith("+run_dir="):
            run_dir = Path(override.split("=", 1)[1])

    before = {p for p in run_dir.rglob("*")} if run_dir.is_dir() else set()
    try:
        cfg = compose(*BASE, *overrides)
        train.run(cfg, run_dir)
    except (HydraException, OmegaConfBaseException, ValueError, OSError) as error:
        message = " ".join(str(error).split())
        kind = type(error).__name__
    else:
        raise AssertionError(f"bad input {case.name!r} ran without an error")

    created = ({p for p in run_dir.rglob("*")} - before) if run_dir.is_dir() else set()
    leftovers = sorted(str(p.relative_to(run_dir)) for p in created if p.name in VALID_OUTPUTS or p.name == "trainer_state.json")
    return kind, message, leftovers


def write_page(path: Path) -> None:
    lines = [
        "# Bad inputs and what each gets",
        "",
        "Each row was tried through `train.run`, the code behind `python train.py`, on a tiny ViT; "
        "`python scripts/bad_inputs.py` rewrites this page from real attempts and "
        "`tests/test_bad_inputs.py` checks every row. Every error comes before any output that looks "
        "valid: no `results.json`, `model.safetensors` or new checkpoint. A failed run leaves "
        "`failure.json` with the traceback; config errors make `train.py` exit with status 2.",
        "",
        "| # | category | input | error |",
        "|---|---|---|---|",
    ]
    for number, case in enumerate(CASES, start=1):
        workdir = Path(tempfile.mkdtemp(prefix="gradsmooth-bad-"))
        try:
            kind, message, leftovers = attempt(case, workdir)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        shown = " ".join(case.overrides) or case.name
        message = message.replace(str(workdir), "<tmp>").replace(str(ROOT), "<repo>").replace("|", "\\|")
        if len(message) > 300:
            message = message[:300] + " …"
        lines.append(f"| {number} | {case.category} | {case.name}: `{shown}` | {kind}: {message} |")
        print(f"{number:2d} {case.name}: {kind}" + (f" LEFTOVERS {leftovers}" if leftovers else ""), flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    import logging

    logging.disable(logging.CRITICAL)
    write_page(ROOT / "docs" / "bad_inputs.md")
