"""LLM chapter: Pythia on the measured devices, the group's Jetson LLM study widened (arXiv 2412.15352).

Like the edge chapter it times nothing itself (except, under the smoke profile, a few seconds of a
two-layer random GPT-NeoX to exercise the plumbing): it reads every session that
`python -m heart_lib measure-llm` wrote under `results/devices/<device>/llm/`, reduces runs to
medians per configuration, picks the best configuration under the profile's limits and draws the
Pareto fronts of tokens/s against memory and energy.
"""

from __future__ import annotations

import shutil
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from heart_lib import results
from heart_lib.measure import llm_tables, select, tables


@dataclass(frozen=True)
class Params:
    devices_root: str = "results/devices"  # relative to the project root, or absolute
    devices: list[str] | None = None  # device folders to include; None = all
    # Limits for the selection (None = no limit) and what "best" means.
    max_power_w: float | None = None
    max_latency_s: float | None = None
    max_energy_j: float | None = None
    max_memory_mb: float | None = None
    objective: str = "tokens_per_s"
    # A short live sweep on the machine running the notebook (None = only committed results).
    live_model: str | None = None
    live_model_kwargs: dict[str, Any] = field(default_factory=dict)
    live_dtypes: list[str] = field(default_factory=lambda: ["fp32"])
    live_batches: list[int] = field(default_factory=lambda: [1])
    live_new_tokens: int = 8
    live_prompt_tokens: int = 8
    live_repeats: int = 1
    seed: int = 0

    def limits(self) -> select.Limits:
        return select.Limits(self.max_power_w, self.max_latency_s, self.max_energy_j, self.max_memory_mb)

    def check(self) -> None:
        self.limits().check()
        if self.live_model is not None:
            from heart_lib.measure import llm

            llm.expand([self.live_model], self.live_dtypes, self.live_batches, [self.live_prompt_tokens],
                       [self.live_new_tokens], [1], self.live_repeats, model_kwargs=self.live_model_kwargs)


def input_paths(params: Params) -> list[Path]:
    """What the chapter reads besides its parameters (the runner re-executes it when these change)."""
    return [tables.devices_root(params.devices_root)]


def measure_live(params: Params, out: Path) -> Path | None:
    """The smoke profile's few-second sweep (in-process, one thread: plumbing, not a protocol run)."""
    if params.live_model is None:
        return None
    from heart_lib.measure import fingerprint, llm

    info = fingerprint.fingerprint("cpu", "fp32", 1)
    folder = out / "live" / info["device_name"] / "llm"
    if folder.exists():
        shutil.rmtree(folder)  # the page shows this execution's live runs, not those of earlier ones
    specs = llm.expand([params.live_model], params.live_dtypes, params.live_batches, [params.live_prompt_tokens],
                       [params.live_new_tokens], [1], params.live_repeats, weights="random", idle_s=0.0,
                       overhead_pairs=2, model_kwargs=params.live_model_kwargs, seed=params.seed)
    from heart_lib.measure.run import new_session_id

    llm.run_llm_session(specs, folder, new_session_id(folder), fresh_process=False, log=lambda line: None, facts=info)
    return folder.parent.parent


def load(params: Params, out: Path) -> pd.DataFrame | None:
    """Every run: committed sessions plus this notebook's live ones; None when there are none."""
    frames = []
    try:
        committed = llm_tables.load_llm_runs(tables.devices_root(params.devices_root))
        frames.append(committed.assign(origin="committed"))
    except FileNotFoundError:
        pass
    live = measure_live(params, out)
    if live is not None:
        fresh = llm_tables.load_llm_runs(live)
        fresh["device_name"] = fresh["device_name"].astype(str) + " (live)"
        frames.append(fresh.assign(origin="live (this notebook)"))
    if not frames:
        return None
    runs = pd.concat(frames, ignore_index=True, sort=False)
    if params.devices is not None:
        runs = runs[runs["device_name"].isin(params.devices)]
    return runs.reset_index(drop=True)


def display_summary(summary: pd.DataFrame) -> pd.DataFrame:
    """The medians per configuration, renamed and rounded for the page."""
    return pd.DataFrame({
        "device": summary["device_name"], "model": summary["model"].str.replace("-deduped", ""),
        "weights": summary["weights"], "dtype": summary["dtype"], "batch": summary["batch_size"],
        "prompt": summary["prompt_tokens"], "new": summary["new_tokens"], "runs ok": summary["runs_ok"],
        "load s": summary["load_s"].round(2), "TTFT ms": summary["ttft_ms"].round(1),
        "decode ms/token": summary["decode_ms_per_token"].round(2), "tokens/s": summary["tokens_per_s"].round(1),
        "peak MiB": summary["peak_memory_mb"].round(0), "J/token": summary["energy_per_token_j"].round(4),
        "J/token above idle": summary["energy_per_token_above_idle_j"].round(4),
        "failures": summary["statuses"]}).reset_index(drop=True)


def page(table: pd.DataFrame):
    """A table as the page shows it, through the book's one display module (no index, formatted
    numbers, its own scroll box; what was not measured stays blank)."""
    from heart_lib import display

    return display.table(table)


