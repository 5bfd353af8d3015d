"""One measurement run, and a session of runs each in a fresh process (book/method.md, 'Fine-tuning and edge measurements').

A *configuration* is (model, pruning, batch size); each is measured `repeats` times, every run in
a new Python process so no allocator state, thread pool or cache carries over between runs. A
run that fails is recorded with its status (``oom``, ``oom_predicted``, ``error``, ``crashed``)
and the session goes on with the next configuration. Rows go to `<out>/<session>.csv` (one row
per run, rewritten atomically after each run, so an interrupted session keeps what it measured),
the per-iteration latencies and power traces to `<out>/raw/<session>/<run_id>.json`, and the
device fingerprint and command to `<out>/<session>.meta.json`.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import pandas as pd

from heart_lib.measure import bench, energy, fingerprint, workload

# Fingerprint fields copied onto every row (the full fingerprint is in the session's meta.json).
ROW_FINGERPRINT = ("device_name", "device", "cpu_model", "cpu_logical", "cpu_hypervisor", "gpu_name", "cuda",
                   "gpu_driver", "jetson_model", "l4t", "jetpack", "nvpmodel", "jetson_clocks", "torch", "timm")
OK = "ok"
_DEFAULT_INTERVAL_S = energy.DEFAULT_INTERVAL_S  # the RunSpec field `energy` shadows the module in its body


@dataclass
class RunSpec:
    """Everything one run needs (JSON-serialisable: it crosses into the fresh process)."""

    model: str
    pruning: str = "none"
    batch_size: int = 1
    repeat: int = 0
    device: str = "cpu"
    precision: str = "fp32"
    threads: int = 2
    warmup_iters: int = 2
    min_iters: int = 3
    min_time_s: float = 2.0
    energy: str = "auto"
    interval_s: float = _DEFAULT_INTERVAL_S
    idle_s: float = 15.0
    weights: str = "none"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    session: str = ""
    raw_dir: str | None = None
    count_flops: bool = True
    memory_headroom: float = 0.8
    overrides: dict[str, Any] = field(default_factory=dict)  # fingerprint facts given on the command line

    attempt: int = 0  # > 0: a repetition of a run discarded for contention

    @property
    def run_id(self) -> str:
        slug = "none" if self.pruning == "none" else fingerprint._slug(self.pruning)[:60]
        again = f"__a{self.attempt}" if self.attempt else ""
        return f"{self.model}__{slug}__b{self.batch_size}__r{self.repeat}{again}"

    def timing(self) -> bench.TimingSettings:
        return bench.TimingSettings(self.warmup_iters, self.min_iters, self.min_time_s)


def _blank_row(spec: RunSpec) -> dict[str, Any]:
    return {
        "session": spec.session, "run_id": spec.run_id, "model": spec.model, "pruning": spec.pruning,
        "batch_size": spec.batch_size, "repeat": spec.repeat, "attempt": spec.attempt, "precision": spec.precision,
        "threads": spec.threads,
        "status": OK, "status_detail": "", "fresh_process": True,
        "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def record_failure(row: dict[str, Any], raw: dict[str, Any], err: BaseException) -> None:
    """A failed run becomes its row's status: a lost energy source, out of memory, or an error (with
    the traceback kept in the raw detail), so the session goes on."""
    if isinstance(err, energy.SourceUnavailable):
        row.update(status="error", status_detail=f"energy source: {err}")
    elif bench.is_out_of_memory(err):
        row.update(status="oom", status_detail=f"{type(err).__name__}: {str(err).splitlines()[0][:300]}")
    else:
        row.update(status="error", status_detail=f"{type(err).__name__}: {err}"[:500])
        raw["traceback"] = traceback.format_exc()


def measure_one(spec: RunSpec, source: energy.EnergySource | None = None,
                build: Callable[[RunSpec], workload.Workload] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run one measurement in this process: (tidy row, raw detail). Failures are rows, not exceptions.

    source: an energy source to use instead of opening `spec.energy` (tests, custom meters).
    build: a replacement for `workload.build` (tests).
    """
    import torch

    row = _blank_row(spec)
    raw: dict[str, Any] = {"spec": dataclasses.asdict(spec)}
    bench.set_threads(spec.threads)
    info = fingerprint.fingerprint(spec.device, spec.precision, spec.threads, spec.overrides)
    row.update({k: info.get(k) for k in ROW_FINGERPRINT})
    raw["fingerprint"] = info
    opened = None
    try:
        # Opened first so that every row, failed ones included, names its energy source.
        if source is None:
            source = opened = energy.open_source(spec.energy, spec.device, spec.interval_s)
        row.update(source.describe())
        work = (build or (lambda s: workload.build(s.model, s.pruning, weights=s.weights, seed=s.seed,
                                                   model_kwargs=s.model_kwargs)))(spec)
        row["params_m"] = work.params_m
        if work.notes:
            row["workload_notes"] = work.notes
        if spec.count_flops:
            row.update(workload.flops_per_image(work))
        model = work.model.to(device=spec.device, dtype=bench.PRECISIONS[spec.precision]).eval()
        if spec.batch_size > 1 and not spec.device.startswith("cuda"):
            # On a CPU a batch that does not fit is killed by the OOM killer rather than raising.
            fits, detail = bench.predict_fits(model, spec.batch_size, work.image_size, spec.device,
                                              spec.precision, spec.memory_headroom, work.autograd)
            raw["memory_prediction"] = detail
            if not fits:
                row.update(status="oom_predicted", status_detail=detail)
                return row, raw
        x = bench.make_input(spec.batch_size, work.image_size, spec.device, spec.precision, spec.seed)
        sampler = None if isinstance(source, energy.NoEnergySource) else energy.PowerSampler(source, spec.interval_s)
        idle = None
        if sampler is not None:
            sampler.start()
            if spec.idle_s > 0:
                i0 = time.perf_counter()
                time.sleep(spec.idle_s)
                idle = (i0, time.perf_counter())
        row["load_avg_1m_start"] = _load_average()
        try:
            timing = bench.time_forward(model, x, spec.timing(), spec.device, work.autograd)
        finally:
            trace = sampler.stop() if sampler is not None else None
        row.update(timing.summary(spec.batch_size))
        row["load_avg_1m_end"] = _load_average()
        row["idle_s"] = idle[1] - idle[0] if idle else 0.0
        raw["latencies_s"] = timing.latencies_s.tolist()
        if trace is not None:
            images = spec.batch_size * len(timing.latencies_s)
            row.update(energy.trace_energy(trace, timing.window, images, idle, source.wrap_j))
            row.update(n_samples=len(trace.times), sample_interval_s=trace.effective_interval_s(),
                       sampler_overhead_frac=trace.overhead_frac)
            origin = timing.window[0]
            raw["trace"] = {"kind": trace.kind, "t": [t - origin for t in trace.times], "value": trace.values,
                            "run": [0.0, timing.window[1] - origin],
                            "idle": [idle[0] - origin, idle[1] - origin] if idle else None,
                            "lost_at": trace.lost_at - origin if trace.lost_at else None,
                            "lost_reason": trace.lost_reason}
        else:
            row.update(energy_status="none", energy_status_detail="")
    except Exception as err:  # noqa: BLE001 - a failed configuration is reported and the session goes on
        record_failure(row, raw, err)
    finally:
        if opened is not None:
            opened.close()
        if spec.device.startswith("cuda"):
            torch.cuda.empty_cache()
    return row, raw


