"""Measure what Gradient Smoothing costs next to its base optimizers, and write a results page.

    python scripts/bench_smoothing.py                # on the CPU with torch's default thread count
    python scripts/bench_smoothing.py --threads 1    # the setting of the committed CPU figures
    python scripts/bench_smoothing.py --device cuda  # a GPU section timed with CUDA events
    python scripts/bench_smoothing.py --quick        # tiny shapes: a smoke test of seconds

Everything runs in one process. Cases compared with each other are timed interleaved: each repeat
runs every case once, in an order rotated by one per repeat, so a drift in machine load reaches
all of them. Tables give the median and the interquartile range (25th to 75th percentile) of the
repeats, and each ratio is the median of the per-repeat ratios of cases timed side by side.

The raw figures go to ``results/bench/smoothing-<device>.json``; the page
``results/bench/smoothing.md`` is rendered from every such file present, so a GPU run adds its
section next to the CPU one.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
# The straightforward per-parameter implementation lives with the tests that check the fast path against it.
sys.path.insert(0, str(ROOT / "tests"))

from smoothing_reference import ReferenceSmoothing  # noqa: E402

from gradsmooth.optim import OptimConfig, build_optimizer  # noqa: E402
from gradsmooth.smoothing import SmoothedOptimizer, SmoothingConfig, smooth  # noqa: E402

TARGET_STEP_RATIO = 1.03
TARGET_BANDWIDTH_FRACTION = 0.5
TARGET_REFERENCE_SPEEDUP = 3.0


@dataclass
class Shapes:
    """Model shapes and run lengths of one benchmark run."""

    width: int
    mlp: int
    heads: int
    depths: tuple[int, ...]
    vocab: int
    batch: int
    sequence: int
    repeats: int
    step_repeats: int
    muon_repeats: int
    warmup: int


FULL = Shapes(width=768, mlp=3072, heads=12, depths=(12, 24), vocab=50257, batch=4, sequence=256,
              repeats=7, step_repeats=4, muon_repeats=3, warmup=1)
QUICK = Shapes(width=64, mlp=256, heads=4, depths=(4, 6), vocab=512, batch=2, sequence=32,
               repeats=3, step_repeats=3, muon_repeats=2, warmup=1)

SMOOTHING_VARIANTS = {
    "update, window 3": {"target": "update", "window": 3},
    "update, window 5": {"target": "update", "window": 5},
    "gradient, window 3": {"target": "gradient", "window": 3},
    "gradient, window 5": {"target": "gradient", "window": 5},
}


# --- timing ------------------------------------------------------------------------------------


class Clock:
    """Times a call on the CPU with ``perf_counter`` or on a GPU with CUDA events."""

    # NOTE: the CUDA paths here and in PeakMemory have not run on a GPU yet.

    def __init__(self, device: torch.device):
        self.device = device

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def seconds(self, fn: Callable[[], object]) -> float:
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.sync()
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1000.0
        started = time.perf_counter()
        fn()
        return time.perf_counter() - started


def interleave(clock: Clock, cases: dict[str, Callable[[], object]], repeats: int, warmup: int) -> dict[str, list[float]]:
    """Time every case ``repeats`` times, one of each per round, in an order rotated each round."""
    for _ in range(warmup):
        for fn in cases.values():
            fn()
            clock.sync()

    names = list(cases)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            samples[name].append(clock.seconds(cases[name]))
    return samples


def quartiles(values: list[float]) -> tuple[float, float, float]:
    """Return the 25th percentile, median and 75th percentile of ``values``."""
    if len(values) == 1:
        return values[0], values[0], values[0]
    low, median, high = statistics.quantiles(values, n=4, method="inclusive")
    return low, median, high


def paired_ratios(samples: dict[str, list[float]], numerator: str, denominator: str) -> list[float]:
    return [a / b for a, b in zip(samples[numerator], samples[denominator])]


# --- memory ------------------------------------------------------------------------------------


class PeakMemory:
    """Measures how far memory use rises above its level at the start of a call.

    On a GPU it reads ``torch.cuda.max_memory_allocated`` after resetting the peak. On Linux CPUs
    it takes the peak resident set size (``VmHWM``, reset by writing 5 to ``/proc/self/clear_refs``)
    minus the resident size before the call. glibc's mmap threshold is fixed at 64 KiB, so every
    freed tensor buffer goes back to the kernel and the resident size follows live tensors.
    Elsewhere it reports nothing.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.method = "unavailable"
        self._libc = None
        if device.type == "cuda":
            self.method = "torch.cuda.max_memory_allocated after reset_peak_memory_stats"
        elif sys.platform.startswith("linux") and self._fix_mmap_threshold():
            self.method = (
                "peak resident set size (VmHWM, reset through /proc/self/clear_refs) minus the resident "
                "size before the call, in a separate process whose glibc mmap threshold is fixed at 64 KiB"
            )

    def _fix_mmap_threshold(self) -> bool:
        """Send every allocation above 64 KiB to mmap; call this before the process allocates tensors.

        Memory freed before the call can stay resident in the heap and be reused unseen, and a fixed
        threshold also makes allocations slower, which is why memory is measured in its own process.
        """
        try:
            self._libc = ctypes.CDLL("libc.so.6")
            return self._libc.mallopt(-3, 64 * 1024) == 1  # -3 is M_MMAP_THRESHOLD
        except OSError:
            return False

    @staticmethod
    def _status_bytes(key: str) -> int:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        raise KeyError(key)

    def rise(self, fn: Callable[[], object]) -> int | None:
        """Return the bytes by which memory use peaked above its level before ``fn``, or None."""
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            before = torch.cuda.memory_allocated(self.device)
            fn()
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - before
        if self.method == "unavailable":
            return None
        self._libc.malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
        before = self._status_bytes("VmRSS")
        fn()
        return self._status_bytes("VmHWM") - before


