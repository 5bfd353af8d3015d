"""Edge chapter: latency, throughput, memory and energy of (pruned) ViTs on every measured device.

The chapter does not time anything itself (except, under the smoke profile, a few seconds on a tiny
random ViT to exercise the plumbing): it reads every session that `python -m heart_lib measure`
wrote under `results/devices/<device>/`, reduces runs to medians per configuration, and compares
pruned configurations with the unpruned model on the same device and batch size, with bootstrap
intervals over runs (claims C4, C6: this is the study's one timing harness).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from heart_lib import display as D
from heart_lib import results
from heart_lib.measure import tables


@dataclass(frozen=True)
class Params:
    devices_root: str = "results/devices"  # relative to the project root, or absolute
    devices: list[str] | None = None  # device folders to include; None = all
    models: list[str] | None = None  # models to include; None = all
    # A short live measurement on the machine running the notebook (None = only committed results).
    live_model: str | None = None
    live_model_kwargs: dict[str, Any] = field(default_factory=dict)
    live_prunings: list[str] = field(default_factory=lambda: ["none"])
    live_batches: list[int] = field(default_factory=lambda: [1])
    live_repeats: int = 2
    live_min_time_s: float = 0.2
    # CPU runs whose CPU share (process CPU time / wall / threads) fell below this had competition
    # for their cores: they are marked 'contended' and left out of the medians (0 = keep all).
    min_cpu_share: float = 0.0
    seed: int = 0

    def check(self) -> None:
        if self.live_repeats < 1:
            raise ValueError(f"parameter 'live_repeats' = {self.live_repeats}: must be a positive integer")
        if not 0 <= self.min_cpu_share <= 1:
            raise ValueError(f"parameter 'min_cpu_share' = {self.min_cpu_share}: must be in [0, 1]")
        if self.live_min_time_s < 0:
            raise ValueError(f"parameter 'live_min_time_s' = {self.live_min_time_s}: must be >= 0")
        if any(b < 1 for b in self.live_batches) or not self.live_batches:
            raise ValueError(f"parameter 'live_batches' = {self.live_batches}: positive integers, at least one")
        if self.live_model is not None:
            from heart_lib import models

            models.check_model_name(self.live_model)
        if not self.live_prunings:
            raise ValueError("parameter 'live_prunings': give at least one configuration ('none' for the plain model)")
        from heart_lib.measure import workload

        for text in self.live_prunings:
            workload.canonical_pruning(text)  # raises ValueError naming the bad config


def input_paths(params: Params) -> list[Path]:
    """What the chapter reads besides its parameters (the runner re-executes it when these change)."""
    return [tables.devices_root(params.devices_root)]


def measure_live(params: Params, out: Path) -> Path | None:
    """The smoke profile's few-second measurement (in-process: plumbing, not a protocol run)."""
    if params.live_model is None:
        return None
    from heart_lib.measure import bench, fingerprint, run

    threads = 1  # the notebook shares the machine; one thread keeps the check light
    bench.set_threads(threads)
    info = fingerprint.fingerprint("cpu", "fp32", threads)
    folder = out / "live" / info["device_name"]
    session = run.new_session_id(folder)
    specs = run.expand([params.live_model], params.live_prunings, params.live_batches, params.live_repeats,
                       threads=threads, warmup_iters=1, min_iters=2, min_time_s=params.live_min_time_s,
                       energy="auto", idle_s=0.0, model_kwargs=params.live_model_kwargs, seed=params.seed)
    run.run_session(specs, folder, session, fresh_process=False, log=lambda line: None, facts=info)
    return folder


