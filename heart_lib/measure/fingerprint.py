"""Device fingerprint: what a timing or energy number depends on besides the model.

Every measured row carries these fields, so results from different machines can be pooled and
told apart. Nothing here fails: a field that cannot be read says why (e.g. "unknown (needs root)").
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import torch

DEVICE_RE = re.compile(r"^(cpu|cuda|cuda:\d+)$")
ALLOWED_DEVICES = "cpu, cuda, cuda:<index>, auto"


def resolve_device(device: str) -> str:
    """Validate a device string; `auto` picks cuda when available. Unknown or absent devices raise."""
    if not isinstance(device, str):
        raise ValueError(f"device = {device!r}: allowed values are {ALLOWED_DEVICES}")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not DEVICE_RE.match(device):
        raise ValueError(f"device = {device!r}: unknown device; allowed values are {ALLOWED_DEVICES}")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device = {device!r}: this torch ({torch.__version__}) sees no CUDA device "
                             "(torch.cuda.is_available() is False); use --device cpu, or on a Jetson install "
                             "NVIDIA's JetPack wheel of PyTorch")
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise ValueError(f"device = {device!r}: only {torch.cuda.device_count()} CUDA device(s) visible")
    return device


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text(errors="replace").strip("\x00\n ")
    except OSError:
        return None


def _run(cmd: list[str], timeout: float = 5.0) -> str | None:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def cpu_info() -> dict[str, Any]:
    """CPU model, logical CPUs, and whether we run under a hypervisor (timings of a VM vary more)."""
    text = _read("/proc/cpuinfo") or ""
    model = None
    for key in ("model name", "Hardware", "Processor"):
        match = re.search(rf"^{key}\s*:\s*(.+)$", text, re.MULTILINE)
        if match:
            model = match.group(1).strip()
            break
    flags = re.search(r"^flags\s*:\s*(.+)$", text, re.MULTILINE)
    return {
        "cpu_model": model or platform.processor() or platform.machine(),
        "cpu_logical": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_hypervisor": bool(flags and " hypervisor" in f" {flags.group(1)}"),
        "machine": platform.machine(),
        "os": f"{platform.system()} {platform.release()}",
    }


def jetson_info() -> dict[str, Any]:
    """Jetson model, L4T and JetPack releases, nvpmodel power mode and jetson_clocks, when on a Jetson."""
    release = _read("/etc/nv_tegra_release")
    model = _read("/proc/device-tree/model")
    if release is None and not (model and "jetson" in model.lower()):
        return {"jetson_model": None, "l4t": None, "jetpack": None, "nvpmodel": None, "jetson_clocks": None}
    l4t = None
    if release:
        match = re.search(r"R(\d+) \(release\), REVISION: ([\d.]+)", release)
        l4t = f"{match.group(1)}.{match.group(2)}" if match else release.splitlines()[0]
    jetpack = _run(["dpkg-query", "--showformat=${Version}", "--show", "nvidia-jetpack"]) or "unknown (nvidia-jetpack package not installed)"
    mode = _run(["nvpmodel", "-q"])
    nvpmodel = None
    if mode:
        match = re.search(r"NV Power Mode:\s*(\S+)", mode)
        ident = mode.strip().splitlines()[-1].strip()
        nvpmodel = f"{match.group(1) if match else mode.splitlines()[0]} (id {ident})" if ident.isdigit() else mode
    clocks = _run(["jetson_clocks", "--show"])
    if clocks is None:
        clocks_state = "unknown (jetson_clocks --show needs root; pass --jetson-clocks on|off)"
    else:
        # --show prints per-CPU MinFreq/MaxFreq/CurrentFreq; all equal at max means clocks are locked.
        locked = re.findall(r"MinFreq=(\d+) MaxFreq=(\d+) CurrentFreq=(\d+)", clocks)
        clocks_state = "on" if locked and all(a == b == c for a, b, c in locked) else "off"
    return {"jetson_model": model, "l4t": l4t, "jetpack": jetpack,
            "nvpmodel": nvpmodel or "unknown (nvpmodel -q failed)", "jetson_clocks": clocks_state}


def gpu_info(device: str) -> dict[str, Any]:
    if not device.startswith("cuda"):
        return {"gpu_name": None, "gpu_memory_gb": None, "cuda": torch.version.cuda, "gpu_driver": None}
    index = int(device.split(":")[1]) if ":" in device else 0
    props = torch.cuda.get_device_properties(index)
    driver = None
    try:
        import pynvml

        pynvml.nvmlInit()
        driver = pynvml.nvmlSystemGetDriverVersion()
        driver = driver.decode() if isinstance(driver, bytes) else driver
        pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001 - no NVML (e.g. Jetson): the driver stays unknown
        driver = None
    return {"gpu_name": props.name, "gpu_memory_gb": round(props.total_memory / 2**30, 1),
            "cuda": torch.version.cuda, "gpu_driver": driver}


def fingerprint(device: str, precision: str, threads: int, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything about the machine and software a measurement depends on.

    `overrides` (from the CLI: --power-mode, --jetson-clocks, --device-name, --notes) replace
    detected values, for facts the process cannot read itself.
    """
    import numpy
    import timm

    from heart_lib import __version__

    info: dict[str, Any] = {
        "device": device,
        "precision": precision,
        "threads": threads,
        "interop_threads": torch.get_num_interop_threads(),
        **cpu_info(),
        **gpu_info(device),
        **jetson_info(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
        "heart_lib": __version__,
        "mkldnn": torch.backends.mkldnn.is_available(),
    }
    for key, value in (overrides or {}).items():
        if value is not None:
            info[key] = value
    info.setdefault("device_name", device_slug(info))
    return info


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def device_slug(info: dict[str, Any]) -> str:
    """A folder name for results/devices/<slug>/: the board, GPU or CPU model, plus threads for CPUs."""
    if info.get("jetson_model"):
        return _slug(info["jetson_model"].replace("NVIDIA", ""))
    if info.get("gpu_name"):
        return _slug(info["gpu_name"])
    name = _slug(str(info.get("cpu_model") or "cpu"))
    vm = "-vm" if info.get("cpu_hypervisor") else ""
    return f"{name}-{info.get('threads')}t{vm}"
