"""Cost of HEART sensitivity scores relative to one forward+backward pass, on this CPU.

For each (model, batch): the time of one training-style forward+backward of the batch (fused
attention, as the model normally runs; and on the explicit attention path the HVPs must use), and
of scoring every token at the input of every block plus every head:

- heart_global: single-probe HEART curvature, one HVP over all gates (double backward, and
  forward-over-reverse);
- heart_per_layer: single probe per gate group (the book/method.md, 'Components, gates and the sensitivity score' definition: one HVP per layer's
  tokens and per layer's heads, 2 x depth HVPs sharing one forward/backward);
- heart_global_finite_difference: the same probe by central differences of the gate gradient (two
  gradient passes, approximate: O(h²) with h = eps^(1/3));
- heart_hutchinson_k8: Hutchinson with 8 probes over all gates (unbiased diagonal);
- taylor: the gate gradient only (first-order scores).

Ops are timed round-robin (op1, op2, ..., op1, op2, ...) so load from other processes hits all
of them alike; medians are reported, with the ratio to the forward+backward median of the same
run. Peak memory: each op runs once in a fresh subprocess; reported as the peak resident set size
and its increase over the process after setting up the model and batch.

Usage (wrap in the shared lock so two benchmarks never overlap):
    flock /tmp/heart-bench.lock .venv/bin/python benchmarks/bench_sensitivity.py
Writes results/benchmarks/sensitivity_cpu.json and .md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import heart_lib  # noqa: F401  (before timm: makes torchvision importable)
import timm
import torch

from heart_lib import results
from heart_lib import sensitivity as S
from heart_lib._compat import non_fused_attention
from heart_lib.measure.fingerprint import fingerprint
from heart_lib.paths import PROJECT_ROOT

CONFIGS = (("deit_tiny_patch16_224", 32), ("vit_base_patch16_224", 8))
OPS = ("forward_backward", "forward_backward_explicit", "taylor", "heart_global", "heart_global_forward_over_reverse",
       "heart_global_finite_difference", "heart_hutchinson_k8", "heart_per_layer")
SLOW_OPS = ("heart_per_layer", "heart_hutchinson_k8")  # timed once (2 x depth HVPs; 8 HVPs)
WARMUP_OPS = ("forward_backward", "forward_backward_explicit", "taylor")  # allocator and lazy init
NO_MEMORY_OPS = ("heart_per_layer", "heart_global_forward_over_reverse")  # (finite differences: measured)  # skipped to save time


def setup(name: str, batch: int, seed: int = 0):
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False).eval()  # timing does not depend on weights
    images = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(seed))
    return model, images


def op_fn(name: str, model, images):
    """A zero-argument callable running one op."""
    def forward_backward():
        model.zero_grad(set_to_none=True)
        for p in model.parameters():
            p.requires_grad_(True)
        logits = model(images)
        torch.nn.functional.cross_entropy(logits, logits.detach().argmax(-1)).backward()

    def forward_backward_explicit():
        with non_fused_attention(model):
            forward_backward()

    score = dict(layers=None, heads=True, loss="pseudo")
    ops = {
        "forward_backward": forward_backward,
        "forward_backward_explicit": forward_backward_explicit,
        "taylor": lambda: S.score_components(model, images, method="taylor", **score),
        "heart_global": lambda: S.score_components(model, images, method="heart", scope="global", **score),
        "heart_global_forward_over_reverse": lambda: S.score_components(
            model, images, method="heart", scope="global", mode="forward_over_reverse", **score),
        "heart_global_finite_difference": lambda: S.score_components(
            model, images, method="heart", scope="global", mode="finite_difference", **score),
        "heart_hutchinson_k8": lambda: S.score_components(model, images, method="heart_hutchinson", probes=8,
                                                          **score),
        "heart_per_layer": lambda: S.score_components(model, images, method="heart", scope="layer", **score),
    }
    return ops[name]


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) so the peak seen next belongs to the op alone."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def memory_child(name: str, batch: int, op: str, threads: int) -> dict:
    """Run in a fresh process: peak RSS of one op."""
    torch.set_num_threads(threads)
    model, images = setup(name, batch)
    fn = op_fn(op, model, images)
    base = _status_mb("VmRSS")
    exact = reset_peak()
    fn()
    peak = _status_mb("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"peak_rss_mb": round(peak, 1), "baseline_rss_mb": round(base, 1), "extra_mb": round(peak - base, 1),
            "peak_reset": exact}


def measure_memory(name: str, batch: int, op: str, threads: int) -> dict:
    cmd = [sys.executable, __file__, "--memory-child", name, str(batch), op, "--threads", str(threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=PROJECT_ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def machine_info(threads: int) -> dict:
    """The measurement harness's device fingerprint, plus the commit and time of this run."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=PROJECT_ROOT).stdout.strip()
    except OSError:
        commit = "unknown"
    return {**fingerprint("cpu", "fp32", threads), "git_commit": commit,
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}