def load(params: Params, out: Path) -> pd.DataFrame:
    """Every run: the committed device measurements plus this notebook's live ones (if any)."""
    frames = []
    root = tables.devices_root(params.devices_root)
    if root.is_dir():
        try:
            committed = tables.load_runs(root)
            committed["origin"] = "committed"
            frames.append(committed)
        except FileNotFoundError:
            pass
    live = measure_live(params, out)
    if live is not None:
        fresh = tables.load_runs(live)
        fresh["origin"] = "live (this notebook)"
        fresh["device_name"] = fresh["device_name"].astype(str) + " (live)"
        frames.append(fresh)
    if not frames:
        raise FileNotFoundError(f"no measurements under {root} and no live measurement configured; "
                                "run `python -m heart_lib measure` (see the edge how-to)")
    runs = pd.concat(frames, ignore_index=True, sort=False)
    runs = mark_contended(runs, params.min_cpu_share)
    if params.devices is not None:
        runs = runs[runs["device_name"].isin(params.devices)]
    if params.models is not None:
        runs = runs[runs["model"].isin(params.models)]
    return runs.reset_index(drop=True)


def mark_contended(runs: pd.DataFrame, min_cpu_share: float) -> pd.DataFrame:
    """Mark successful CPU runs whose CPU share is below `min_cpu_share` as 'contended' (kept, not medianed).

    The same rule as `measure --min-cpu-share`, applied afterwards to sessions measured without it.
    GPU runs are left alone: their host thread mostly waits, so the share says nothing there.
    """
    runs = runs.copy()
    if min_cpu_share <= 0 or "cpu_share" not in runs:
        return runs
    share = pd.to_numeric(runs["cpu_share"], errors="coerce")
    on_cpu = runs.get("device", pd.Series("cpu", index=runs.index)).astype(str).eq("cpu")
    mask = runs["status"].eq("ok") & on_cpu & share.lt(min_cpu_share)
    # Read back from CSV, an all-empty detail column is float (NaN); make it hold text.
    runs["status_detail"] = runs.get("status_detail", pd.Series("", index=runs.index)).astype(object)
    runs.loc[mask, "status"] = "contended"
    runs.loc[mask, "status_detail"] = [f"cpu_share {v:.2f} < {min_cpu_share} (filtered by the edge chapter)"
                                       for v in share[mask]]
    return runs


