"""CPU speed of pruned ViT-B/16 and DeiT-B/16: latency (batch 1) and throughput (batch 32).

Unpruned and pruned models at ≈25/40/50 % FLOPs reduction (token-only: class-token-attention
selector at layers 3/6/9; joint: heads + tokens), all measured in one run. Random weights: timing
does not depend on them. Rounds are interleaved (every configuration once per round) so that load
drift on a shared machine hits all configurations alike; medians over rounds are reported.

Run under the shared benchmark lock:
    flock /tmp/heart-bench.lock .venv/bin/python benchmarks/bench_pruning_speed.py
Writes results/benchmarks/pruning_speed_cpu.json and .md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

import heart_lib  # noqa: F401  (before timm)
import timm

from heart_lib.flops import count_flops, counted_flops
from heart_lib.planning import match_keep
from heart_lib.measure.fingerprint import fingerprint
from heart_lib.paths import RESULTS_DIR
from heart_lib.pruning import prune
from heart_lib.results import run_metadata, write_json, write_text

MODELS = ("vit_base_patch16_224", "deit_base_patch16_224")
TARGETS = (0.25, 0.40, 0.50)
JOINT_TARGETS = (0.50,)  # heads + tokens, to see that sliced heads pay off too
LAYERS = (3, 6, 9)


def machine_info(threads: int) -> dict:
    """The measurement harness's device fingerprint, plus this run's load and provenance."""
    return {**fingerprint("cpu", "fp32", threads), "load_average_start": os.getloadavg(), **run_metadata()}


def joint_config(model, target: float):
    """Heads removed uniformly (head 0 of every other layer) plus tokens to reach `target`."""
    heads = {layer: (0,) for layer in range(1, len(model.blocks), 2)}
    return match_keep(model, target, LAYERS, heads=heads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds1", type=int, default=15, help="timed rounds at batch 1")
    parser.add_argument("--rounds32", type=int, default=3, help="timed rounds at batch 32")
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--out", default=str(RESULTS_DIR / "benchmarks" / "pruning_speed_cpu.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    started = time.time()
    info = machine_info(args.threads)

    rows = []
    for name in args.models:
        base = timm.create_model(name, pretrained=False).eval()
        variants = [("unpruned", "dense", None)]
        for t in TARGETS:
            variants.append((f"tokens -{int(100 * t)} %", "tokens", match_keep(base, t, LAYERS)))
        for t in JOINT_TARGETS:
            variants.append((f"joint -{int(100 * t)} %", "joint", joint_config(base, t)))
        built = []
        dense_flops = count_flops(base)
        for label, kind, config in variants:
            model = base if config is None else prune(base, config)
            flops = count_flops(model)
            built.append({"model": name, "label": label, "kind": kind, "config": "" if config is None else config.to_string(),
                          "flops": flops, "flops_reduction": 1 - flops / dense_flops,
                          "counted_flops": counted_flops(model), "module": model})
        for batch, rounds, warm in ((1, args.rounds1, 3), (32, args.rounds32, 1)):
            x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(1))
            times = {b["label"]: [] for b in built}
            with torch.inference_mode():
                for b in built:
                    for _ in range(warm):
                        b["module"](x)
                for _ in range(rounds):
                    for b in built:
                        start = time.perf_counter()
                        b["module"](x)
                        times[b["label"]].append(time.perf_counter() - start)
            dense_t = statistics.median(times["unpruned"])
            for b in built:
                t = statistics.median(times[b["label"]])
                reduction = 1 - t / dense_t
                rows.append({k: v for k, v in b.items() if k != "module"} | {
                    "batch": batch, "median_seconds": t, "min_seconds": min(times[b["label"]]),
                    "iqr_seconds": _iqr(times[b["label"]]), "images_per_second": batch / t,
                    "latency_reduction": reduction, "throughput_gain": dense_t / t - 1,
                    "latency_over_flops_reduction": reduction / b["flops_reduction"] if b["flops_reduction"] > 0 else None,
                    "rounds": rounds})
                print(f"{name:24s} bs{batch:<3d} {b['label']:14s} FLOPs -{100 * b['flops_reduction']:5.1f} %  "
                      f"{1000 * t:9.1f} ms  latency -{100 * reduction:5.1f} %  throughput +{100 * (dense_t / t - 1):5.1f} %",
                      flush=True)
    info["load_average_end"] = os.getloadavg()
    info["wall_seconds"] = time.time() - started
    out = Path(args.out)
    write_json(out, {"device": info, "rows": rows, "layers": LAYERS, "targets": TARGETS, "joint_targets": JOINT_TARGETS,
                     "selector": "cls_attention", "command": "flock /tmp/heart-bench.lock .venv/bin/python "
                     "benchmarks/bench_pruning_speed.py"})
    write_text(out.with_suffix(".md"), _markdown(rows, info))


def _iqr(values: list[float]) -> float:
    q = statistics.quantiles(values, n=4) if len(values) >= 2 else [values[0]] * 3
    return q[2] - q[0]


def _markdown(rows: list[dict], info: dict) -> str:
    lines = [
        "# Pruning speed on CPU", "",
        f"Device: {info['cpu_model']}, {info['cpu_logical']} logical CPUs, torch threads = {info['threads']}, "
        f"torch {info['torch']}, timm {info['timm']}; load average at start {tuple(round(v, 2) for v in info['load_average_start'])}, "
        f"at end {tuple(round(v, 2) for v in info['load_average_end'])}. Random weights, 224 px, fused attention (SDPA) on.",
        "Token pruning: class-token-attention selector at layers 3/6/9; joint: head 0 of every odd layer sliced out plus tokens.",
        "Medians over interleaved rounds. Ratio = latency reduction / FLOPs reduction (paper: 36 % / 49.4 % = 0.73).", "",
        "| model | batch | config | FLOPs (G) | FLOPs saved | median time (ms) | latency saved | throughput (img/s) | throughput gain | ratio |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = "" if r["latency_over_flops_reduction"] is None else f"{r['latency_over_flops_reduction']:.2f}"
        lines.append(f"| {r['model']} | {r['batch']} | {r['label']} | {r['flops'] / 1e9:.2f} | {100 * r['flops_reduction']:.1f} % | "
                     f"{1000 * r['median_seconds']:.1f} | {100 * r['latency_reduction']:.1f} % | {r['images_per_second']:.2f} | "
                     f"{100 * r['throughput_gain']:+.1f} % | {ratio} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
