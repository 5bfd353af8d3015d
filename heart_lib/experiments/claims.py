"""Claims summary: each claim of the paper beside our measurement, with a verdict and its criterion.

Every row is computed from result files the other chapters wrote; a claim whose results are
missing says which file is missing instead of guessing. Verdicts:
- reproduced: our measurement meets the claim under the stated criterion;
- not reproduced: it does not;
- inconclusive: the measurement cannot separate the two (confidence intervals overlap);
- not testable here: the claim needs hardware or data this profile does not have.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from heart_lib import catalogue
from heart_lib.experiments import camphive
from heart_lib.paths import PROJECT_ROOT, results_root

VERDICTS = ("reproduced", "not reproduced", "inconclusive", "not testable here")


def c1_opponents() -> tuple[str, ...]:
    """The families C1 sets HEART against: those whose pre-registered primary uses no curvature
    (first-order and heuristic scores); the full second order is shown beside, not counted."""
    return tuple(f for f in catalogue.FAMILIES
                 if f != "heart" and not catalogue.score(catalogue.primary(f)).second_order)


@dataclass(frozen=True)
class Params:
    speed_benchmark: str = "results/benchmarks/pruning_speed_cpu.json"  # relative to the project root
    devices_root: str = "results/devices"
    max_top1_drop: float = 0.01  # an accuracy drop (absolute) up to this counts as "accuracy kept"
    flops_match: float = 0.05  # configurations within this of a FLOPs target count as "at" the target

    def check(self) -> None:
        if not 0 <= self.max_top1_drop < 1:
            raise ValueError(f"parameter 'max_top1_drop' = {self.max_top1_drop}: must be in [0, 1)")
        if not 0 < self.flops_match < 0.5:
            raise ValueError(f"parameter 'flops_match' = {self.flops_match}: must be in (0, 0.5)")


def _project_path(text: str) -> Path:
    path = Path(text).expanduser()
    return path if path.is_absolute() else PROJECT_ROOT / path


def input_paths(params: Params) -> list[Path]:
    """Profile-independent measurements the summary reads (the runner re-runs it when they change)."""
    return [_project_path(params.speed_benchmark), _project_path(params.devices_root)]


@dataclass(frozen=True)
class Row:
    claim: str
    statement: str
    paper: str
    ours: str
    setting: str
    criterion: str
    verdict: str
    chapter: str

    def __post_init__(self) -> None:
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict {self.verdict!r} is not one of {VERDICTS}")


def _missing(claim: str, statement: str, paper: str, chapter: str, path: Path) -> Row:
    return Row(claim, statement, paper, f"no result: {path.relative_to(PROJECT_ROOT) if path.is_relative_to(PROJECT_ROOT) else path} "
               "was not written", "", "", "not testable here", chapter)


def _pct(x: float) -> str:
    return f"{100 * x:.1f} %"


# --------------------------------------------------------------------------- C1

def _c1_component(part: pd.DataFrame) -> tuple[str, str]:
    """(outcome, text) of one component: HEART's primary against every opponent family's primary."""
    own = part[part["family"] == "heart"].iloc[0]
    rivals = part[part["family"].isin(c1_opponents())]
    relations = set(rivals["relation"])
    outcome = "better" if relations == {"better"} else "worse" if "worse" in relations else "overlap"
    versus = ", ".join(f"{catalogue.label(r.score)} {r.heart_minus:+.2f} [{r.heart_minus_lo:+.2f}, "
                       f"{r.heart_minus_hi:+.2f}]" for r in rivals.itertuples())
    text = (f"{own['component']}: HEART ρ = {own['spearman']:.2f} [{own['spearman_lo']:.2f}, {own['spearman_hi']:.2f}] "
            f"(n = {int(own['n_images'])}); HEART minus each other primary, paired: {versus}")
    return outcome, text


def claim_c1(folder: Path, params: Params) -> Row:
    statement = "Second-order (curvature) sensitivities rank tokens and heads better than first-order or heuristic ones"
    paper, chapter = "qualitative (ViT-B/16, DeiT-B/16)", "sensitivity"
    path = folder / "sensitivity" / "primaries.csv"
    if not path.is_file():
        return _missing("C1", statement, paper, chapter, path)
    table = pd.read_csv(path)
    parts, outcomes = [], []
    for _, part in table.groupby("component", sort=False):
        if (part["family"] == "heart").any() and part["family"].isin(c1_opponents()).any():
            outcome, text = _c1_component(part)
            outcomes.append(outcome)
            parts.append(text)
    if not outcomes:
        return _missing("C1", statement, paper, chapter, path)
    verdict = ("reproduced" if all(o == "better" for o in outcomes) else
               "not reproduced" if "worse" in outcomes else "inconclusive")
    return Row("C1", statement, paper, "; ".join(parts),
               "DeiT-Tiny (real weights), imagenet-sample-1000, pseudo-label loss; truth: leave-one-out ΔL of "
               "dropping the token (removing the head); primaries declared in the library before results were read",
               "HEART's primary (raw S, per-layer probe) ranks better than every first-order and heuristic "
               "primary (paired 95 % interval of the difference above 0), for tokens and heads",
               verdict, chapter)


# --------------------------------------------------------------------------- C2, C3

def _kept_accuracy_frontier(sweep: pd.DataFrame, max_drop: float) -> pd.DataFrame:
    """Per family, the largest FLOPs reduction whose top-1 drop vs the dense model is within max_drop."""
    rows = sweep[(sweep["family"] != "dense") & (sweep["images"] == "all")].copy()
    rows["drop"] = rows["dense_top1_same_images"] - rows["top1"]
    kept = rows[rows["drop"] <= max_drop]
    best = kept.loc[kept.groupby("family")["flops_reduction"].idxmax()] if not kept.empty else kept
    return best.set_index("family")


def claim_c2(folder: Path, params: Params) -> Row:
    statement = "Token pruning gives most of the savings, head pruning finer ones, and joint pruning the best trade-off"
    paper, chapter = "qualitative", "pruning"
    path = folder / "pruning" / "sweep.csv"
    if not path.is_file():
        return _missing("C2", statement, paper, chapter, path)
    frontier = _kept_accuracy_frontier(pd.read_csv(path), params.max_top1_drop)
    reach = {f: float(frontier.loc[f, "flops_reduction"]) if f in frontier.index else 0.0
             for f in ("token", "head", "joint")}
    ours = ", ".join(f"{f}-only {_pct(reach[f])}" if f != "joint" else f"joint {_pct(reach[f])}" for f in reach)
    token_dominates = reach["token"] > reach["head"]
    joint_best = reach["joint"] >= max(reach["token"], reach["head"])
    verdict = "reproduced" if token_dominates and joint_best else "not reproduced"
    return Row("C2", statement, paper,
               f"largest FLOPs reduction with top-1 within {_pct(params.max_top1_drop)} of the unpruned model: {ours}",
               "no fine-tuning; each family's best selector", "token > head, and joint ≥ both", verdict, chapter)


def claim_c3(folder: Path, params: Params) -> Row:
    statement = "Up to 49.4 % FLOPs reduction (with accuracy kept)"
    paper, chapter = "49.4 %", "pruning"
    path = folder / "pruning" / "sweep.csv"
    if not path.is_file():
        return _missing("C3", statement, paper, chapter, path)
    sweep = pd.read_csv(path)
    frontier = _kept_accuracy_frontier(sweep, params.max_top1_drop)
    best = float(frontier["flops_reduction"].max()) if not frontier.empty else 0.0
    near = sweep[(sweep["images"] == "all") & ((sweep["flops_reduction"] - 0.494).abs() <= params.flops_match)]
    near_text = ""
    if not near.empty:
        top = near.loc[(near["top1"]).idxmax()]
        near_text = (f"; at ≈ 49 % fewer FLOPs the best configuration ({top['family']}, {top['method']}) keeps top-1 "
                     f"{_pct(top['top1'])} vs {_pct(top['dense_top1_same_images'])} unpruned")
    verdict = "reproduced" if best >= 0.494 else "not reproduced"
    return Row("C3", statement, paper, f"{_pct(best)} with top-1 within {_pct(params.max_top1_drop)}{near_text}",
               "DeiT-Tiny, real weights, 1300 val images, no fine-tuning (the paper's figure is after fine-tuning)",
               f"FLOPs reduction ≥ 49.4 % with top-1 drop ≤ {_pct(params.max_top1_drop)}", verdict, chapter)


# --------------------------------------------------------------------------- C4

def claim_c4(folder: Path, params: Params) -> Row:
    statement = "36 % lower latency and 46 % higher throughput (at 49.4 % fewer FLOPs)"
    paper, chapter = "−36 % latency, +46 % throughput (GPU)", "pruning"
    path = _project_path(params.speed_benchmark)
    if not path.is_file():
        return _missing("C4", statement, paper, chapter, path)
    bench = json.loads(path.read_text())
    rows = pd.DataFrame(bench["rows"])
    rows = rows[rows["kind"] != "dense"]
    rows = rows.assign(distance=(rows["flops_reduction"] - 0.494).abs())
    near = rows[rows["distance"] <= params.flops_match]
    if near.empty:
        return _missing("C4", statement, paper, chapter, path)
    parts, met = [], []
    for (model, batch), group in near.groupby(["model", "batch"]):
        r = group.loc[group["distance"].idxmin()]
        parts.append(f"{model} batch {batch}: FLOPs −{_pct(r['flops_reduction'])}, latency −{_pct(r['latency_reduction'])}, "
                     f"throughput +{_pct(r['throughput_gain'])}")
        met.append(r["latency_reduction"] >= 0.36 and r["throughput_gain"] >= 0.46)
    device = bench.get("device", {})
    setting = f"CPU ({device.get('cpu_model', 'unknown')}, {device.get('threads', '?')} threads), random weights, 224 px"
    verdict = "reproduced" if all(met) else "not reproduced" if not any(met) else "inconclusive"
    return Row("C4", statement, paper, "; ".join(parts), setting,
               "latency −36 % or better and throughput +46 % or better at ≈ 49 % fewer FLOPs, every model and batch",
               verdict, chapter)


# --------------------------------------------------------------------------- C5

def claim_c5(folder: Path, params: Params) -> Row:
    statement = "After fine-tuning, accuracy matches or exceeds the baseline (e.g. +4.7 % recovery at 40 % token pruning)"
    paper, chapter = "+4.7 % at 40 % token pruning; 100 epochs", "finetune"
    path = folder / "finetune" / "recovery.csv"
    if not path.is_file():
        return _missing("C5", statement, paper, chapter, path)
    table = pd.read_csv(path)
    parts, fair = [], []
    for (experiment, setting), group in table[table["setting"] != "unpruned"].groupby(["experiment", "setting"], sort=False):
        by = group.set_index("comparison")
        if "vs_before" in by.index:
            r = by.loc["vs_before"]
            parts.append(f"{experiment}/{setting}: recovery {r['difference'] * 100:+.1f} pts [{r['lo'] * 100:+.1f}, {r['hi'] * 100:+.1f}]")
        if "vs_unpruned_tuned" in by.index:
            r = by.loc["vs_unpruned_tuned"]
            parts.append(f"vs equally fine-tuned unpruned {r['difference'] * 100:+.1f} pts [{r['lo'] * 100:+.1f}, {r['hi'] * 100:+.1f}]")
            fair.append("below" if r["hi"] < 0 else "match")
    if not fair:
        return _missing("C5", statement, paper, chapter, path)
    verdict = ("reproduced" if all(f == "match" for f in fair) else "not reproduced")
    return Row("C5", statement, paper, "; ".join(parts),
               "fine-tuning chapter's reduced setting (see there); paired bootstrap intervals over test images",
               "every pruned model's interval vs the equally fine-tuned unpruned model reaches 0 or above", verdict, chapter)


# --------------------------------------------------------------------------- C6

def claim_c6(folder: Path, params: Params) -> Row:
    statement = "The FLOPs and latency savings carry over to edge devices (Jetson AGX Orin), with energy gains"
    paper, chapter = "no numbers given", "edge"
    root = _project_path(params.devices_root)
    sessions = sorted(root.rglob("*.meta.json")) if root.is_dir() else []
    jetsons = []
    for meta in sessions:  # a Jetson's fingerprint names its model or its L4T release
        device = json.loads(meta.read_text()).get("fingerprint", {})
        if device.get("jetson_model") or device.get("l4t"):
            jetsons.append(device.get("device_name", meta.parent.name))
    edge = folder / "edge" / "comparison.csv"
    if not jetsons:
        return Row("C6", statement, paper,
                   f"no Jetson measured yet ({len({m.parent.name for m in sessions})} other device(s) under results/devices/)",
                   "needs a Jetson: see the edge chapter's how-to", "pruned latency and energy per image below the "
                   "unpruned model's on a Jetson", "not testable here", chapter)
    if not edge.is_file():
        return _missing("C6", statement, paper, chapter, edge)
    comparison = pd.read_csv(edge)
    rows = comparison[comparison["device"].astype(str).isin(jetsons)]
    ours = "; ".join(f"{r['device']} {r['model']} b{r['batch']} {r['pruning']}: latency {r['latency']}, energy/img "
                     f"{r.get('energy/img', '')}" for _, r in rows.iterrows())
    faster = [str(r["latency"]).startswith("-") for _, r in rows.iterrows()]
    verdict = "reproduced" if faster and all(faster) else "not reproduced"
    return Row("C6", statement, paper, ours or "no pruned configuration measured on the Jetson",
               ", ".join(sorted(set(jetsons))), "pruned latency below unpruned on every Jetson configuration",
               verdict if ours else "not testable here", chapter)


CLAIMS: tuple[Callable[[Path, Params], Row], ...] = (claim_c1, claim_c2, claim_c3, claim_c4, claim_c5, claim_c6,
                                                     *camphive.CLAIMS)


def claims_table(profile: str, params: Params) -> pd.DataFrame:
    """One row per claim, computed from the profile's results."""
    folder = results_root() / profile
    return pd.DataFrame([vars(claim(folder, params)) for claim in CLAIMS])


