"""`python -m heart_lib <command>`: run a profile's notebooks, build the book, check data, measure."""

from __future__ import annotations

import argparse
import signal
import sys

from heart_lib import config
from heart_lib.data import DataError


def _run(args: argparse.Namespace) -> int:
    from heart_lib import runner

    outcomes = runner.run_profile(args.profile, jobs=args.jobs, force=args.force, only=args.only or None)
    executed = [o for o in outcomes if o.status == "executed"]
    print(f"profile {args.profile}: {len(executed)} executed, {len(outcomes) - len(executed)} up to date")
    return 0


def _book(args: argparse.Namespace) -> int:
    from heart_lib import book

    book.build(args.profile, force=args.force)
    return 0


def _data(args: argparse.Namespace) -> int:
    """Resolve and verify everything a profile's default data needs (extracting archives once)."""
    from heart_lib import data, models

    failed = 0
    for name in args.datasets:
        try:
            print(f"{name}: {len(data.image_dataset(name))} images ok")
        except DataError as err:
            failed += 1
            print(f"error: {name}: {err}", file=sys.stderr)
    for name in args.weights:
        path = models.mirror_weights(name)
        if path is None:
            failed += 1
            print(f"error: {name} weights: {models.mirror_weights_missing(name)}", file=sys.stderr)
        else:
            print(f"{name} weights: {path} ok")
    return 1 if failed else 0


def _reproduce(args: argparse.Namespace) -> int:
    from heart_lib import reproduce

    comparisons = reproduce.reproduce(args.profile, rtol=args.rtol, jobs=args.jobs)
    print(reproduce.report(comparisons))
    return 1 if any(c.status in {"different", "missing"} for c in comparisons) else 0


def _finetune(args: argparse.Namespace) -> int:
    from heart_lib import finetune

    return finetune.main(args)


def _measure(args: argparse.Namespace) -> int:
    from heart_lib.measure import cli as measure_cli

    return measure_cli.main(args)


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="python -m heart_lib", description=__doc__)
    sub = top.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="execute a profile's notebooks into results/<profile>/")
    run.add_argument("--profile", default="default")
    run.add_argument("-j", "--jobs", type=int, default=1, help="notebooks executed at once")
    run.add_argument("--force", action="store_true", help="re-execute even when up to date")
    run.add_argument("--only", nargs="*", help="only these notebooks")
    run.set_defaults(func=_run)

    bk = sub.add_parser("book", help="render the book from a profile's executed notebooks")
    bk.add_argument("--profile", default="default")
    bk.add_argument("--force", action="store_true")
    bk.set_defaults(func=_book)

    dt = sub.add_parser("data", help="resolve and verify data and weights")
    dt.add_argument("--datasets", nargs="*", default=["imagenet-val-1300", "imagenet-sample-1000", "cifar10-test"])
    dt.add_argument("--weights", nargs="*", default=["deit_tiny_patch16_224"])
    dt.set_defaults(func=_data)

    rp = sub.add_parser("reproduce", help="re-run a profile afresh and compare with its committed tables")
    rp.add_argument("--profile", default="default")
    rp.add_argument("--rtol", type=float, default=1e-4, help="relative tolerance where not bit-identical")
    rp.add_argument("-j", "--jobs", type=int, default=1)
    rp.set_defaults(func=_reproduce)

    from heart_lib import finetune

    ft = sub.add_parser("finetune", help="fine-tune a (pruned) model; also under torchrun -m heart_lib.finetune")
    finetune.add_arguments(ft)
    ft.set_defaults(func=_finetune)

    try:
        from heart_lib.measure import cli as measure_cli
    except ImportError:
        measure_cli = None
    if measure_cli is not None:
        ms = sub.add_parser("measure", help="latency, throughput, memory and energy of a model on this device")
        measure_cli.add_arguments(ms)
        ms.set_defaults(func=_measure)
    from heart_lib.measure import llm_cli

    ml = sub.add_parser("measure-llm", help="causal LMs (Pythia) on this device: load, prefill, decode, memory, energy")
    llm_cli.add_arguments(ml)
    ml.set_defaults(func=llm_cli.main)
    sl = sub.add_parser("select-llm", help="the best measured LLM configuration under power/latency/energy/memory limits")
    llm_cli.add_select_arguments(sl)
    sl.set_defaults(func=llm_cli.select_main)
    return top


class Interrupted(BaseException):
    """A signal asked us to stop (BaseException, like KeyboardInterrupt: no `except Exception` eats it)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _signalled(signum, frame) -> None:
    # Ctrl-C and SIGTERM unwind the main thread the same way: the runner then kills the kernels,
    # staging copies and temporary files are removed, and nothing already written is touched.
    raise Interrupted(signum)


def main(argv: list[str] | None = None) -> int:
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _signalled)
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except Interrupted as stop:
        name = signal.Signals(stop.signum).name
        print(f"error: stopped by {name}; results written before it are kept, nothing half-written was "
              "kept", file=sys.stderr)
        return 128 + stop.signum
    except (config.ConfigError, DataError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except FloatingPointError as err:  # fine-tuning stopped on a NaN/inf loss; the message says where
        print(f"error: {err}", file=sys.stderr)
        return 1
    except Exception as err:  # noqa: BLE001 - runner and book errors carry their own messages
        from heart_lib.book import BookError
        from heart_lib.results import ResultsNotWritable
        from heart_lib.runner import NotebookFailed

        if isinstance(err, (NotebookFailed, BookError, ResultsNotWritable)):
            print(f"error: {err}", file=sys.stderr)
            return 1
        raise
