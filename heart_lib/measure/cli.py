"""`python -m heart_lib measure`: latency, throughput, peak memory and energy on this device.

Example (the group's Orin protocol: 5 runs per configuration, each in a fresh process, medians):

    python -m heart_lib measure --model vit_base_patch16_224,deit_base_patch16_224 \\
        --pruning none --pruning "tokens=0.7@3,6,9;selector=cls_attention" \\
        --batch 1,32 --repeats 5 --out results/devices/<device>/

Writes `<out>/<session>.csv` (one row per run), `<out>/<session>.meta.json` (device fingerprint,
command) and `<out>/raw/<session>/*.json` (per-iteration latencies, power traces).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from heart_lib.measure import bench, energy, fingerprint
from heart_lib.measure.run import Discipline, RunSpec, expand, new_session_id, run_session


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers, e.g. 1,32") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: batch sizes must be positive integers")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The measure command's options (the lead's `heart_lib.cli` mounts them as `measure`)."""
    parser.description = __doc__.split("\n\n")[0]
    what = parser.add_argument_group("what to measure")
    what.add_argument("--model", action="append", required=True,
                      help="timm model name(s); repeat the flag or separate with commas")
    what.add_argument("--pruning", action="append", default=None,
                      help="'none', a pruning config in compact form (e.g. 'tokens=0.7@3,6,9;selector=cls_attention;"
                           "heads=0:1+2') or a YAML/JSON file; repeat the flag for several (default: none)")
    what.add_argument("--batch", type=_int_list, default=[1], help="batch sizes, comma-separated (default 1)")
    what.add_argument("--weights", default="none",
                      help="none (random: timing does not depend on weights), mirror, hub, auto or a file")
    what.add_argument("--model-kwargs", default="{}", help="JSON of extra timm.create_model arguments")
    how = parser.add_argument_group("how")
    how.add_argument("--repeats", type=int, default=5, help="runs per configuration, each in a fresh process (5)")
    how.add_argument("--warmup", type=int, default=2, help="untimed warm-up iterations per run (2)")
    how.add_argument("--min-iters", type=int, default=3, help="timed iterations per run, at least (3)")
    how.add_argument("--min-time", type=float, default=2.0, help="timed seconds per run, at least (2.0)")
    how.add_argument("--device", default="cpu", help=f"one of {fingerprint.ALLOWED_DEVICES} (cpu)")
    how.add_argument("--precision", choices=sorted(bench.PRECISIONS), default="fp32")
    how.add_argument("--threads", type=int, default=None,
                     help="torch intra-op threads (default: the CPUs this process may use)")
    how.add_argument("--in-process", action="store_true",
                     help="run everything in this process (quick checks; breaks the fresh-process protocol)")
    how.add_argument("--seed", type=int, default=0)
    how.add_argument("--memory-headroom", type=float, default=0.8,
                     help="CPU: skip a batch predicted to need more than this fraction of available memory")
    how.add_argument("--timeout", type=float, default=None, help="seconds allowed per fresh-process run")
    shared = parser.add_argument_group("shared machines (CPU)")
    shared.add_argument("--max-load", type=float, default=None,
                        help="wait before each run until the 1-minute load average is at most this")
    shared.add_argument("--max-wait", type=float, default=300.0, help="longest wait for --max-load, s (300)")
    shared.add_argument("--min-cpu-share", type=float, default=0.0,
                        help="mark a run 'contended' and measure it again when its CPU time / (wall x threads) "
                             "falls below this (e.g. 0.9; default off)")
    shared.add_argument("--max-retries", type=int, default=2, help="re-measurements of a contended run (2)")
    en = parser.add_argument_group("energy")
    en.add_argument("--energy", choices=energy.ENERGY_CHOICES, default="auto",
                    help="power source; auto tries jtop, tegrastats, then NVML (GPU) or RAPL (CPU)")
    en.add_argument("--interval", type=float, default=energy.DEFAULT_INTERVAL_S, help="sampling interval, s (0.1)")
    en.add_argument("--idle", type=float, default=15.0,
                    help="idle-baseline seconds before each run (15; skipped when there is no energy source)")
    dev = parser.add_argument_group("device record")
    dev.add_argument("--out", default=None, help="output folder (default $HEART_RESULTS/devices/<device-name>/, HEART_RESULTS defaulting to results/)")
    dev.add_argument("--device-name", default=None, help="folder/label for this device (default: detected)")
    dev.add_argument("--power-mode", default=None, help="nvpmodel mode, when nvpmodel -q cannot be read")
    dev.add_argument("--jetson-clocks", choices=("on", "off"), default=None, help="whether jetson_clocks was set")
    dev.add_argument("--notes", default=None, help="free text stored with every row (e.g. 'fan at max')")


def _split(values: list[str]) -> list[str]:
    return [v.strip() for item in values for v in item.split(",") if v.strip()]


def _check_fits(names: list[str], prunings: list[str], model_kwargs: dict[str, Any]) -> None:
    """Each pruning must fit each model (layers, heads): a user's typo is refused before any run,
    instead of being measured into the device folder as failed runs."""
    import timm
    import torch

    from heart_lib.pruning.config import PruningConfig

    for name in names:
        try:
            with torch.device("meta"):  # the architecture only: no weights, no memory
                model = timm.create_model(name, pretrained=False, **model_kwargs)
        except (TypeError, ValueError) as err:
            raise ValueError(f"--model-kwargs {json.dumps(model_kwargs)} do not fit --model {name}: {err}") from None
        blocks = getattr(model, "blocks", None)
        if blocks is None or not all(hasattr(b, "attn") for b in blocks):
            if any(p != "none" for p in prunings):
                raise ValueError(f"--model {name}: not a ViT/DeiT (no transformer blocks), so it cannot be "
                                 "pruned; measure it with --pruning none only")
            continue
        for text in prunings:
            if text == "none":
                continue
            try:
                PruningConfig.parse(text).check(depth=len(blocks),
                                                num_heads={i: b.attn.num_heads for i, b in enumerate(blocks)})
            except ValueError as err:
                raise ValueError(f"--pruning {text!r} does not fit --model {name}: {err}") from None