def verdict_counts(table: pd.DataFrame) -> dict[str, int]:
    return {v: int(n) for v, n in table["verdict"].value_counts().items()}


def _cell(text: Any) -> str:
    """Text safe inside a Markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def claims_markdown(table: pd.DataFrame) -> str:
    """The claims for reading: an overview (claim, verdict, chapter), then one block per claim with
    the paper's figure, ours and the setting in full (a single wide table squeezes the statements)."""
    lines = ["| claim | statement | verdict | chapter |", "|---|---|---|---|"]
    for row in table.itertuples():
        lines.append(f"| {row.claim} | {_cell(row.statement)} | **{row.verdict}** | "
                     f"[{row.chapter}]({row.chapter}.ipynb) |")
    for row in table.itertuples():
        lines += ["", f"**{row.claim}: {row.statement}**", "",
                  "| | |", "|---|---|",
                  f"| paper | {_cell(row.paper)} |", f"| ours | {_cell(row.ours)} |",
                  f"| setting | {_cell(row.setting)} |", f"| criterion | {_cell(row.criterion)} |",
                  f"| verdict | **{row.verdict}** |"]
    return "\n".join(lines) + "\n"


def verdict_colours(verdicts: pd.Series) -> np.ndarray:
    colours = {"reproduced": "#1b9e77", "not reproduced": "#d95f02", "inconclusive": "#7570b3",
               "not testable here": "#999999"}
    return np.array([colours[v] for v in verdicts])