# --- models and optimizers ---------------------------------------------------------------------


def gpt2_config(shapes: Shapes, depth: int):
    from transformers import GPT2Config

    return GPT2Config(
        n_layer=depth, n_embd=shapes.width, n_inner=shapes.mlp, n_head=shapes.heads,
        vocab_size=shapes.vocab, n_positions=max(1024, shapes.sequence), bos_token_id=0, eos_token_id=0,
    )


class BlockStack(nn.Module):
    """A bare stack of GPT-2 blocks with random init, so an optimizer step updates only block parameters."""

    def __init__(self, shapes: Shapes, depth: int):
        from transformers.models.gpt2.modeling_gpt2 import GPT2Block

        super().__init__()
        config = gpt2_config(shapes, depth)
        self.h = nn.ModuleList([GPT2Block(config, layer_idx=i) for i in range(depth)])


def decay_groups(model: nn.Module, weight_decay: float = 0.1) -> list[dict]:
    """Split parameters as GPT-2 recipes do: decay on matrices, none on biases and norm scales."""
    matrices = [p for p in model.parameters() if p.ndim >= 2]
    vectors = [p for p in model.parameters() if p.ndim < 2]
    return [{"params": matrices, "weight_decay": weight_decay}, {"params": vectors, "weight_decay": 0.0}]


def build_base(name: str, model: nn.Module) -> torch.optim.Optimizer:
    if name == "AdamW":
        return torch.optim.AdamW(decay_groups(model), lr=6e-4, foreach=True)
    if name == "SGD":
        return torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, foreach=True)
    config = OptimConfig(name="muon", lr=6e-4, weight_decay=0.1, muon_weight_decay=0.1)
    return build_optimizer(config, model)


class AdamWWithoutStep(torch.optim.AdamW):
    """An AdamW whose step does nothing, so wrapping it times the smoothing pass alone.

    It keeps AdamW's groups and decoupled decay, so the pass does the same work as after a real step.
    """

    @torch.no_grad()
    def step(self, closure=None):
        return None


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def pass_bytes(wrapped: SmoothedOptimizer) -> int:
    """Count the bytes one smoothing pass reads and writes, kernel by kernel (normalize=none)."""
    params = wrapped._params
    smoothed = tensor_bytes(params)
    if wrapped.config.target == "update":
        total = 2 * smoothed + 3 * smoothed  # copy into the snapshot, then D = snapshot - params
        total += sum(2 * tensor_bytes(take(params)) for _, take in wrapped._decay_factors())
        terms = wrapped._residual_mixer.flat_terms
    else:
        total = 2 * smoothed + 2 * smoothed  # the diagonal term writes new tensors; copy back into .grad
        terms = wrapped._mixer.flat_off_diagonal
    # Each accumulation reads its target and its source and writes the target.
    total += sum(3 * tensor_bytes(params[i] for i in term.targets) for term in terms)
    return total