def bench_config(name: str, batch: int, repeats: int, threads: int, ops: tuple[str, ...], memory: bool) -> dict:
    model, images = setup(name, batch)
    fns = {op: op_fn(op, model, images) for op in ops}
    times: dict[str, list[float]] = {op: [] for op in ops}
    for op in ops:
        if op in WARMUP_OPS:
            fns[op]()
    for r in range(repeats):
        for op in ops:
            if op in SLOW_OPS and r >= 1:
                continue
            start = time.perf_counter()
            fns[op]()
            times[op].append(time.perf_counter() - start)
            print(f"  {name} b{batch} {op}: {times[op][-1]:.2f} s", flush=True)
    base = statistics.median(times["forward_backward"])
    base_explicit = statistics.median(times["forward_backward_explicit"]) if "forward_backward_explicit" in times else None
    rows = {}
    for op in ops:
        med = statistics.median(times[op])
        rows[op] = {"median_s": round(med, 3), "min_s": round(min(times[op]), 3), "runs": len(times[op]),
                    "ratio_to_forward_backward": round(med / base, 2),
                    "ratio_to_forward_backward_explicit": round(med / base_explicit, 2) if base_explicit else None}
        if memory and op not in NO_MEMORY_OPS:
            rows[op]["memory"] = measure_memory(name, batch, op, threads)
    depth = len(model.blocks)
    return {"model": name, "batch": batch, "image_size": 224, "depth": depth, "heads": int(model.blocks[0].attn.num_heads),
            "tokens_per_layer": int(model.patch_embed.num_patches + model.num_prefix_tokens), "ops": rows}


def markdown(report: dict) -> str:
    lines = ["# HEART sensitivity cost on CPU", "",
             "Scores cover every token at the input of every block and every head, for a batch of 224 px "
             "images. Ratio = median time / median time of one forward+backward (fused attention, weight "
             "gradients, cross-entropy) of the same batch, measured in the same run, ops interleaved "
             "round-robin; 'vs explicit' divides by the forward+backward on the explicit attention path "
             "that double backward needs. Memory: peak RSS of a fresh process running the op once, and its "
             "increase over that process after model and batch setup. The machine is shared: see the load "
             "averages; absolute times are inflated by other jobs, ratios less so.", ""]
    for cfg in report["configs"]:
        fp = cfg["fingerprint"]
        title = f"{cfg['model']}, batch {cfg['batch']}" + (f" ({cfg['label']})" if cfg.get("label") else "")
        lines += [f"## {title}", "",
                  f"{fp['cpu_model']}, {fp['threads']} torch threads ({fp['cpu_logical']} logical CPUs), "
                  f"torch {fp['torch']}, timm {fp['timm']}, {fp['date']}, commit {fp['git_commit']}; "
                  f"load average before {cfg['load_before']}, after {cfg['load_after']}.", "",
                  "| op | median s | runs | ratio | vs explicit | peak RSS MB | extra MB |",
                  "|---|---|---|---|---|---|---|"]
        for op, row in cfg["ops"].items():
            mem = row.get("memory", {})
            explicit = row["ratio_to_forward_backward_explicit"]
            lines.append(f"| {op} | {row['median_s']:.2f} | {row['runs']} | {row['ratio_to_forward_backward']:.2f} | "
                         f"{'–' if explicit is None else f'{explicit:.2f}'} | {mem.get('peak_rss_mb', '–')} | "
                         f"{mem.get('extra_mb', '–')} |")
        lines.append("")
    lines += ["Goal: single-probe HEART for all tokens and heads at <= 3x one forward+backward. "
              "`heart_global` is one HVP for every gate at once (cross-layer terms included); "
              "`heart_per_layer` is the per-layer probe of book/method.md, 'Components, gates and the sensitivity score' (2 x depth HVPs, each from its own block); "
              "`heart_hutchinson_k8` is 8 HVPs sharing one forward/backward; `taylor` is the gate gradient only."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ops", default=",".join(OPS))
    parser.add_argument("--configs", default=",".join(f"{m}:{b}" for m, b in CONFIGS))
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--fresh", action="store_true", help="start a new report instead of merging")
    parser.add_argument("--label", default="", help="names a run; a run replaces only the entry with its "
                        "model, batch and label")
    parser.add_argument("--out", default=str(PROJECT_ROOT / "results" / "benchmarks" / "sensitivity_cpu.json"))
    parser.add_argument("--memory-child", nargs=3, metavar=("MODEL", "BATCH", "OP"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_child:
        model, batch, op = args.memory_child
        print(json.dumps(memory_child(model, int(batch), op, args.threads)))
        return
    ops = tuple(o for o in args.ops.split(",") if o)
    unknown = [o for o in ops if o not in OPS]
    if unknown or "forward_backward" not in ops:
        raise SystemExit(f"--ops: unknown {unknown}; allowed {OPS} (forward_backward is required)")
    out = Path(args.out)
    # Configs are merged into an existing report, so models can be measured in separate runs (each
    # config keeps the fingerprint and load of its own run).
    report = results.read_json(out) if out.is_file() and not args.fresh else {"configs": []}
    for spec in args.configs.split(","):
        name, batch = spec.rsplit(":", 1)
        print(f"{name} batch {batch}", flush=True)
        load_before = [round(x, 2) for x in os.getloadavg()]
        cfg = bench_config(name, int(batch), args.repeats, args.threads, ops, not args.no_memory)
        cfg.update(fingerprint=machine_info(args.threads), load_before=load_before,
                   load_after=[round(x, 2) for x in os.getloadavg()], repeats=args.repeats, label=args.label)
        same = (name, int(batch), args.label)
        report["configs"] = [c for c in report["configs"]
                             if (c["model"], c["batch"], c.get("label", "")) != same] + [cfg]
        results.write_json(out, report)
        results.write_text(out.with_suffix(".md"), markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
