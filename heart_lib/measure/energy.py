"""Energy: power sources behind one interface, a background sampler, and the integration maths.

A *source* returns one reading per call to `read()`:

- kind ``"power"``: instantaneous power in watts (Jetson via jtop or tegrastats);
- kind ``"energy"``: a cumulative energy counter in joules (NVML's total-energy counter on NVIDIA
  GPUs, RAPL's ``energy_uj`` on x86 CPUs), which may wrap around at ``wrap_j``.

The sampler polls a source every `interval_s` on a thread and timestamps each reading with
`time.perf_counter`, the same clock the benchmark uses, so windows line up without conversion.
Energy over a window is the trapezoidal integral of power (power sources) or the difference of the
linearly interpolated counter (energy sources). When no source is usable the result says so, with
the reason, and carries no number: energy is never estimated silently (book/method.md, 'Fine-tuning and edge measurements').
"""

from __future__ import annotations

import glob
import math
import os
import re
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Protocol

import numpy as np

ENERGY_CHOICES = ("auto", "none", "jtop", "nvml", "rapl", "tegrastats")
DEFAULT_INTERVAL_S = 0.1  # the group's Orin protocol: 100 ms

# ---------------------------------------------------------------------------------------------
# Pure maths on traces
# ---------------------------------------------------------------------------------------------