def _load_average() -> float:
    """1-minute system load: on a shared machine, the context a timing was taken in."""
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return math.nan


# ------------------------------------------------------------------ fresh-process runs


def _signal_name(code: int) -> str:
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"


def in_fresh_process(worker: str, spec: Any, blank_row: dict[str, Any],
                     timeout_s: float | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run `python -m <worker> SPEC.json RESULT.json` on the dataclass `spec`: (row, raw) it wrote, or
    `blank_row` marked crashed (the signal named; SIGKILL most often the out-of-memory killer)."""
    with tempfile.TemporaryDirectory(prefix="heart-measure-") as tmp:
        spec_path, result_path = Path(tmp, "spec.json"), Path(tmp, "result.json")
        spec_path.write_text(json.dumps(dataclasses.asdict(spec)))
        cmd = [sys.executable, "-m", worker, str(spec_path), str(result_path)]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
            code, err_tail = done.returncode, done.stderr.strip()[-800:]
        except subprocess.TimeoutExpired:
            code, err_tail = None, f"no result within {timeout_s} s"
        if result_path.is_file():
            result = json.loads(result_path.read_text())
            return result["row"], result["raw"]
    row = dict(blank_row)
    if code is not None and code < 0:
        why = f"worker killed by {_signal_name(code)}"
        if code == -signal.SIGKILL:
            why += " (most often the kernel's out-of-memory killer)"
            row["status"] = "crashed_oom?"
        else:
            row["status"] = "crashed"
    else:
        why = f"worker exited with code {code}"
        row["status"] = "crashed"
    row["status_detail"] = f"{why}: {err_tail}"[:800]
    return row, {"spec": dataclasses.asdict(spec), "stderr": err_tail}


def run_in_fresh_process(spec: RunSpec, timeout_s: float | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """`measure_one` in a new Python process (`python -m heart_lib.measure.worker`)."""
    return in_fresh_process("heart_lib.measure.worker", spec, _blank_row(spec), timeout_s)


# ------------------------------------------------------------------ sessions


def new_session_id(out: Path) -> str:
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    session, n = stamp, 1
    while (out / f"{session}.csv").exists():
        n += 1
        session = f"{stamp}-{n}"
    return session


# Leading columns in reading order; any others follow alphabetically (so new fields append cleanly).
COLUMN_ORDER = ("session", "run_id", "device_name", "model", "pruning", "batch_size", "repeat", "status",
                "status_detail", "latency_median_ms", "latency_p25_ms", "latency_p75_ms", "latency_min_ms",
                "latency_max_ms", "latency_per_image_ms", "throughput_img_s", "iters", "peak_memory_mb",
                "peak_memory_kind", "flops_per_image", "flops_source", "flops_counted", "params_m",
                "energy_source", "energy_status", "energy_per_image_j", "energy_per_image_above_idle_j",
                "energy_total_j", "energy_above_idle_j", "mean_power_w", "idle_power_w", "idle_s",
                "energy_reason", "energy_status_detail", "precision", "threads", "cpu_share",
                "load_avg_1m_start", "load_avg_1m_end", "attempt", "waited_for_quiet_s")


def tidy(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Rows as a table with a stable schema: every COLUMN_ORDER column present (NaN when not measured)."""
    frame = pd.DataFrame(rows)
    for col in COLUMN_ORDER:
        if col not in frame.columns:
            frame[col] = math.nan
    return frame[list(COLUMN_ORDER) + sorted(c for c in frame.columns if c not in COLUMN_ORDER)]


def _write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    from heart_lib import results

    results.write_table(path, tidy(rows))


@dataclass(frozen=True)
class Discipline:
    """Guards for a shared machine (all off by default).

    max_load: before each run, wait (up to max_wait_s) until the 1-minute load average is at most
    this. min_cpu_share: a run whose CPU share (process CPU time / wall time / threads) falls below
    this had competition for its cores; it is kept with status ``contended`` and measured again,
    up to max_retries times. Meaningful on CPUs only: on a GPU the host thread mostly waits.
    """

    max_load: float | None = None
    max_wait_s: float = 300.0
    min_cpu_share: float = 0.0
    max_retries: int = 2

    def check(self) -> None:
        if self.max_load is not None and self.max_load <= 0:
            raise ValueError(f"max_load = {self.max_load}: must be positive")
        if not 0 <= self.min_cpu_share <= 1:
            raise ValueError(f"min_cpu_share = {self.min_cpu_share}: must be in [0, 1]")
        if self.max_retries < 0 or self.max_wait_s < 0:
            raise ValueError(f"max_retries ({self.max_retries}) and max_wait_s ({self.max_wait_s}) must be >= 0")


def wait_for_quiet(max_load: float | None, max_wait_s: float, poll_s: float = 5.0) -> float:
    """Sleep until the 1-minute load average is at most `max_load`; returns the seconds waited."""
    if max_load is None:
        return 0.0
    start = time.perf_counter()
    while _load_average() > max_load and time.perf_counter() - start < max_wait_s:
        time.sleep(poll_s)
    return time.perf_counter() - start


def run_session(specs: Iterable[RunSpec], out: Path, session: str, fresh_process: bool = True,
                log: Callable[[str], None] = print, timeout_s: float | None = None,
                facts: dict[str, Any] | None = None, discipline: Discipline = Discipline()) -> pd.DataFrame:
    """Measure every spec (grouped by configuration, repeats consecutive); returns the tidy rows.

    facts: the session's device fingerprint, stamped on rows of runs that died before stamping their own.
    A configuration whose first run fails (e.g. out of memory) is not retried: its other repeats
    are recorded as ``skipped`` and the session goes on.
    """
    from heart_lib import results

    discipline.check()
    out = Path(out)
    raw_dir = out / "raw" / session
    rows: list[dict[str, Any]] = []
    failed_configs: dict[tuple, str] = {}
    config_facts: dict[tuple, dict[str, Any]] = {}
    first_flops: dict[tuple, dict[str, Any]] = {}
    csv_path = out / f"{session}.csv"
    for spec in specs:
        key = (spec.model, spec.pruning, spec.batch_size)
        if key in failed_configs:
            row = {**config_facts.get(key, {}), **_blank_row(spec)}
            row.update(status="skipped", status_detail=f"run 0 of this configuration failed: {failed_configs[key]}")
            rows.append(row)
            _write_rows(csv_path, rows)
            continue
        for attempt in range(discipline.max_retries + 1):
            spec = dataclasses.replace(spec, session=session, count_flops=key not in first_flops, attempt=attempt)
            waited = wait_for_quiet(discipline.max_load, discipline.max_wait_s)
            start = time.perf_counter()
            row, raw = run_in_fresh_process(spec, timeout_s) if fresh_process else measure_one(spec)
            row["fresh_process"] = fresh_process
            row["waited_for_quiet_s"] = waited
            for name in ROW_FINGERPRINT:
                if row.get(name) is None and facts and facts.get(name) is not None:
                    row[name] = facts[name]
            flops_fields = {k: v for k, v in row.items() if k.startswith("flops_") or k == "params_m"}
            if key not in first_flops and "flops_per_image" in flops_fields:
                first_flops[key] = flops_fields
            elif key in first_flops:
                row.update({k: v for k, v in first_flops[key].items() if k not in row or _is_nan(row[k])})
            config_facts.setdefault(key, {k: row.get(k) for k in ROW_FINGERPRINT + ("energy_source", "energy_reason")})
            share = row.get("cpu_share", math.nan)
            contended = row["status"] == OK and discipline.min_cpu_share > 0 and share < discipline.min_cpu_share
            if contended:
                row.update(status="contended", status_detail=(
                    f"cpu_share {share:.2f} < {discipline.min_cpu_share}: other processes competed for the cores "
                    f"(1-min load {row.get('load_avg_1m_start', math.nan):.1f} at the start)"))
            rows.append(row)
            results.write_json(raw_dir / f"{spec.run_id}.json", {"row": row, **raw})
            _write_rows(csv_path, rows)
            log(_progress_line(row, time.perf_counter() - start))
            if not contended:
                break
        if row["status"] not in (OK, "contended") and spec.repeat == 0:
            failed_configs[key] = f"{row['status']}: {row['status_detail'][:200]}"
    return tidy(rows)


def _is_nan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)