def device_table(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per device: what the numbers depend on (fingerprint), the energy source, run conditions."""
    cols = ["cpu_model", "gpu_name", "jetson_model", "l4t", "jetpack", "nvpmodel", "jetson_clocks", "precision",
            "threads", "torch", "timm", "energy_source", "energy_reason"]
    rows = []
    for device, group in runs.groupby("device_name", sort=True):
        row: dict[str, Any] = {"device": device}
        for col in cols:
            values = group[col].dropna().astype(str).unique() if col in group else []
            row[col] = "; ".join(values) if len(values) else ""
        ok = group[group["status"] == "ok"]
        row["runs"] = len(group)
        row["runs_ok"] = len(ok)
        row["runs_contended"] = int(group["status"].eq("contended").sum())
        row["fresh_process_share"] = float(ok["fresh_process"].astype(bool).mean()) if len(ok) else math.nan
        for col in ("cpu_share", "load_avg_1m_start"):
            row[f"median_{col}"] = float(pd.to_numeric(ok[col], errors="coerce").median()) if col in ok and len(ok) else math.nan
        rows.append(row)
    return pd.DataFrame(rows)


def comparison_table(summary: pd.DataFrame) -> pd.DataFrame:
    """Pruned vs unpruned on the same device, model and batch: changes in %, for display."""
    rel = tables.add_relative(summary)
    pruned = rel[rel["pruning"] != "none"].copy()
    if pruned.empty:
        return pd.DataFrame(columns=["device", "model", "batch", "pruning", "FLOPs", "latency", "throughput", "energy/img"])
    fmt = lambda v: "" if pd.isna(v) else f"{100 * v:+.1f} %"  # noqa: E731
    return pd.DataFrame({
        "device": pruned["device_name"], "model": pruned["model"], "batch": pruned["batch_size"],
        "pruning": pruned["pruning"], "FLOPs": pruned["flops_change"].map(fmt),
        "latency": pruned["latency_change"].map(fmt), "throughput": pruned["throughput_change"].map(fmt),
        "energy/img": pruned["energy_change"].map(fmt)}).reset_index(drop=True)


def _pruning_label(text: str) -> str:
    """The configuration as measured, named by the book's term when it is one ("40 % token pruning")."""
    from heart_lib.experiments.definitions import TOKENS_40, TOKENS_40_NAME
    from heart_lib.pruning import PruningConfig

    if text == "none":
        return "unpruned"
    try:
        config = PruningConfig.parse(text)
    except ValueError:
        return text
    same = config.layers == TOKENS_40.layers and config.keep == TOKENS_40.keep and not config.heads
    return f"{TOKENS_40_NAME} ({text})" if same else text


def display_summary(summary: pd.DataFrame):
    """The per-configuration medians for the page: what ran, and its time, memory and energy."""
    number = lambda column, digits=3: (lambda t: t[column].map(lambda v: D.number(v, digits)))  # noqa: E731
    return D.table(summary, {
        "device": "device_name", "model": "model", "batch": "batch_size",
        "tokens chosen by": lambda t: t["pruning"].map(selector_label), "runs ok": "runs_ok", "GFLOPs / image": lambda t: (t["flops_per_image"] / 1e9).map(
            lambda v: D.number(v, 3)),
        "latency (ms, median)": number("latency_median_ms"), "latency IQR (ms)": number("latency_iqr_ms", 2),
        "ms / image": number("latency_per_image_ms"), "images / s": number("throughput_img_s"),
        "peak memory (MiB)": number("peak_memory_mb", 4), "energy / image (J)": number("energy_per_image_j"),
        "failures": lambda t: t["statuses"].fillna("").map(lambda v: "" if v in ("", "ok") else v),
        # last: the long pruning specification must not push the measurements out of view
        "pruning": lambda t: t["pruning"].map(_pruning_label)})


def devices_display(devices: pd.DataFrame):
    """One row per device: the fingerprint columns that have a value, and the run conditions."""
    headers = {"device": "device", "cpu_model": "processor", "gpu_name": "GPU", "jetson_model": "Jetson",
               "l4t": "L4T", "jetpack": "JetPack", "nvpmodel": "power mode", "jetson_clocks": "clocks",
               "precision": "precision", "threads": "threads", "torch": "torch", "timm": "timm",
               "energy_source": "energy source", "energy_reason": "why no energy", "runs": "runs",
               "runs_ok": "runs ok", "runs_contended": "runs contended",
               "median_cpu_share": "CPU share (median)", "median_load_avg_1m_start": "load at start (median)"}
    present = [c for c in headers if c in devices and devices[c].astype(str).str.strip().ne("").any()]
    return D.table(devices, {headers[c]: (lambda t, c=c: t[c].map(lambda v: D.number(v, 2) if isinstance(v, float)
                                                                  else v)) for c in present}, max_chars=48)


def comparison_display(comparison: pd.DataFrame):
    """Pruned against unpruned, changes in %."""
    return D.table(comparison, {"device": "device", "model": "model", "batch": "batch",
                                "FLOPs change": "FLOPs", "latency change": "latency",
                                "throughput change": "throughput", "energy / image change": "energy/img",
                                "pruning": "pruning"})


def selector_label(pruning: str) -> str:
    """What chose the tokens of a configuration, as one label ('+ heads' when heads are sliced too)."""
    parts = dict(p.split("=", 1) for p in str(pruning).split(";") if "=" in p)
    if "tokens" not in parts:
        return "heads only" if "heads" in parts else "unpruned"
    return D.label(parts.get("selector", "cls_attention")) + (" + heads" if "heads" in parts else "")


def speedups_display(speedups: pd.DataFrame):
    """Pruned against unpruned with bootstrap intervals over runs: FLOPs, latency and throughput."""
    def ci(column: str, sign: str = ""):
        return lambda t: [f"{sign}{D.percent(v)} [{D.percent(lo)}, {D.percent(hi)}]" for v, lo, hi in
                          zip(t[column], t[f"{column}_lo"], t[f"{column}_hi"])]

    return D.table(speedups, {"device": "device_name", "model": "model", "batch": "batch_size",
                              "tokens chosen by": lambda t: t["pruning"].map(selector_label),
                              "FLOPs saved (%)": lambda t: t["flops_reduction"].map(D.percent),
                              "latency saved (%), 95 % CI": ci("latency_reduction"),
                              "throughput gained (%), 95 % CI": ci("throughput_gain", "+"),
                              "runs (pruned / unpruned)": lambda t: [f"{a} / {b}" for a, b in
                                                                     zip(t["runs_pruned"], t["runs_dense"])],
                              "pruning": lambda t: t["pruning"].map(_pruning_label)})


def run(params: Params, out: Path) -> dict[str, pd.DataFrame]:
    """Load, summarise, write tables and figures under `out`; returns the tables."""
    runs = load(params, out)
    summary = tables.summarize(runs)
    devices = device_table(runs)
    comparison = comparison_table(summary)
    speedups = tables.speedups(runs, seed=params.seed)
    results.write_table(out / "runs.csv", runs, meta={"params": vars(params), "devices_root": str(tables.devices_root(params.devices_root))})
    results.write_table(out / "summary.csv", summary)
    results.write_table(out / "devices.csv", devices)
    results.write_table(out / "comparison.csv", comparison)
    results.write_table(out / "speedups.csv", speedups)
    fig = figure(summary)
    results.save_figure(fig, out / "latency_throughput_energy_vs_flops.png")
    import matplotlib.pyplot as plt

    plt.close(fig)  # the page shows the saved file; an open figure would be drawn a second time
    return {"runs": runs, "summary": summary, "devices": devices, "comparison": comparison, "speedups": speedups}


def figure(summary: pd.DataFrame):
    """Latency per image, throughput and energy per image against GFLOPs per image.

    One colour per model, one marker per batch size, one line style per device; lines join the
    configurations of one model on one device and batch, ordered by FLOPs. Error bars: the IQR of
    the latency across runs. The energy panel says so when no device had an energy source.
    """
    import matplotlib.pyplot as plt

    from heart_lib import plots

    plots.use_style()
    ok = summary[summary["runs_ok"] > 0].copy()
    ok["gflops"] = ok["flops_per_image"] / 1e9
    has_energy = "energy_per_image_j" in ok and ok["energy_per_image_j"].notna().any()
    panels = [("latency_per_image_ms", "latency per image (ms)"), ("throughput_img_s", "throughput (images/s)")]
    panels += [("energy_per_image_j", "energy per image (J)")] if has_energy else []
    fig, axes = plt.subplots(1, len(panels), figsize=(plots.COLUMN_WIDTH, 3.6), squeeze=False)
    models = sorted(ok["model"].astype(str).unique())
    colour = {m: s["color"] for m, s in plots.styles(models).items()}
    batches = sorted(ok["batch_size"].unique())
    markers = dict(zip(batches, plots.MARKERS))
    devices = sorted(ok["device_name"].astype(str).unique())
    line = dict(zip(devices, plots.LINESTYLES * 4))
    for ax, (col, label) in zip(axes[0], panels):
        data = ok[ok[col].notna()]
        for (device, model, batch), group in data.groupby(["device_name", "model", "batch_size"]):
            group = group.sort_values("gflops")
            yerr = (group["latency_iqr_ms"] / group["batch_size"] / 2).fillna(0).to_numpy() \
                if col == "latency_per_image_ms" else None
            ax.errorbar(group["gflops"], group[col], yerr=yerr, color=colour[str(model)], marker=markers[batch],
                        ls=line[str(device)], lw=1.2, ms=5, capsize=2)
        # Log axes: tiny smoke models and ViT-B differ by orders of magnitude, and equal ratios
        # (the quantity compared) then read as equal distances.
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set(xlabel="GFLOPs per image (log)", ylabel=label + " (log)")
    handles = [plt.Line2D([], [], color=colour[m], lw=2, label=m) for m in models]
    handles += [plt.Line2D([], [], color="grey", marker=markers[b], ls="", label=f"batch {b}") for b in batches]
    if len(devices) > 1:
        handles += [plt.Line2D([], [], color="grey", ls=line[d], label=d) for d in devices]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 4), frameon=False)
    fig.tight_layout(rect=(0, 0.08 * (1 + (len(handles) - 1) // 4), 1, 1))
    return fig