def fill_gradients(model: nn.Module, device: torch.device) -> None:
    generator = torch.Generator(device="cpu").manual_seed(0)
    for p in model.parameters():
        p.grad = (torch.randn(p.shape, generator=generator) * 1e-3).to(device)


# --- the measurements --------------------------------------------------------------------------


def bench_optimizer_steps(shapes: Shapes, depth: int, device: torch.device, clock: Clock, log) -> dict:
    """Time each base optimizer alone and with each smoothing variant on a stack of ``depth`` blocks."""
    results = {}
    for base_name in ("AdamW", "SGD", "Muon"):
        if base_name == "Muon" and depth != shapes.depths[0]:
            continue  # Muon's Newton-Schulz iterations make it the slowest; one stack size is enough.
        torch.manual_seed(0)
        model = BlockStack(shapes, depth).to(device)
        fill_gradients(model, device)
        base = build_base(base_name, model)
        cases = {"base alone": base.step}
        for label, settings in SMOOTHING_VARIANTS.items():
            if base_name == "Muon" and settings["window"] != 3:
                continue
            cases[f"base + {label}"] = smooth(base, model, **settings).step
        repeats = shapes.muon_repeats if base_name == "Muon" else shapes.repeats
        log(f"  {base_name}, {depth} blocks: {len(cases)} cases x {repeats} repeats")
        results[base_name] = interleave(clock, cases, repeats, shapes.warmup)
        del model, base, cases
        gc.collect()
    return results


def bench_smoothing_pass(shapes: Shapes, depth: int, device: torch.device, clock: Clock, log) -> dict:
    """Time the smoothing pass alone (fast path and reference) against a copy of the smoothed params."""
    torch.manual_seed(0)
    model = BlockStack(shapes, depth).to(device)
    fill_gradients(model, device)
    idle_base = AdamWWithoutStep(decay_groups(model), lr=6e-4)

    fast = {label: smooth(idle_base, model, **settings) for label, settings in SMOOTHING_VARIANTS.items()}
    params = fast["update, window 3"]._params
    copies = [torch.empty_like(p) for p in params]
    cases: dict[str, Callable[[], object]] = {"copy": lambda: torch._foreach_copy_(copies, params)}
    for label, wrapped in fast.items():
        cases[f"fast {label}"] = wrapped.step
    for label in ("update, window 3", "gradient, window 3"):
        config = SmoothingConfig(**SMOOTHING_VARIANTS[label])
        cases[f"reference {label}"] = ReferenceSmoothing(idle_base, model, config).step

    log(f"  smoothing pass, {depth} blocks: {len(cases)} cases x {shapes.repeats} repeats")
    samples = interleave(clock, cases, shapes.repeats, shapes.warmup)
    return {
        "samples": samples,
        "smoothed_bytes": tensor_bytes(params),
        "smoothed_params": sum(p.numel() for p in params),
        "pass_bytes": {label: pass_bytes(wrapped) for label, wrapped in fast.items()},
    }