def _check_trace(times: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    times = np.asarray(times, dtype=float)
    values = np.asarray(values, dtype=float)
    if times.ndim != 1 or times.shape != values.shape:
        raise ValueError(f"times and values must be 1-D arrays of equal length, got {times.shape} and {values.shape}")
    if times.size < 2:
        raise ValueError(f"a trace needs at least 2 samples to integrate, got {times.size}")
    if np.any(np.diff(times) <= 0):
        raise ValueError("sample times must be strictly increasing")
    return times, values


def _check_window(times: np.ndarray, t0: float, t1: float) -> None:
    if not t1 > t0:
        raise ValueError(f"window [{t0}, {t1}] is empty: t1 must be greater than t0")
    if t0 < times[0] or t1 > times[-1]:
        raise ValueError(f"window [{t0:.4f}, {t1:.4f}] is not covered by the samples "
                         f"[{times[0]:.4f}, {times[-1]:.4f}]")


def integrate_power(times: Iterable[float], watts: Iterable[float], t0: float | None = None,
                    t1: float | None = None) -> float:
    """Energy in joules: trapezoidal integral of `watts` over [t0, t1] (default: the whole trace).

    Power at the window edges is linearly interpolated between the neighbouring samples, so the
    result does not depend on where samples happen to fall relative to the window.
    """
    times, watts = _check_trace(np.asarray(list(times), dtype=float), np.asarray(list(watts), dtype=float))
    t0 = times[0] if t0 is None else float(t0)
    t1 = times[-1] if t1 is None else float(t1)
    _check_window(times, t0, t1)
    inside = (times > t0) & (times < t1)
    ts = np.concatenate(([t0], times[inside], [t1]))
    ps = np.concatenate(([np.interp(t0, times, watts)], watts[inside], [np.interp(t1, times, watts)]))
    return float(np.sum(0.5 * (ps[1:] + ps[:-1]) * np.diff(ts)))


def unwrap_counter(joules: Iterable[float], wrap_j: float | None) -> np.ndarray:
    """A cumulative counter made monotonic: each decrease is taken as one wrap-around at `wrap_j`."""
    values = np.asarray(joules, dtype=float).copy()
    steps = np.diff(values)
    if np.any(steps < 0):
        if not wrap_j:
            raise ValueError("the energy counter decreased and no wrap-around range is known")
        values[1:] += np.cumsum(np.where(steps < 0, wrap_j, 0.0))
    return values


def counter_energy(times: Iterable[float], joules: Iterable[float], t0: float | None = None,
                   t1: float | None = None, wrap_j: float | None = None) -> float:
    """Energy in joules from a cumulative counter: interpolated counter at t1 minus at t0."""
    times, joules = _check_trace(np.asarray(times, dtype=float), np.asarray(joules, dtype=float))
    joules = unwrap_counter(joules, wrap_j)
    t0 = times[0] if t0 is None else float(t0)
    t1 = times[-1] if t1 is None else float(t1)
    _check_window(times, t0, t1)
    return float(np.interp(t1, times, joules) - np.interp(t0, times, joules))


def counter_to_power(times: Iterable[float], joules: Iterable[float],
                     wrap_j: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Mean power between successive counter readings, placed at the interval midpoints (for plots)."""
    times, joules = _check_trace(np.asarray(times, dtype=float), np.asarray(joules, dtype=float))
    joules = unwrap_counter(joules, wrap_j)
    return 0.5 * (times[1:] + times[:-1]), np.diff(joules) / np.diff(times)


def window_energy(times: np.ndarray, values: np.ndarray, kind: str, t0: float, t1: float,
                  wrap_j: float | None = None) -> float:
    """Energy over [t0, t1] for either kind of trace."""
    if kind == "power":
        return integrate_power(times, values, t0, t1)
    if kind == "energy":
        return counter_energy(times, values, t0, t1, wrap_j)
    raise ValueError(f"trace kind = {kind!r}: allowed values are ['power', 'energy']")


def energy_report(times: Iterable[float], values: Iterable[float], kind: str, run: tuple[float, float],
                  images: int, idle: tuple[float, float] | None = None,
                  wrap_j: float | None = None) -> dict[str, float]:
    """Total and above-idle energy of the run window, per image, and the powers behind them.

    Above-idle energy subtracts the idle window's mean power times the run's duration.
    """
    if images <= 0:
        raise ValueError(f"images = {images}: must be a positive integer")
    times = np.asarray(times, dtype=float)
    values = np.asarray(values, dtype=float)
    t0, t1 = run
    total = window_energy(times, values, kind, t0, t1, wrap_j)
    out = {
        "energy_total_j": total,
        "energy_per_image_j": total / images,
        "mean_power_w": total / (t1 - t0),
        "idle_power_w": math.nan,
        "energy_above_idle_j": math.nan,
        "energy_per_image_above_idle_j": math.nan,
    }
    if idle is not None:
        i0, i1 = idle
        idle_power = window_energy(times, values, kind, i0, i1, wrap_j) / (i1 - i0)
        above = total - idle_power * (t1 - t0)
        out.update(idle_power_w=idle_power, energy_above_idle_j=above, energy_per_image_above_idle_j=above / images)
    return out


# ---------------------------------------------------------------------------------------------
# Parsers for Jetson formats
# ---------------------------------------------------------------------------------------------

# A rail reading: NAME cur/avg, in milliwatts; JetPack 5+ writes the unit ("VDD_IN 5000mW/5000mW"),
# older releases do not ("POM_5V_IN 3067/3067"). The lookahead keeps "RAM 2468/30536MB" out.
_RAIL_RE = re.compile(r"\b([A-Z][A-Z0-9_]*) (\d+)(?:mW)?/(\d+)(?:mW)?(?=\s|$)")
# The rails that measure the whole module's input; without one the rails are summed (jtop's rule).
TOTAL_RAILS = ("VDD_IN", "POM_5V_IN")


def parse_tegrastats_line(line: str) -> dict[str, tuple[int, int]]:
    """Power rails of one tegrastats line: {name: (current_mW, average_mW)}."""
    return {name: (int(cur), int(avg)) for name, cur, avg in _RAIL_RE.findall(line)}


def total_power_mw(rails: Mapping[str, float]) -> tuple[float, str]:
    """Module power from rail readings (mW) and the rule used: a total rail if present, else the sum."""
    if not rails:
        raise ValueError("no power rails in the sample")
    for name in TOTAL_RAILS:
        if name in rails:
            return float(rails[name]), name
    return float(sum(rails.values())), "sum(" + "+".join(sorted(rails)) + ")"


def parse_tegrastats_log(lines: Iterable[str] | str | os.PathLike, interval_s: float) -> dict[str, Any]:
    """A tegrastats log (`tegrastats --interval <ms> --logfile f`) as a power trace.

    tegrastats stamps lines to the second at best, so sample times are the line index times the
    logging interval (starting at 0). Lines without power rails are skipped and counted.
    """
    if not interval_s > 0:
        raise ValueError(f"interval_s = {interval_s}: must be positive")
    if isinstance(lines, (str, os.PathLike)) and Path(lines).is_file():
        lines = Path(lines).read_text().splitlines()
    elif isinstance(lines, str):
        lines = lines.splitlines()
    times, watts, rules, skipped = [], [], set(), 0
    for index, line in enumerate(lines):
        rails = parse_tegrastats_line(line)
        if not rails:
            skipped += 1
            continue
        mw, rule = total_power_mw({k: v[0] for k, v in rails.items()})
        times.append(index * interval_s)
        watts.append(mw / 1000.0)
        rules.add(rule)
    return {"times": np.asarray(times), "watts": np.asarray(watts), "rule": ";".join(sorted(rules)),
            "skipped_lines": skipped}


def jtop_total_watts(power: Mapping[str, Any]) -> float:
    """Total module power in watts from jtop's `jetson.power` dict ({'rail': {...}, 'tot': {'power': mW}})."""
    try:
        return float(power["tot"]["power"]) / 1000.0
    except (KeyError, TypeError) as err:
        raise ValueError(f"jtop power sample has no tot/power entry: {power!r}") from err


# ---------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------


class SourceUnavailable(ValueError):
    """A power source cannot be used here; the message says why."""


class EnergySource(Protocol):
    name: str
    kind: str  # "power" (W) or "energy" (cumulative J)
    wrap_j: float | None

    def read(self) -> float: ...

    def describe(self) -> dict[str, Any]: ...

    def close(self) -> None: ...


@dataclass
class NoEnergySource:
    """The explicit absence of an energy source, with the reasons each candidate failed."""

    reason: str
    name: str = "none"
    kind: str = "none"
    wrap_j: float | None = None

    def read(self) -> float:
        raise SourceUnavailable(self.reason)

    def describe(self) -> dict[str, Any]:
        return {"energy_source": "none", "energy_reason": self.reason}

    def close(self) -> None:
        pass


POWERCAP_ROOT = "/sys/class/powercap"


class RaplSource:
    """x86 CPU package energy from RAPL (`/sys/class/powercap/intel-rapl:N/energy_uj`), all packages summed."""

    name, kind = "rapl", "energy"

    def __init__(self, root: str = POWERCAP_ROOT):
        if not os.path.isdir(root):
            raise SourceUnavailable(f"RAPL: {root} does not exist (no powercap driver exposed by this kernel)")
        # Packages only (intel-rapl:0, intel-rapl:1 ...); sub-zones such as intel-rapl:0:0 are inside them.
        zones = sorted(p for p in glob.glob(os.path.join(root, "intel-rapl:*")) if re.search(r"intel-rapl:\d+$", p))
        if not zones:
            raise SourceUnavailable(f"RAPL: {root} has no intel-rapl:<n> package zones "
                                    f"(present: {sorted(os.listdir(root)) or 'nothing'})")
        self.files = [os.path.join(z, "energy_uj") for z in zones]
        self.names = []
        for zone in zones:
            try:
                self.names.append(Path(zone, "name").read_text().strip())
            except OSError:
                self.names.append(os.path.basename(zone))
        ranges = []
        for zone in zones:
            try:
                ranges.append(int(Path(zone, "max_energy_range_uj").read_text()) / 1e6)
            except (OSError, ValueError):
                ranges.append(None)
        # Wrap correction is exact only for one zone; with several, each wraps on its own, so we
        # unwrap per zone inside read() instead and report a monotonic sum.
        self._ranges = ranges
        self._last = [None] * len(self.files)
        self._offsets = [0.0] * len(self.files)
        self.wrap_j = None
        try:
            self.read()
        except OSError as err:
            raise SourceUnavailable(f"RAPL: cannot read {self.files[0]}: {err}") from err

    def read(self) -> float:
        total = 0.0
        for i, path in enumerate(self.files):
            with open(path) as handle:
                value = int(handle.read()) / 1e6
            last = self._last[i]
            if last is not None and value < last and self._ranges[i]:
                self._offsets[i] += self._ranges[i]
            self._last[i] = value
            total += value + self._offsets[i]
        return total

    def describe(self) -> dict[str, Any]:
        return {"energy_source": "rapl", "energy_reason": f"RAPL package zones {self.names} (CPU package only)"}

    def close(self) -> None:
        pass


class NvmlSource:
    """NVIDIA GPU energy from NVML's cumulative counter (mJ since driver load; Volta and newer)."""

    name, kind, wrap_j = "nvml", "energy", None

    def __init__(self, index: int = 0):
        try:
            import pynvml
        except ImportError as err:
            raise SourceUnavailable("NVML: pynvml is not installed (pip install nvidia-ml-py)") from err
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as err:
            raise SourceUnavailable(f"NVML: nvmlInit failed: {err}") from err
        self._nvml = pynvml
        try:
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            self.gpu_name = pynvml.nvmlDeviceGetName(self._handle)
            self.read()
        except pynvml.NVMLError as err:
            pynvml.nvmlShutdown()
            raise SourceUnavailable(f"NVML: GPU {index} has no total-energy counter: {err}") from err
        self.index = index

    def read(self) -> float:
        return self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle) / 1000.0

    def describe(self) -> dict[str, Any]:
        name = self.gpu_name.decode() if isinstance(self.gpu_name, bytes) else self.gpu_name
        return {"energy_source": "nvml", "energy_reason": f"NVML total energy counter of GPU {self.index} ({name}; board power)"}

    def close(self) -> None:
        try:
            self._nvml.nvmlShutdown()
        except Exception:  # noqa: BLE001 - shutting down twice is harmless
            pass


class JtopSource:
    """Jetson module power from jtop (jetson-stats): `jetson.power['tot']['power']` in mW.

    jtop's service samples at the interval of the first client that connects after it starts
    (a later client asking for another interval is refused with a warning); reading faster than
    the service returns repeated values, which the sampler reports as the effective interval.
    """

    name, kind, wrap_j = "jtop", "power", None

    def __init__(self, interval_s: float = DEFAULT_INTERVAL_S, client: Any = None):
        if client is None:
            try:
                from jtop import jtop
            except ImportError as err:
                raise SourceUnavailable("jtop: jetson-stats is not installed (sudo pip3 install -U jetson-stats)") from err
            try:
                client = jtop(interval=interval_s)
                client.start()
            except Exception as err:  # noqa: BLE001 - jtop raises its own JtopException types
                raise SourceUnavailable(f"jtop: cannot connect to the jtop service: {err}") from err
        self._client = client
        try:
            self.read()
        except (ValueError, KeyError) as err:
            raise SourceUnavailable(f"jtop: no total power reading: {err}") from err

    def read(self) -> float:
        # jtop's client is a thread that receives the service's updates; `ok()` would block until
        # the next update (and is known to turn False at short intervals), so liveness is checked
        # on the thread instead and the latest received sample is read without waiting.
        if hasattr(self._client, "is_alive") and not self._client.is_alive():
            raise SourceUnavailable("jtop: the client lost the jtop service")
        return jtop_total_watts(self._client.power)

    def describe(self) -> dict[str, Any]:
        rule = self._client.power.get("tot", {}).get("name", "sum of rails")
        interval = getattr(self._client, "interval", None)
        return {"energy_source": "jtop", "energy_reason": f"jtop total module power ({rule}); service interval {interval} s"}

    def close(self) -> None:
        if hasattr(self._client, "close"):
            try:
                self._client.close()
            except Exception:  # noqa: BLE001
                pass


class TegrastatsSource:
    """Jetson module power from a live `tegrastats --interval <ms>` process (for Jetsons without jtop)."""

    name, kind, wrap_j = "tegrastats", "power", None

    def __init__(self, interval_s: float = DEFAULT_INTERVAL_S, command: list[str] | None = None):
        if command is None:
            exe = shutil.which("tegrastats") or ("/usr/bin/tegrastats" if os.path.exists("/usr/bin/tegrastats") else None)
            if exe is None:
                raise SourceUnavailable("tegrastats: not found on PATH (not a Jetson, or L4T tools missing)")
            command = [exe, "--interval", str(max(1, int(round(interval_s * 1000))))]
        try:
            self._proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, bufsize=1)
        except OSError as err:
            raise SourceUnavailable(f"tegrastats: cannot start {command[0]}: {err}") from err
        self._latest: float | None = None
        self.rule = ""
        self._error: str | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._follow, daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout=max(5.0, 20 * interval_s)):
            self.close()
            raise SourceUnavailable(f"tegrastats: no line with power rails within 5 s ({self._error or 'no output'})")

    def _follow(self) -> None:
        for line in self._proc.stdout:  # type: ignore[union-attr]
            rails = parse_tegrastats_line(line)
            if rails:
                mw, self.rule = total_power_mw({k: v[0] for k, v in rails.items()})
                self._latest = mw / 1000.0
                self._ready.set()
        self._error = f"tegrastats exited with code {self._proc.wait()}"

    def read(self) -> float:
        if self._error is not None:
            raise SourceUnavailable(self._error)
        if self._latest is None:
            raise SourceUnavailable("tegrastats: no reading yet")
        return self._latest

    def describe(self) -> dict[str, Any]:
        return {"energy_source": "tegrastats", "energy_reason": f"tegrastats module power ({self.rule})"}

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                self._proc.kill()


