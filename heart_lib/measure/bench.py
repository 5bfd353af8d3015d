"""Timing and memory of a model's forward pass, with the usual discipline.

Eval mode, inference mode (no autograd), a fixed thread count, warm-up iterations that are not
timed, a device synchronisation around every timed iteration, and at least `min_iters` iterations
*and* `min_time_s` seconds per run so short forwards are not dominated by timer noise.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class TimingSettings:
    """How long to warm up and to time one run."""

    warmup_iters: int = 2
    min_iters: int = 3
    min_time_s: float = 2.0
    max_iters: int = 1000

    def check(self) -> None:
        if self.warmup_iters < 0:
            raise ValueError(f"warmup_iters = {self.warmup_iters}: must be >= 0")
        if self.min_iters < 1:
            raise ValueError(f"min_iters = {self.min_iters}: must be >= 1")
        if self.min_time_s < 0:
            raise ValueError(f"min_time_s = {self.min_time_s}: must be >= 0")
        if self.max_iters < self.min_iters:
            raise ValueError(f"max_iters = {self.max_iters}: must be >= min_iters ({self.min_iters})")


def set_threads(threads: int) -> None:
    """Fix torch's intra-op thread count (interop stays at 1: a forward pass has no parallel branches)."""
    if threads < 1:
        raise ValueError(f"threads = {threads}: must be a positive integer")
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass  # can only be set once per process, before any parallel work; keep what is set


def synchronizer(device: str) -> Callable[[], None]:
    """A function that waits for all queued work on `device` (a no-op on the CPU, which is synchronous)."""
    if device.startswith("cuda"):
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def make_input(batch_size: int, image_size: int, device: str, precision: str, seed: int = 0,
               channels: int = 3) -> torch.Tensor:
    """A seeded random image batch (values do not change the timing of a dense ViT)."""
    if batch_size < 1:
        raise ValueError(f"batch_size = {batch_size}: must be a positive integer")
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, channels, image_size, image_size, generator=gen)
    return x.to(device=device, dtype=PRECISIONS[precision])


# ------------------------------------------------------------------ memory


def _vm_hwm_bytes() -> int | None:
    try:
        with open("/proc/self/status") as handle:
            match = re.search(r"VmHWM:\s+(\d+) kB", handle.read())
        return int(match.group(1)) * 1024 if match else None
    except OSError:
        return None


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/status") as handle:
            match = re.search(r"VmRSS:\s+(\d+) kB", handle.read())
        return int(match.group(1)) * 1024 if match else None
    except OSError:
        return None


def reset_peak_memory(device: str) -> str:
    """Start a new peak-memory window; returns what will be measured.

    CUDA: the caching allocator's peak. Linux CPU: the process's resident high-water mark, which
    writing "5" to /proc/self/clear_refs resets (Linux >= 4.0); elsewhere the process peak so far.
    """
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
        return "cuda_max_allocated"
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return "rss_peak"
    except OSError:
        return "process_peak_rss"


def peak_memory_bytes(device: str) -> int | None:
    if device.startswith("cuda"):
        return int(torch.cuda.max_memory_allocated(device))
    hwm = _vm_hwm_bytes()
    if hwm is not None:
        return hwm
    try:
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
    except (ImportError, OSError):
        return None


def available_memory_bytes(device: str) -> int | None:
    """Memory a new allocation can still get: free GPU memory, or MemAvailable on Linux."""
    if device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as handle:
            match = re.search(r"MemAvailable:\s+(\d+) kB", handle.read())
        return int(match.group(1)) * 1024 if match else None
    except OSError:
        return None


def is_out_of_memory(err: BaseException) -> bool:
    """Whether an exception means the batch did not fit (CUDA OOM, CPU allocation failure)."""
    if isinstance(err, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text
                                              or "failed to allocate" in text)


def forward_mode(autograd: bool = False):
    """The grad mode forwards are timed in: inference mode, or no_grad for a model whose forward
    differentiates inside itself (the HEART oracle's Hessian-vector products), since tensors made in
    inference mode can never enter autograd."""
    return torch.no_grad() if autograd else torch.inference_mode()


def _activation_floor_bytes(model: torch.nn.Module, x: torch.Tensor, autograd: bool = False) -> int:
    """A lower bound of one forward's live activations: input plus the two largest module outputs.

    The measured growth of a batch-1 probe can be zero when the allocator reuses memory freed by
    earlier work in the same process, so the prediction never goes below this floor.
    """
    sizes: list[int] = []

    def hook(_module, _inputs, output):
        if isinstance(output, torch.Tensor):
            sizes.append(output.numel() * output.element_size())

    handles = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    try:
        with forward_mode(autograd):
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    largest = sorted(sizes, reverse=True)[:2]
    return x.numel() * x.element_size() + sum(largest)


