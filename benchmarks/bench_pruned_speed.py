"""Latency and throughput of exactly the configurations the pruning chapter reports at the paper's
FLOPs level, with the study's one timing harness (`python -m heart_lib measure`).

Reads a profile's `pruning/sweep.csv`, takes the unpruned model and every token-only and declared
joint configuration evaluated on all images at the level nearest the paper's 49.4 % FLOPs reduction
(the learned gate, class attention, norm, random, EViT, ToMe, the HEART oracle), and times them on this
device: every configuration at batch 1 and `--large-batch`, the HEART oracle at batch 1 only (it
scores each input with Hessian-vector products, about a second per image on a CPU, so a large batch
would take minutes per iteration). Random weights and an untrained gate of the trained one's shape:
timing depends on shapes, not on values. The edge chapter shows the result and the claims page reads
C4 from it.

With `--chapter finetune` it times instead the settings the fine-tuning chapter trained on ImageNet
(the book's "40 % token pruning" with HEART's gate, the joint setting and the peers matched to its
FLOPs), read from that chapter's `run.json`.

Run under the benchmark lock on a quiet machine:
    flock /tmp/heart-bench.lock .venv/bin/python benchmarks/bench_pruned_speed.py [--chapter finetune]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd

from heart_lib.experiments import pruning

ROOT = Path(__file__).resolve().parents[1]
PAPER_FLOPS = 0.494


def configurations(sweep: pd.DataFrame, target: float = PAPER_FLOPS) -> tuple[list[str], list[str]]:
    """(configurations without the oracle, oracle configurations) at the level nearest `target`;
    `sweep` holds the declared configurations only (`pruning.declared`)."""
    rows = sweep[sweep["family"].isin(["token", "joint"]) & (sweep["images"] == "all")].copy()
    rows["distance"] = (rows["flops_reduction"] - target).abs()
    levels = rows.groupby(["family", "level"])["distance"].min().reset_index()
    chosen = levels.loc[levels.groupby("family")["distance"].idxmin()]
    picked = rows.merge(chosen[["family", "level"]], on=["family", "level"]).drop_duplicates("config")
    oracle = picked["config"].str.contains("selector=heart")
    return sorted(picked.loc[~oracle, "config"]), sorted(picked.loc[oracle, "config"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="default")
    parser.add_argument("--large-batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None, help="output folder (default: results/devices/<device>)")
    parser.add_argument("--chapter", choices=("pruning", "finetune"), default="pruning",
                        help="whose configurations to time (default: the pruning chapter's at 49.4 %%)")
    args = parser.parse_args()
    if args.chapter == "finetune":
        return _measure(*finetune_configurations(args.profile), args)
    path = ROOT / "results" / args.profile / "pruning" / "sweep.csv"
    if not path.is_file():
        sys.exit(f"error: {path} does not exist; run `python -m heart_lib run --profile {args.profile} --only pruning` first")
    params = json.loads(path.with_suffix(".meta.json").read_text())["params"]
    sweep = pruning.declared(pd.read_csv(path), params["primary_head_method"], params["joint_head_share"])
    return _measure(params["model"], *configurations(sweep), args)


def finetune_configurations(profile: str) -> tuple[str, list[str], list[str]]:
    """(model, configurations, no oracle) of the fine-tuning chapter's ImageNet settings."""
    path = ROOT / "results" / profile / "finetune" / "run.json"
    if not path.is_file():
        sys.exit(f"error: {path} does not exist; run `python -m heart_lib run --profile {profile} --only finetune` first")
    meta = json.loads(path.read_text())
    settings = meta["experiments"]["imagenet"]["settings"]
    return meta["params"]["model"], sorted(c for c in settings.values() if c != "none"), []


def _measure(model: str, plain: list[str], oracle: list[str], args) -> int:
    base = [sys.executable, "-m", "heart_lib", "measure", "--model", model, "--repeats", str(args.repeats),
            "--min-cpu-share", "0.9", "--max-load", "1.5", *(["--out", args.out] if args.out else [])]
    sessions = [(["none", *plain], f"1,{args.large_batch}"), (oracle, "1")]
    for prunings, batches in sessions:
        if not prunings:
            continue
        command = base + ["--batch", batches] + [a for p in prunings for a in ("--pruning", p)]
        print("+", " ".join(command), flush=True)
        done = subprocess.run(command, cwd=ROOT)
        if done.returncode != 0:
            return done.returncode
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