def _check(args: argparse.Namespace) -> dict[str, Any]:
    """Validate everything before any process starts; ValueError names the bad option."""
    from heart_lib import models
    from heart_lib.measure import workload

    device = fingerprint.resolve_device(args.device)
    names = _split(args.model)
    for name in names:
        models.check_model_name(name)
    prunings = [workload.canonical_pruning(p) for p in (args.pruning or ["none"])]
    if len(set(prunings)) != len(prunings):
        raise ValueError(f"--pruning lists the same configuration twice: {prunings}")
    for name, value, low in (("--repeats", args.repeats, 1), ("--min-iters", args.min_iters, 1),
                             ("--warmup", args.warmup, 0)):
        if value < low:
            raise ValueError(f"{name} = {value}: must be >= {low}")
    if args.min_time < 0 or args.idle < 0 or not args.interval > 0:
        raise ValueError(f"--min-time ({args.min_time}) and --idle ({args.idle}) must be >= 0, "
                         f"--interval ({args.interval}) > 0")
    if not 0 < args.memory_headroom <= 1:
        raise ValueError(f"--memory-headroom = {args.memory_headroom}: must be in (0, 1]")
    try:
        model_kwargs = json.loads(args.model_kwargs)
    except json.JSONDecodeError as err:
        raise ValueError(f"--model-kwargs = {args.model_kwargs!r}: not JSON ({err})") from err
    if not isinstance(model_kwargs, dict):
        raise ValueError(f"--model-kwargs = {args.model_kwargs!r}: expected a JSON object")
    _check_fits(names, prunings, model_kwargs)
    threads = args.threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    if threads < 1:
        raise ValueError(f"--threads = {threads}: must be a positive integer")
    overrides = {"device_name": args.device_name, "nvpmodel": args.power_mode, "jetson_clocks": args.jetson_clocks,
                 "notes": args.notes}
    discipline = Discipline(args.max_load, args.max_wait, args.min_cpu_share, args.max_retries)
    discipline.check()
    return {"discipline": discipline, "device": device, "models": names, "prunings": prunings, "model_kwargs": model_kwargs,
            "threads": threads, "overrides": {k: v for k, v in overrides.items() if v is not None}}


def main(args: argparse.Namespace) -> int:
    """Run a measurement session; 0 when every configuration was measured or reported, 1 when none ran."""
    from heart_lib import results
    from heart_lib.paths import results_root

    checked = _check(args)
    device, threads = checked["device"], checked["threads"]
    bench.set_threads(threads)
    info = fingerprint.fingerprint(device, args.precision, threads, checked["overrides"])
    out = Path(args.out) if args.out else results_root() / "devices" / info["device_name"]
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"--out {out}: cannot create it ({err.strerror}); give a writable folder") from None
    # Probe the energy source once up front so a missing one is reported before minutes of runs.
    probe = energy.open_source(args.energy, device, args.interval)
    source_note = probe.describe()
    probe.close()
    idle = args.idle if not isinstance(probe, energy.NoEnergySource) else 0.0
    print(f"device {info['device_name']} ({device}, {threads} threads, {args.precision}); "
          f"energy: {source_note['energy_source']} - {source_note['energy_reason']}")
    session = new_session_id(out)
    specs = expand(checked["models"], checked["prunings"], args.batch, args.repeats, device=device,
                   precision=args.precision, threads=threads, warmup_iters=args.warmup, min_iters=args.min_iters,
                   min_time_s=args.min_time, energy=args.energy, interval_s=args.interval, idle_s=idle,
                   weights=args.weights, model_kwargs=checked["model_kwargs"], seed=args.seed,
                   memory_headroom=args.memory_headroom, overrides=checked["overrides"])
    results.write_json(out / f"{session}.meta.json", {
        **results.run_metadata(), "fingerprint": info, "energy": source_note, "argv": sys.argv,
        "options": {k: v for k, v in vars(args).items() if k != "func"}, "runs_planned": len(specs),
        "fresh_process": not args.in_process})
    rows = run_session(specs, out, session, fresh_process=not args.in_process, timeout_s=args.timeout,
                       facts=info, discipline=checked["discipline"])
    print(f"wrote {out / (session + '.csv')} ({len(rows)} runs)")
    _print_summary(rows)
    return 0 if (rows["status"] == "ok").any() or not len(rows) else 1


def _print_summary(rows) -> None:
    from heart_lib.measure.tables import summarize

    summary = summarize(rows)
    cols = ["model", "pruning", "batch_size", "runs_ok", "statuses", "latency_median_ms", "latency_iqr_ms",
            "throughput_img_s", "peak_memory_mb", "energy_per_image_j"]
    with_cols = [c for c in cols if c in summary]
    print(summary[with_cols].to_string(index=False, float_format=lambda v: f"{v:.4g}"))


def run_cli(argv: list[str] | None = None) -> int:
    """Stand-alone entry (`python -m heart_lib.measure`): parse, run, turn bad input into exit code 2."""
    parser = argparse.ArgumentParser(prog="python -m heart_lib.measure")
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return main(args)
    except ValueError as err:  # bad options, unknown device or model, unavailable energy source
        print(f"error: {err}", file=sys.stderr)
        return 2