def predict_fits(model: torch.nn.Module, batch_size: int, image_size: int, device: str, precision: str,
                 headroom: float = 0.8, autograd: bool = False) -> tuple[bool, str]:
    """Whether a forward at `batch_size` should fit, from a batch-1 probe's memory growth.

    On a CPU an allocation that does not fit often does not raise: the kernel's out-of-memory
    killer ends the process, or the machine swaps. So the batch-1 peak growth (never below the
    activation floor) is scaled by the batch size and compared with `headroom` times the memory
    available. Allocation errors that do happen are still caught by the caller.
    """
    available = available_memory_bytes(device)
    if available is None:
        return True, "available memory unknown"
    sync = synchronizer(device)
    x = make_input(1, image_size, device, precision)
    base = torch.cuda.memory_allocated(device) if device.startswith("cuda") else _rss_bytes()
    reset_peak_memory(device)
    with forward_mode(autograd):
        model(x)
    sync()
    peak = peak_memory_bytes(device)
    floor = _activation_floor_bytes(model, x, autograd)
    growth = peak - base if base is not None and peak is not None else 0
    per_image = max(growth, floor)
    need = per_image * batch_size
    detail = (f"predicted {need / 2**30:.2f} GiB for batch {batch_size} "
              f"({per_image / 2**20:.1f} MiB per image), {available / 2**30:.2f} GiB available")
    return need <= headroom * available, detail


# ------------------------------------------------------------------ timing


@dataclass
class Timing:
    latencies_s: np.ndarray  # one per timed iteration (whole batch)
    window: tuple[float, float]  # perf_counter start/end of the timed iterations
    warmup_s: float
    peak_memory_bytes: int | None
    peak_memory_kind: str
    cpu_time_s: float = math.nan  # process CPU time (all threads) during the timed window
    threads: int = 1

    def summary(self, batch_size: int) -> dict[str, Any]:
        lat = self.latencies_s
        median = float(np.median(lat))
        q25, q75 = (float(v) for v in np.percentile(lat, [25, 75]))
        return {
            "iters": int(lat.size),
            "latency_median_ms": 1e3 * median,
            "latency_p25_ms": 1e3 * q25,
            "latency_p75_ms": 1e3 * q75,
            "latency_min_ms": 1e3 * float(lat.min()),
            "latency_max_ms": 1e3 * float(lat.max()),
            "latency_mean_ms": 1e3 * float(lat.mean()),
            "latency_per_image_ms": 1e3 * median / batch_size,
            "throughput_img_s": batch_size / median if median > 0 else math.nan,
            "timed_s": self.window[1] - self.window[0],
            "warmup_s": self.warmup_s,
            "peak_memory_mb": self.peak_memory_bytes / 2**20 if self.peak_memory_bytes is not None else math.nan,
            "peak_memory_kind": self.peak_memory_kind,
            # CPU time over (wall time x threads): near 1 when the threads had the cores to
            # themselves; well below 1 means other processes competed (or, on a GPU, waiting).
            "cpu_share": self.cpu_time_s / ((self.window[1] - self.window[0]) * self.threads),
        }


def time_forward(model: torch.nn.Module, x: torch.Tensor, settings: TimingSettings, device: str,
                 autograd: bool = False) -> Timing:
    """Warm up, then time forward passes of `model` on `x` (see module docstring); `autograd`: the
    forward differentiates inside itself (see `forward_mode`)."""
    settings.check()
    if model.training:
        raise ValueError("the model is in training mode; call model.eval() before timing it")
    sync = synchronizer(device)
    with forward_mode(autograd):
        sync()
        start = time.perf_counter()
        for _ in range(settings.warmup_iters):
            model(x)
        sync()
        warmup_s = time.perf_counter() - start
        kind = reset_peak_memory(device)
        latencies = []
        cpu0 = time.process_time()
        t0 = time.perf_counter()
        while True:
            begin = time.perf_counter()
            model(x)
            sync()
            end = time.perf_counter()
            latencies.append(end - begin)
            if len(latencies) >= settings.max_iters:
                break
            if len(latencies) >= settings.min_iters and end - t0 >= settings.min_time_s:
                break
        t1 = time.perf_counter()
        cpu_time = time.process_time() - cpu0
    return Timing(np.asarray(latencies), (t0, t1), warmup_s, peak_memory_bytes(device), kind, cpu_time,
                  torch.get_num_threads())