class CallableSource:
    """A source from a function (tests, replays, custom meters): `read_fn()` returns W or cumulative J."""

    def __init__(self, read_fn: Callable[[], float], kind: str = "power", name: str = "callable",
                 wrap_j: float | None = None):
        if kind not in ("power", "energy"):
            raise ValueError(f"kind = {kind!r}: allowed values are ['power', 'energy']")
        self._read, self.kind, self.name, self.wrap_j = read_fn, kind, name, wrap_j

    def read(self) -> float:
        return float(self._read())

    def describe(self) -> dict[str, Any]:
        return {"energy_source": self.name, "energy_reason": f"{self.name} ({self.kind})"}

    def close(self) -> None:
        pass


def candidates_for(device: str) -> tuple[str, ...]:
    """The sources `auto` tries on a device, most specific first."""
    if device.startswith("cuda"):
        return ("jtop", "tegrastats", "nvml")  # a Jetson's GPU is also "cuda"; NVML is absent there
    return ("jtop", "tegrastats", "rapl")


def open_source(spec: str = "auto", device: str = "cpu", interval_s: float = DEFAULT_INTERVAL_S) -> EnergySource:
    """The energy source named by `spec` (one of ENERGY_CHOICES).

    `auto` returns the first usable candidate for the device, or a NoEnergySource whose reason
    lists why each candidate failed. A named source that cannot be used raises SourceUnavailable:
    asking for jtop on a Jetson and silently getting nothing would defeat the measurement.
    """
    if spec not in ENERGY_CHOICES:
        raise ValueError(f"energy = {spec!r}: allowed values are {list(ENERGY_CHOICES)}")
    if spec == "none":
        return NoEnergySource("energy measurement disabled (--energy none)")
    gpu_index = int(device.split(":")[1]) if device.startswith("cuda:") else 0
    factories: dict[str, Callable[[], EnergySource]] = {
        "jtop": lambda: JtopSource(interval_s),
        "tegrastats": lambda: TegrastatsSource(interval_s),
        "nvml": lambda: NvmlSource(gpu_index),
        "rapl": lambda: RaplSource(),
    }
    if spec != "auto":
        return factories[spec]()
    reasons = []
    for name in candidates_for(device):
        try:
            return factories[name]()
        except SourceUnavailable as err:
            reasons.append(str(err))
    return NoEnergySource("no energy source: " + "; ".join(reasons))


