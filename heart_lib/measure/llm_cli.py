"""`python -m heart_lib measure-llm` and `select-llm`: causal LMs on this device, and the pick under limits.

Example (the group's Orin protocol, widened: 5 fresh-process runs per configuration, medians):

    python -m heart_lib measure-llm --model pythia-70m-deduped,pythia-160m-deduped \\
        --dtype fp32,bf16,int8 --batch 1,8 --prompt-tokens 32 --new-tokens 64 --repeats 5

or with the sweep in a YAML file (keys as the long options, lists allowed; the command line wins):

    python -m heart_lib measure-llm --sweep sweep.yaml

Writes `results/devices/<device>/llm/<session>.csv` (one row per run), `<session>.meta.json` and
`raw/<session>/*.json` (token time stamps, power traces).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from heart_lib.measure import energy, fingerprint

# Option -> default; list-valued options are the sweep axes.
SWEEP_DEFAULTS: dict[str, Any] = {
    "model": ["pythia-70m-deduped"], "dtype": ["fp32"], "batch": [1], "prompt_tokens": [32], "new_tokens": [64],
    "threads": [None], "device": "cpu", "repeats": 5, "weights": "auto", "warmup": 1, "generations": 1,
    "overhead_pairs": 0, "energy": "auto", "interval": energy.DEFAULT_INTERVAL_S, "idle": 15.0, "seed": 0,
    "memory_headroom": 0.8, "model_kwargs": {}, "timeout": None,
}
LIST_KEYS = ("model", "dtype", "batch", "prompt_tokens", "new_tokens", "threads")


def _list(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The measure-llm options (every sweep option also reads from --sweep FILE)."""
    parser.description = __doc__.split("\n\n")[0]
    parser.add_argument("--sweep", default=None, help="YAML file with any of the options below (lists for the axes)")
    what = parser.add_argument_group("the sweep (comma-separated lists)")
    what.add_argument("--model", type=_list, help="pythia-{70m,160m,410m,1b,1.4b}-deduped or gpt-neox-tiny")
    what.add_argument("--dtype", type=_list, help="fp32, bf16, fp16 (GPU), int8 (CPU, dynamic), 4bit (GPU, bitsandbytes)")
    what.add_argument("--batch", type=_list, help="batch sizes (1)")
    what.add_argument("--prompt-tokens", type=_list, help="prompt lengths in tokens (32)")
    what.add_argument("--new-tokens", type=_list, help="tokens to generate, always the full length (64)")
    what.add_argument("--threads", type=_list, help="torch threads (default: the CPUs this process may use)")
    how = parser.add_argument_group("how")
    how.add_argument("--device", help=f"one of {fingerprint.ALLOWED_DEVICES} (cpu)")
    how.add_argument("--repeats", type=int, help="runs per configuration, each in a fresh process (5)")
    how.add_argument("--weights", help="auto (mirror, then hub, else random), random, hub, mirror or a folder (auto)")
    how.add_argument("--warmup", type=int, help="short untimed generations before the timed one (1)")
    how.add_argument("--generations", type=int, help="timed generations per run; the median is reported (1)")
    how.add_argument("--overhead-pairs", type=int, help="also time this many bare generate calls: harness overhead (0)")
    how.add_argument("--memory-headroom", type=float, help="skip runs predicted to need more of the free memory (0.8)")
    how.add_argument("--model-kwargs", type=__import__("json").loads, help="JSON config overrides, e.g. '{\"num_hidden_layers\": 2}'")
    how.add_argument("--seed", type=int)
    how.add_argument("--timeout", type=float, help="seconds allowed per fresh-process run")
    how.add_argument("--in-process", action="store_true", help="no fresh processes (quick checks only)")
    en = parser.add_argument_group("energy")
    en.add_argument("--energy", choices=energy.ENERGY_CHOICES, help="auto tries jtop, tegrastats, then NVML or RAPL")
    en.add_argument("--interval", type=float, help="sampling interval, s (0.1)")
    en.add_argument("--idle", type=float, help="idle-baseline seconds per run (15; 0 when there is no energy source)")
    dev = parser.add_argument_group("device record")
    dev.add_argument("--out", default=None, help="output folder (default results/devices/<device-name>/llm/)")
    dev.add_argument("--device-name", default=None, help="folder/label for this device (default: detected)")
    dev.add_argument("--power-mode", default=None, help="nvpmodel mode, when nvpmodel -q cannot be read")
    dev.add_argument("--jetson-clocks", choices=("on", "off"), default=None, help="whether jetson_clocks was set")
    dev.add_argument("--notes", default=None, help="free text stored with every row")


def sweep_options(args: argparse.Namespace) -> dict[str, Any]:
    """Defaults, then the --sweep file, then the command line; list axes as lists of the right type."""
    import yaml

    options = dict(SWEEP_DEFAULTS)
    if args.sweep:
        loaded = yaml.safe_load(Path(args.sweep).read_text()) or {}
        unknown = set(loaded) - set(SWEEP_DEFAULTS)
        if unknown:
            raise ValueError(f"--sweep {args.sweep}: unknown keys {sorted(unknown)}; allowed: {sorted(SWEEP_DEFAULTS)}")
        options.update({k.replace("-", "_"): v for k, v in loaded.items()})
    options.update({k: v for k, v in vars(args).items() if k in SWEEP_DEFAULTS and v is not None})
    for key in LIST_KEYS:
        values = options[key] if isinstance(options[key], list) else [options[key]]
        if key == "threads" and values == [None]:
            values = [len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()]
        if key not in ("model", "dtype"):
            try:
                values = [int(v) for v in values]
            except (TypeError, ValueError):
                raise ValueError(f"--{key.replace('_', '-')} = {values}: expected integers") from None
        if not values:
            raise ValueError(f"--{key.replace('_', '-')}: give at least one value")
        options[key] = [str(v) for v in values] if key in ("model", "dtype") else values
    return options