def bench_memory(shapes: Shapes, depth: int, device: torch.device, log, quick: bool) -> dict:
    """Measure the extra memory of each smoothing variant on top of AdamW's own step.

    On a CPU this runs in a child process (``--memory-probe``), so that no tensor was freed into the
    heap before the allocator is set up to make resident memory follow live tensors.
    """
    if device.type == "cpu":
        log(f"  memory, {depth} blocks, in a child process")
        command = [sys.executable, __file__, "--memory-probe", *(["--quick"] if quick else [])]
        child = subprocess.run(command, capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        return json.loads(child.stdout.strip().splitlines()[-1])
    return measure_memory(shapes, depth, device, log)


def measure_memory(shapes: Shapes, depth: int, device: torch.device, log) -> dict:
    meter = PeakMemory(device)
    torch.manual_seed(0)
    model = BlockStack(shapes, depth).to(device)
    fill_gradients(model, device)
    base = build_base("AdamW", model)
    log(f"  memory, {depth} blocks ({meter.method})")

    base.step()  # AdamW allocates its state at the first step; measure a later one.
    results = {"method": meter.method, "base transient": meter.rise(base.step), "variants": {}}
    for label, settings in SMOOTHING_VARIANTS.items():
        wrapped = smooth(base, model, **settings)
        wrapped.step()  # the update target allocates its snapshot at the first step
        transient = meter.rise(wrapped.step)
        persistent = tensor_bytes(wrapped._snapshots or [])
        results["smoothed_bytes"] = tensor_bytes(wrapped._params)
        del wrapped
        gc.collect()

        # The pass on its own, without AdamW's temporaries that may hide its own transient buffers.
        idle = smooth(AdamWWithoutStep(decay_groups(model), lr=6e-4), model, **settings)
        idle.step()
        pass_transient = meter.rise(idle.step)
        del idle
        gc.collect()
        results["variants"][label] = {"persistent": persistent, "transient": transient, "pass transient": pass_transient}
    return results


def bench_training_step(shapes: Shapes, device: torch.device, clock: Clock, log) -> dict:
    """Time forward, backward and step of a GPT-2-small-shaped language model with and without smoothing."""
    from transformers import GPT2LMHeadModel

    depth = shapes.depths[0]
    torch.manual_seed(0)
    model = GPT2LMHeadModel(gpt2_config(shapes, depth)).to(device)
    tokens = torch.randint(0, shapes.vocab, (shapes.batch, shapes.sequence), device=device)
    base = torch.optim.AdamW(decay_groups(model), lr=6e-4, foreach=True)
    # The wrappers share the base optimizer and its state, so all cases step the same model.
    optimizers = {
        "AdamW": base,
        "AdamW + update, window 3": smooth(base, model, target="update", window=3),
        "AdamW + gradient, window 3": smooth(base, model, target="gradient", window=3),
    }

    def training_step(optimizer: torch.optim.Optimizer) -> Callable[[], None]:
        def run() -> None:
            optimizer.zero_grad(set_to_none=True)
            loss = model(input_ids=tokens, labels=tokens).loss
            loss.backward()
            optimizer.step()

        return run

    cases = {name: training_step(optimizer) for name, optimizer in optimizers.items()}
    log(f"  training step, {depth} blocks, {shapes.batch} x {shapes.sequence} tokens: "
        f"{len(cases)} cases x {shapes.step_repeats} repeats")
    samples = interleave(clock, cases, shapes.step_repeats, shapes.warmup)
    return {
        "samples": samples,
        "params": sum(p.numel() for p in model.parameters()),
        "smoothed_params": sum(p.numel() for p in optimizers["AdamW + update, window 3"]._params),
        "tokens": shapes.batch * shapes.sequence,
    }


# --- the machine -------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit.stdout.strip() + (" (with uncommitted changes)" if dirty.stdout.strip() else "")


def machine(device: torch.device) -> dict:
    info = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "commit": git_commit(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def load_average() -> list[float] | None:
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except OSError:
        return None


# --- the page ----------------------------------------------------------------------------------


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}" if seconds < 10 else f"{seconds * 1000:.0f}"


def timing_cell(values: list[float]) -> str:
    low, median, high = quartiles(values)
    return f"{ms(median)} ({ms(low)}–{ms(high)})"


def ratio_cell(values: list[float]) -> str:
    low, median, high = quartiles(values)
    return f"{median:.3f}× ({low:.3f}–{high:.3f})"


def mib(count: int | None) -> str:
    return "n/a" if count is None else f"{count / 2**20:.1f} MiB"


def summarize(result: dict) -> dict:
    """Compute the figures the targets are judged on from one device's raw results."""
    step = result["training_step"]["samples"]
    first = str(result["shapes"]["depths"][0])
    passes = result["smoothing_pass"][first]
    samples = passes["samples"]
    copy_seconds = statistics.median(samples["copy"])
    copy_bandwidth = 2 * passes["smoothed_bytes"] / copy_seconds
    pass_seconds = statistics.median(samples["fast update, window 3"])
    pass_bandwidth = passes["pass_bytes"]["update, window 3"] / pass_seconds
    memory = result["memory"]
    update = memory["variants"]["update, window 3"]
    gradient = memory["variants"]["gradient, window 3"]
    base_transient = memory["base transient"]

    def extra(variant: dict) -> int | None:
        if variant["transient"] is None or base_transient is None:
            return None
        return variant["persistent"] + max(0, variant["transient"] - base_transient)

    return {
        "step_ratio": statistics.median(paired_ratios(step, "AdamW + update, window 3", "AdamW")),
        "pass_seconds": pass_seconds,
        "reference_seconds": statistics.median(samples["reference update, window 3"]),
        "copy_seconds": copy_seconds,
        "copy_bandwidth": copy_bandwidth,
        "pass_bandwidth": pass_bandwidth,
        "bandwidth_fraction": pass_bandwidth / copy_bandwidth,
        "speedup": statistics.median(
            paired_ratios(samples, "reference update, window 3", "fast update, window 3")
        ),
        "gradient_speedup": statistics.median(
            paired_ratios(samples, "reference gradient, window 3", "fast gradient, window 3")
        ),
        "speedups": {
            depth: statistics.median(
                paired_ratios(passes_at_depth["samples"], "reference update, window 3", "fast update, window 3")
            )
            for depth, passes_at_depth in result["smoothing_pass"].items()
        },
        "update_extra": extra(update),
        "update_persistent": update["persistent"],
        "gradient_extra": extra(gradient),
        "gradient_persistent": gradient["persistent"],
        "gradient_pass_transient": gradient["pass transient"],
        "smoothed_bytes": memory["smoothed_bytes"],
    }


def render_targets(result: dict) -> list[str]:
    s = summarize(result)
    step = result["training_step"]
    step_samples = step["samples"]
    base_step = statistics.median(step_samples["AdamW"])
    # From the paired ratio, which drifts in machine load cancel out of, not from a difference of medians.
    added = (s["step_ratio"] - 1.0) * base_step
    gradient_transient_ok = s["gradient_persistent"] == 0
    update_memory_ok = s["update_extra"] is not None and s["update_extra"] <= s["smoothed_bytes"] * 1.01

    def verdict(ok: bool) -> str:
        return "met" if ok else "**not met**"

    lines = [
        "| target | measured | verdict |",
        "|---|---|---|",
        f"| whole training step with smoothing (update, window 3) ≤ {TARGET_STEP_RATIO:.2f}× without | "
        f"{s['step_ratio']:.3f}× | {verdict(s['step_ratio'] <= TARGET_STEP_RATIO)} |",
        f"| smoothing pass ≥ {TARGET_BANDWIDTH_FRACTION:.0%} of copy bandwidth | "
        f"{s['bandwidth_fraction']:.0%} ({s['pass_bandwidth'] / 1e9:.1f} of {s['copy_bandwidth'] / 1e9:.1f} GB/s) | "
        f"{verdict(s['bandwidth_fraction'] >= TARGET_BANDWIDTH_FRACTION)} |",
        f"| ≥ {TARGET_REFERENCE_SPEEDUP:.0f}× faster than the per-parameter reference (update, window 3) | "
        + ", ".join(f"{speedup:.2f}× at {depth} blocks" for depth, speedup in s["speedups"].items())
        + f"; gradient target {s['gradient_speedup']:.2f}× at {result['shapes']['depths'][0]} blocks | "
        f"{verdict(s['speedup'] >= TARGET_REFERENCE_SPEEDUP)} |",
        f"| extra memory ≤ one copy of the smoothed params ({mib(s['smoothed_bytes'])}), update target | "
        f"{mib(s['update_extra'])} ({mib(s['update_persistent'])} persistent) | {verdict(update_memory_ok)} |",
        f"| only transient buffers, gradient target | {mib(s['gradient_persistent'])} persistent; "
        f"{mib(s['gradient_pass_transient'])} transient in the pass, {mib(s['gradient_extra'])} above AdamW's step peak | "
        f"{verdict(gradient_transient_ok)} |",
        "",
    ]

    gaps = []
    if s["step_ratio"] > TARGET_STEP_RATIO:
        per_token = base_step / step["tokens"]
        break_even = added / ((TARGET_STEP_RATIO - 1) * per_token) if per_token > 0 else float("inf")
        gaps.append(
            f"- **Whole step.** Smoothing adds about {ms(added)} ms (the median paired ratio times the "
            f"median time) to a {ms(base_step)} ms step of "
            f"{step['tokens']:,} tokens. That is a fixed cost per optimizer step: the pass alone takes "
            f"{ms(s['pass_seconds'])} ms, {s['pass_seconds'] / s['copy_seconds']:.1f} times a copy of the "
            f"{s['smoothed_bytes'] / 1e6:.0f} MB of smoothed parameters, while the forward and backward pass "
            f"grows with the batch. On this CPU the step would reach {TARGET_STEP_RATIO:.2f}× at about "
            f"{break_even:,.0f} tokens per optimizer step (an extrapolation from the measured step time per "
            f"token, not a measurement); GPT-2 recipes use about 0.5 M tokens per step through gradient "
            f"accumulation."
        )
    if s["bandwidth_fraction"] < TARGET_BANDWIDTH_FRACTION:
        gaps.append(
            f"- **Bandwidth.** The pass moved {s['pass_bandwidth'] / 1e9:.1f} GB/s against "
            f"{s['copy_bandwidth'] / 1e9:.1f} GB/s for a copy."
        )
    if s["speedup"] < TARGET_REFERENCE_SPEEDUP:
        copies = s["pass_seconds"] / s["copy_seconds"]
        reference_copies = s["reference_seconds"] / s["copy_seconds"]
        gaps.append(
            f"- **Reference.** The fast path is {s['speedup']:.2f}× faster than the per-parameter reference "
            f"on the update target: {copies:.1f} against {reference_copies:.1f} copies' worth of time. Both are "
            f"memory-bound elementwise work on tensors of megabytes, so the Python loop the fast path removes "
            f"costs little here; what it saves is the reference's per-step clones and temporaries. Its own "
            f"floor with separate torch._foreach_* kernels is the bytes it moves: the snapshot copy, "
            f"D = snapshot - params, the decay, and one read-read-write pass per non-zero diagonal of "
            f"I - M. A single fused kernel per slot (one read of the new and old parameters of every block, "
            f"one write) would move 2.5 copies' worth and could reach about "
            f"{reference_copies / 2.5:.1f}× if it ran at copy bandwidth; no such kernel is built yet "
            f"(torch.compile or a custom kernel). On a GPU the launches saved by grouping weigh more. "
            f"The verdict uses the GPT-2-small stack ({result['shapes']['depths'][0]} blocks); the ratio at "
            f"other depths, where the reference's time per byte differs, is in the same row and in the "
            f"pass tables below."
        )
    if not update_memory_ok:
        gaps.append(f"- **Memory.** The update target added {mib(s['update_extra'])}.")
    if gaps:
        lines += ["Where a target is not met, the measured gap and its cause:", "", *gaps, ""]
    return lines


def render_section(result: dict) -> list[str]:
    info = result["machine"]
    shapes = result["shapes"]
    device = result["device"]
    title = "GPU" if device == "cuda" else "CPU"
    lines = [f"## {title}: {info.get('gpu', info['cpu'])}", ""]
    lines.append(
        f"Run on {info['date']} at commit {info['commit']}: {info['cpu']}, {info['cores']} cores, "
        f"torch {info['torch']} with {info['threads']} threads, Python {info['python']}"
        + (f", GPU {info['gpu']}" if "gpu" in info else "")
        + f". Command: `{result['command']}`."
    )
    loads, cores = result["load_average"], info["cores"] or 1
    if loads:
        before, after = loads["before"], loads["after"]
        shared = max(before[0], after[0]) > 0.5
        lines.append(
            f"Load average (1, 5, 15 min) {before} before and {after} after the run"
            + (f": the {cores} cores were shared with other jobs, so timings are noisy and the ranges "
               "matter." if shared else ".")
        )
    lines.append(
        f"Timings in ms: median (25th–75th percentile) of {shapes['repeats']} interleaved repeats "
        f"({shapes['step_repeats']} for whole training steps, {shapes['muon_repeats']} for Muon), "
        + ("timed with CUDA events" if device == "cuda" else "timed with time.perf_counter")
        + f"; the whole benchmark took {result['seconds'] / 60:.1f} min."
    )
    lines += ["", "### Targets", ""] + render_targets(result)

    step = result["training_step"]
    samples = step["samples"]
    lines += [
        "### Whole training step",
        "",
        f"GPT-2-small-shaped language model ({shapes['depths'][0]} blocks, width {shapes['width']}, MLP "
        f"{shapes['mlp']}, vocabulary {shapes['vocab']:,}; {step['params'] / 1e6:.1f} M parameters, "
        f"{step['smoothed_params'] / 1e6:.1f} M of them in the smoothed blocks), random init, a batch of "
        f"{shapes['batch']} × {shapes['sequence']} random tokens; forward, backward and AdamW step "
        "(`foreach`, decay 0.1 on matrices).",
        "",
        "| case | time (ms) | ratio to AdamW alone |",
        "|---|---|---|",
    ]
    for name, values in samples.items():
        ratio = "1" if name == "AdamW" else ratio_cell(paired_ratios(samples, name, "AdamW"))
        lines.append(f"| {name} | {timing_cell(values)} | {ratio} |")
    lines.append("")

    lines += ["### Optimizer step alone", "",
              "Bare stacks of GPT-2 blocks with fixed random gradients; every block parameter is smoothed.", ""]
    for depth, by_base in result["optimizer_steps"].items():
        lines += [f"**{depth} blocks**", "", "| base | case | time (ms) | ratio to base alone |", "|---|---|---|---|"]
        for base_name, cases in by_base.items():
            for name, values in cases.items():
                ratio = "1" if name == "base alone" else ratio_cell(paired_ratios(cases, name, "base alone"))
                lines.append(f"| {base_name} | {name} | {timing_cell(values)} | {ratio} |")
        lines.append("")

    lines += [
        "### Smoothing pass alone, against a copy",
        "",
        "The pass wraps an AdamW whose step does nothing, so it runs the snapshot, the decay and the mixing "
        "(update target) or the mixing and the copy back into `.grad` (gradient target) on their own. "
        "`copy` copies the smoothed parameters once. Bytes count what each kernel reads and writes; "
        "bandwidth is bytes over the median time. The count leaves out the cache's write-allocate reads, "
        "which probably weigh more on a copy (half its bytes are writes) than on accumulations (a third), "
        "so a fraction above 100% is possible. \"In copies\" is the time over the copy's time. The "
        "reference is the per-parameter implementation in `tests/smoothing_reference.py`, which the tests "
        "hold the fast path equal to.",
        "",
    ]
    for depth, passes in result["smoothing_pass"].items():
        pass_samples = passes["samples"]
        copy_seconds = statistics.median(pass_samples["copy"])
        copy_bandwidth = 2 * passes["smoothed_bytes"] / copy_seconds
        lines += [
            f"**{depth} blocks**, {passes['smoothed_params'] / 1e6:.1f} M smoothed parameters "
            f"({passes['smoothed_bytes'] / 1e6:.0f} MB)",
            "",
            "| case | time (ms) | in copies | bytes moved | GB/s | of copy bandwidth | reference ÷ fast |",
            "|---|---|---|---|---|---|---|",
            f"| copy | {timing_cell(pass_samples['copy'])} | 1 | {2 * passes['smoothed_bytes'] / 1e6:.0f} MB | "
            f"{copy_bandwidth / 1e9:.1f} | 100% | |",
        ]
        for label in SMOOTHING_VARIANTS:
            seconds = statistics.median(pass_samples[f"fast {label}"])
            moved = passes["pass_bytes"][label]
            speedup = ""
            if f"reference {label}" in pass_samples:
                speedup = ratio_cell(paired_ratios(pass_samples, f"reference {label}", f"fast {label}"))
            lines.append(
                f"| fast {label} | {timing_cell(pass_samples[f'fast {label}'])} | {seconds / copy_seconds:.1f} | "
                f"{moved / 1e6:.0f} MB | {moved / seconds / 1e9:.1f} | {moved / seconds / copy_bandwidth:.0%} | {speedup} |"
            )
        for label in SMOOTHING_VARIANTS:
            name = f"reference {label}"
            if name in pass_samples:
                seconds = statistics.median(pass_samples[name])
                lines.append(f"| {name} | {timing_cell(pass_samples[name])} | {seconds / copy_seconds:.1f} | | | | |")
        lines.append("")
        slow = [
            label
            for label in SMOOTHING_VARIANTS
            if passes["pass_bytes"][label] / statistics.median(pass_samples[f"fast {label}"]) / copy_bandwidth
            < TARGET_BANDWIDTH_FRACTION
        ]
        if slow:
            lines += [
                f"Below {TARGET_BANDWIDTH_FRACTION:.0%} of copy bandwidth here: {', '.join(slow)}. The gradient "
                "target allocates its mixed copy every step (it keeps no persistent buffer), so its time "
                "probably includes the cost of fresh pages, which depends on what the allocator has free; "
                "the update target reuses its buffers.",
                "",
            ]

    memory = result["memory"]
    lines += [
        "### Extra memory",
        "",
        f"AdamW on the {shapes['depths'][0]}-block stack, {mib(memory['smoothed_bytes'])} of smoothed "
        f"parameters. Persistent: the wrapper's buffers, counted exactly. Transient: the rise of memory "
        f"during one step above its level before the step, minus the same rise for AdamW alone "
        f"({mib(memory['base transient'])} of foreach temporaries). The pass's own transient buffers are "
        f"the same rise for the pass alone (an AdamW whose step does nothing); they can overlap AdamW's "
        f"temporaries in time or not, so the step's peak is what the extra-memory target counts. "
        f"Measured as {memory['method']}.",
        "",
        "| variant | persistent | step peak above AdamW's | pass alone, transient | extra, in smoothed-param copies |",
        "|---|---|---|---|---|",
    ]
    for label, variant in memory["variants"].items():
        transient = None
        if variant["transient"] is not None and memory["base transient"] is not None:
            transient = max(0, variant["transient"] - memory["base transient"])
        total = None if transient is None else (variant["persistent"] + transient) / memory["smoothed_bytes"]
        copies = "n/a" if total is None else f"{total:.2f}"
        lines.append(
            f"| {label} | {mib(variant['persistent'])} | {mib(transient)} | {mib(variant['pass transient'])} | {copies} |"
        )
    lines.append("")
    return lines


def render_page(results: dict[str, dict]) -> str:
    lines = [
        "# Smoothing overhead",
        "",
        "What Gradient Smoothing costs on top of its base optimizer, written by "
        "`scripts/bench_smoothing.py` (`make bench`); do not edit by hand.",
        "",
    ]
    if "cuda" not in results:
        lines += ["All figures on this page are CPU-only: the benchmark has not run on a GPU yet.", ""]
    for device in ("cuda", "cpu"):
        if device in results:
            lines += render_section(results[device])
    return "\n".join(lines).rstrip() + "\n"


def write_page(output_dir: Path) -> Path:
    """Render ``smoothing.md`` in ``output_dir`` from every ``smoothing-<device>.json`` there."""
    results = {}
    for path in sorted(output_dir.glob("smoothing-*.json")):
        loaded = json.loads(path.read_text())
        results[loaded["device"]] = loaded
    if not results:
        raise SystemExit(f"no smoothing-<device>.json in {output_dir}; run the benchmark first")
    page = output_dir / "smoothing.md"
    page.write_text(render_page(results))
    return page


# --- entry point -------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", help="torch device to time on: cpu or cuda (default: cpu)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes and few repeats: a smoke test, not a measurement")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved repeats per case (default: 7, 3 with --quick)")
    parser.add_argument(
        "--render", action="store_true",
        help="rewrite the page from the raw JSON files in the output directory, without measuring",
    )
    parser.add_argument(
        "--output-dir", type=Path, default=None,
        help="where the page and raw JSON go (default: results/bench, runs/bench-quick with --quick)",
    )
    # Internal: measure CPU memory in this fresh process and print the result as one JSON line.
    parser.add_argument("--memory-probe", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was requested but torch finds no CUDA device; use --device cpu")
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    shapes = QUICK if args.quick else FULL
    if args.memory_probe:
        torch.set_num_threads(1)
        print(json.dumps(measure_memory(shapes, shapes.depths[0], device, lambda message: None)))
        return Path()
    if args.repeats is not None:
        shapes = replace(shapes, repeats=args.repeats)
    output_dir = args.output_dir or (ROOT / ("runs/bench-quick" if args.quick else "results/bench"))
    output_dir.mkdir(parents=True, exist_ok=True)

    def log(message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)

    if args.render:
        return write_page(output_dir)

    clock = Clock(device)
    started = time.perf_counter()
    load_before = load_average()
    log(f"benchmark on {device}, {torch.get_num_threads()} threads, shapes {shapes}")

    result: dict = {"device": device.type, "machine": machine(device), "shapes": vars(shapes).copy(),
                    "command": " ".join(["python", "scripts/bench_smoothing.py", *(argv if argv is not None else sys.argv[1:])])}
    result["training_step"] = bench_training_step(shapes, device, clock, log)
    result["optimizer_steps"], result["smoothing_pass"] = {}, {}
    for depth in shapes.depths:
        result["optimizer_steps"][str(depth)] = bench_optimizer_steps(shapes, depth, device, clock, log)
        result["smoothing_pass"][str(depth)] = bench_smoothing_pass(shapes, depth, device, clock, log)
    result["memory"] = bench_memory(shapes, shapes.depths[0], device, log, args.quick)
    load_after = load_average()
    result["load_average"] = {"before": load_before, "after": load_after} if load_before else None
    result["seconds"] = time.perf_counter() - started

    (output_dir / f"smoothing-{device.type}.json").write_text(json.dumps(result, indent=1) + "\n")
    page = write_page(output_dir)
    log(f"wrote {page} after {result['seconds']:.0f} s")
    for line in render_targets(result):
        print(line)
    return page


if __name__ == "__main__":
    main()