def _progress_line(row: dict[str, Any], wall: float) -> str:
    head = f"{row['model']} [{row['pruning']}] b={row['batch_size']} run {row['repeat']}"
    if row["status"] not in (OK, "contended"):
        return f"{head}: {row['status']} - {row['status_detail'][:160]} ({wall:.0f} s)"
    nan = math.nan
    text = (f"{head}: {row.get('latency_median_ms', nan):.1f} ms/batch, {row.get('throughput_img_s', nan):.2f} img/s, "
            f"peak {row.get('peak_memory_mb', nan):.0f} MiB")
    if row.get("energy_status") == OK:
        text += f", {row['energy_per_image_j']:.3f} J/img ({row['energy_per_image_above_idle_j']:.3f} above idle)"
    else:
        text += f", energy: {row.get('energy_status')}"
    if row["status"] == "contended":
        text += f" [contended, attempt {row.get('attempt', 0)}: {row['status_detail'][:40]}]"
    return text + f" ({wall:.0f} s)"


def expand(models: list[str], prunings: list[str], batches: list[int], repeats: int, **common: Any) -> list[RunSpec]:
    """The run list: configurations in the given order, each repeated `repeats` times consecutively."""
    if repeats < 1:
        raise ValueError(f"repeats = {repeats}: must be a positive integer")
    return [RunSpec(model=m, pruning=p, batch_size=b, repeat=r, **common)
            for m in models for p in prunings for b in batches for r in range(repeats)]