def main(args: argparse.Namespace) -> int:
    """Run an LLM measurement session; 0 when at least one run succeeded (or none was planned)."""
    from heart_lib import results
    from heart_lib.measure import llm
    from heart_lib.paths import RESULTS_DIR

    o = sweep_options(args)
    device = fingerprint.resolve_device(o["device"])
    overrides = {k: v for k, v in {"device_name": args.device_name, "nvpmodel": args.power_mode,
                                   "jetson_clocks": args.jetson_clocks, "notes": args.notes}.items() if v is not None}
    info = fingerprint.fingerprint(device, "fp32", o["threads"][0], overrides)
    out = Path(args.out) if args.out else RESULTS_DIR / "devices" / info["device_name"] / "llm"
    probe = energy.open_source(o["energy"], device, o["interval"])
    note = probe.describe()
    probe.close()
    idle = o["idle"] if not isinstance(probe, energy.NoEnergySource) else 0.0  # no source: an idle period measures nothing
    specs = llm.expand(o["model"], o["dtype"], o["batch"], o["prompt_tokens"], o["new_tokens"], o["threads"],
                       o["repeats"], device=device, weights=o["weights"], warmup=o["warmup"],
                       generations=o["generations"], overhead_pairs=o["overhead_pairs"], energy=o["energy"],
                       interval_s=o["interval"], idle_s=idle, seed=o["seed"], memory_headroom=o["memory_headroom"],
                       model_kwargs=o["model_kwargs"], overrides=overrides)
    out.mkdir(parents=True, exist_ok=True)
    from heart_lib.measure.run import new_session_id

    session = new_session_id(out)
    print(f"device {info['device_name']} ({device}); energy: {note['energy_source']} - {note['energy_reason']}; "
          f"{len(specs)} runs")
    results.write_json(out / f"{session}.meta.json", {
        **results.run_metadata(), "fingerprint": info, "energy": note, "argv": sys.argv, "options": o,
        "runs_planned": len(specs), "fresh_process": not args.in_process})
    rows = llm.run_llm_session(specs, out, session, fresh_process=not args.in_process, timeout_s=o["timeout"],
                               facts=info)
    print(f"wrote {out / (session + '.csv')} ({len(rows)} runs)")
    return 0 if (rows["status"] == "ok").any() or not len(rows) else 1


# ------------------------------------------------------------------ select-llm


def add_select_arguments(parser: argparse.ArgumentParser) -> None:
    """The select-llm options: where the sessions are, the limits and the objective."""
    parser.description = "The best measured LLM configuration under limits on power, latency, energy and memory."
    parser.add_argument("--root", default=None, help="devices folder (default results/devices)")
    parser.add_argument("--device-name", default=None, help="only this device")
    parser.add_argument("--max-power", type=float, default=None, help="peak power, W")
    parser.add_argument("--max-latency", type=float, default=None, help="generation latency, s")
    parser.add_argument("--max-energy", type=float, default=None, help="energy per token, J")
    parser.add_argument("--max-memory", type=float, default=None, help="peak memory, MiB")
    parser.add_argument("--objective", default="tokens_per_s", help="column to maximise (tokens_per_s)")
    parser.add_argument("--minimise", action="store_true", help="minimise the objective instead")


def select_main(args: argparse.Namespace) -> int:
    """Print every configuration with the limits it breaks, then the best one; 1 when none qualifies."""
    from heart_lib.measure import llm_tables, select
    from heart_lib.paths import RESULTS_DIR

    summary = llm_tables.summarize_llm(llm_tables.load_llm_runs(Path(args.root) if args.root else RESULTS_DIR / "devices"))
    if args.device_name:
        summary = summary[summary["device_name"] == args.device_name]
    limits = select.Limits(args.max_power, args.max_latency, args.max_energy, args.max_memory)
    summary = summary.assign(breaks=select.violations(summary, limits))
    cols = ["device_name", "model", "weights", "dtype", "batch_size", "prompt_tokens", "new_tokens", "tokens_per_s",
            "generate_s", "peak_memory_mb", "energy_per_token_j", "peak_power_w", "breaks"]
    print(summary[cols].to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    best = select.select_best(summary, limits, args.objective, maximise=not args.minimise)
    if best is None:
        print("no configuration meets every limit")
        return 1
    print("best: " + ", ".join(f"{c}={best[c]}" for c in cols[:7]) + f" ({args.objective} = {best[args.objective]:.4g})")
    return 0


def run_cli(argv: list[str] | None = None) -> int:
    """Stand-alone entry without the rest of the project's imports (Python 3.10 measure environment):
    `python -m heart_lib.measure.llm_cli [select] ...`; bad input becomes exit code 2."""
    argv = sys.argv[1:] if argv is None else argv
    selecting = bool(argv) and argv[0] == "select"
    parser = argparse.ArgumentParser(prog="python -m heart_lib.measure.llm_cli" + (" select" if selecting else ""))
    (add_select_arguments if selecting else add_arguments)(parser)
    args = parser.parse_args(argv[1:] if selecting else argv)
    try:
        return select_main(args) if selecting else main(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    import heart_lib  # noqa: F401 - torchvision shim before transformers

    sys.exit(run_cli())