def overhead_table(summary: pd.DataFrame) -> pd.DataFrame:
    """Harness overhead (instrumented vs bare generate) where a session measured it."""
    has = summary[summary["overhead_frac"].notna()]
    return pd.DataFrame({"device": has["device_name"], "model": has["model"], "dtype": has["dtype"],
                         "batch": has["batch_size"], "new": has["new_tokens"],
                         "overhead": (100 * has["overhead_frac"]).map(lambda v: f"{v:+.2f} %")}).reset_index(drop=True)


def selection(summary: pd.DataFrame, params: Params) -> tuple[pd.DataFrame, pd.Series | None]:
    """Each configuration with the limits it breaks, and the best one under all limits."""
    limits = params.limits()
    table = display_summary(summary)[["device", "model", "dtype", "batch", "tokens/s", "peak MiB", "J/token"]]
    table["breaks"] = select.violations(summary, limits).to_numpy()
    return table, select.select_best(summary, limits, params.objective)


def run(params: Params, out: Path) -> dict[str, Any]:
    """Load, summarise, select; write tables and the Pareto figure under `out`."""
    runs = load(params, out)
    if runs is None:
        return {"runs": None}
    summary = llm_tables.summarize_llm(runs)
    chosen_table, best = selection(summary, params)
    results.write_table(out / "runs.csv", runs, meta={"params": vars(params), "devices_root": str(tables.devices_root(params.devices_root))})
    results.write_table(out / "summary.csv", summary)
    results.write_table(out / "selection.csv", chosen_table)
    fig = pareto_figure(summary)
    results.save_figure(fig, out / "pareto.png")
    import matplotlib.pyplot as plt

    plt.close(fig)  # the page shows the saved file
    return {"runs": runs, "summary": summary, "selection": chosen_table, "best": best,
            "overhead": overhead_table(summary)}


def pareto_figure(summary: pd.DataFrame):
    """Tokens/s against peak memory and against energy per token; the Pareto front of each device joined.

    Colour: model; marker: dtype; open markers: batch 1, filled: larger batches. An energy panel
    without any measured energy says why instead of staying blank.
    """
    import matplotlib.pyplot as plt

    from heart_lib import plots

    plots.use_style()
    ok = summary[summary["runs_ok"] > 0]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
    models = list(dict.fromkeys(ok["model"]))
    palette = dict(zip(models, plt.get_cmap("tab10").colors))
    markers = dict(zip(["fp32", "bf16", "fp16", "int8", "4bit"], "osD^v"))
    for ax, (col, label) in zip(axes, [("peak_memory_mb", "peak memory (MiB)"),
                                       ("energy_per_token_j", "energy per token (J)")]):
        data = ok[ok[col].notna() & ok["tokens_per_s"].notna()]
        if data.empty:
            reasons = summary.get("energy_reason", pd.Series(dtype=str)).dropna().astype(str).unique()
            ax.text(0.5, 0.5, "No energy source on the measured devices.\n\n" +
                    "\n".join(textwrap.fill(r, 52) for r in reasons[:1]), ha="center", va="center", fontsize=7.5,
                    transform=ax.transAxes)
            ax.set(title=f"tokens/s vs {label}", xticks=[], yticks=[])
            continue
        for _, r in data.iterrows():
            ax.scatter(r[col], r["tokens_per_s"], color=palette[r["model"]], marker=markers.get(r["dtype"], "o"),
                       s=48, facecolors=palette[r["model"]] if r["batch_size"] > 1 else "none", linewidths=1.4)
        for _, group in data.groupby("device_name"):
            front = group[select.pareto_front(group[col].to_numpy(), group["tokens_per_s"].to_numpy())]
            front = front.sort_values(col)
            ax.step(front[col], front["tokens_per_s"], where="post", color="0.4", lw=1, ls="--")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set(xlabel=label + " (log)", ylabel="tokens/s (log)", title=f"tokens/s vs {label}")
    handles = [plt.Line2D([], [], color=palette[m], marker="o", ls="", label=m.replace("-deduped", "")) for m in models]
    handles += [plt.Line2D([], [], color="0.3", marker=markers[d], ls="", label=d) for d in markers
                if d in set(ok["dtype"])]
    handles += [plt.Line2D([], [], color="0.3", marker="o", ls="", markerfacecolor="none", label="batch 1"),
                plt.Line2D([], [], color="0.4", ls="--", label="Pareto front")]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), bbox_to_anchor=(0.5, -0.1))
    fig.suptitle("Throughput against memory and energy (medians over runs)")
    fig.tight_layout()
    return fig


def best_text(best: pd.Series | None, params: Params) -> str:
    """One sentence naming the selected configuration (numbers from the summary, not typed)."""
    limits = params.limits().active()
    where = ", ".join(f"{k} = {v:g}" for k, v in limits.items()) or "no limits"
    if best is None:
        return f"No measured configuration meets every limit ({where})."
    return (f"Under {where}, the highest {params.objective} is {best['model']} {best['dtype']} at batch "
            f"{int(best['batch_size'])} on {best['device_name']} ({best[params.objective]:.4g}; weights {best['weights']}).")