# ---------------------------------------------------------------------------------------------
# Sampler
# ---------------------------------------------------------------------------------------------


@dataclass
class Trace:
    """What a sampler recorded: perf_counter times, readings, and how sampling ended."""

    kind: str
    times: list[float] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    lost_at: float | None = None  # perf_counter time the source failed, if it did
    lost_reason: str | None = None
    busy_s: float = 0.0  # CPU time the sampler thread itself used
    wall_s: float = 0.0

    @property
    def overhead_frac(self) -> float:
        """Sampler CPU time as a fraction of the sampled wall time (the cost it adds to a run)."""
        return self.busy_s / self.wall_s if self.wall_s > 0 else math.nan

    def effective_interval_s(self) -> float:
        """Median time between *changed* readings: the rate the source really updates at."""
        if len(self.times) < 3:
            return math.nan
        times = np.asarray(self.times)
        values = np.asarray(self.values)
        changed = times[1:][np.diff(values) != 0]
        if changed.size < 2:
            return math.nan
        return float(np.median(np.diff(changed)))


class PowerSampler:
    """Poll a source every `interval_s` on a background thread (use as a context manager).

    A read that raises ends sampling and marks the trace as lost (time and reason); the run it
    belongs to is kept and marked, never dropped.
    """

    def __init__(self, source: EnergySource, interval_s: float = DEFAULT_INTERVAL_S):
        if not interval_s > 0:
            raise ValueError(f"interval_s = {interval_s}: must be positive")
        self.source = source
        self.interval_s = interval_s
        self.trace = Trace(kind=source.kind)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._start_wall = 0.0

    def _sample_once(self) -> bool:
        try:
            value = self.source.read()
        except Exception as err:  # noqa: BLE001 - any failure of the meter marks the trace
            self.trace.lost_at = time.perf_counter()
            self.trace.lost_reason = f"{type(err).__name__}: {err}"
            return False
        self.trace.times.append(time.perf_counter())
        self.trace.values.append(value)
        return True

    def _loop(self) -> None:
        cpu0 = time.thread_time()
        next_time = time.perf_counter()
        while True:
            if not self._sample_once():
                break
            next_time += self.interval_s
            # Sleep until the next tick without drift; wake at once when asked to stop.
            if self._stop.wait(max(0.0, next_time - time.perf_counter())):
                self._sample_once()  # one last sample so the trace covers the end of the run
                break
        self.trace.busy_s = time.thread_time() - cpu0

    def start(self) -> "PowerSampler":
        self._start_wall = time.perf_counter()
        self._thread = threading.Thread(target=self._loop, name="power-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> Trace:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.trace.wall_s = time.perf_counter() - self._start_wall
        return self.trace

    def __enter__(self) -> "PowerSampler":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def trace_energy(trace: Trace, run: tuple[float, float], images: int, idle: tuple[float, float] | None,
                 wrap_j: float | None = None) -> dict[str, Any]:
    """Energy figures of a run from its trace, with an explicit status: ok, lost, or too few samples."""
    nan = math.nan
    empty = {k: nan for k in ("energy_total_j", "energy_per_image_j", "mean_power_w", "idle_power_w",
                              "energy_above_idle_j", "energy_per_image_above_idle_j")}
    if trace.lost_at is not None and trace.lost_at < run[1]:
        return {**empty, "energy_status": "lost", "energy_status_detail":
                f"source failed {trace.lost_at - run[0]:+.2f} s from the start of the timed window: {trace.lost_reason}"}
    if len(trace.times) < 2:
        return {**empty, "energy_status": "too_few_samples", "energy_status_detail": f"{len(trace.times)} samples"}
    times = np.asarray(trace.times)
    try:
        report = energy_report(times, trace.values, trace.kind, run, images, idle, wrap_j)
    except ValueError as err:
        return {**empty, "energy_status": "not_covered", "energy_status_detail": str(err)}
    return {**report, "energy_status": "ok", "energy_status_detail": ""}
