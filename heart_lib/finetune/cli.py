"""Command line: `python -m heart_lib.finetune ...`, under torchrun for several processes/machines.

    # one process
    python -m heart_lib.finetune --out runs/t40 --pruning "tokens=0.6@3;selector=cls_attention" \
        --train-data cifar10-train --eval-data cifar10-test --num-classes 10 --epochs 30
    # two processes on this machine (gloo on CPU, NCCL on GPUs); --batch-size is the global batch
    torchrun --nproc_per_node 2 -m heart_lib.finetune --out runs/t40 ...
    # two machines with 8 GPUs each
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 \
        -m heart_lib.finetune --out /shared/runs/t40 ...

Running the same command again resumes from `<out>/checkpoint.pt` (refused if the configuration
differs). Only process 0 writes: checkpoint, `history.csv`, and at the end `per_image.csv` and
`summary.json` for the evaluation set. With several machines, `--out` must be a shared folder.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

from heart_lib.finetune.recipe import AMP_MODES, TrainConfig

DEFAULTS = TrainConfig()


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the fine-tuning options to `parser` (used by `python -m heart_lib finetune` too)."""
    m = parser.add_argument_group("model")
    m.add_argument("--model", default="deit_tiny_patch16_224", help="timm model name")
    m.add_argument("--weights", default="mirror", help="none | mirror | hub | auto | path to a state_dict")
    m.add_argument("--num-classes", type=int, default=None, help="new classifier size (default: the checkpoint's)")
    m.add_argument("--image-size", type=int, default=None, help="input side; position embeddings are resampled")
    m.add_argument("--model-kwargs", type=json.loads, default={}, help="extra timm.create_model arguments (JSON)")
    m.add_argument("--pruning", default=None, help="pruning config (text form or YAML/JSON file); default: dense")
    d = parser.add_argument_group("data")
    d.add_argument("--train-data", default="cifar10-train", help="dataset name (heart_lib.data.DATASETS)")
    d.add_argument("--train-limit", type=int, default=None, help="seeded subset of this many training images")
    d.add_argument("--eval-data", default=None, help="dataset evaluated after each epoch and at the end")
    d.add_argument("--eval-limit", type=int, default=None)
    d.add_argument("--data-path", default=None, help="folder for datasets outside the mirror")
    d.add_argument("--crop-pct", type=float, default=None, help="evaluation centre-crop fraction (1 = no crop)")
    t = parser.add_argument_group("training")
    t.add_argument("--epochs", type=int, default=DEFAULTS.epochs)
    t.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size, help="global batch over all processes")
    t.add_argument("--lr", type=float, default=DEFAULTS.lr)
    t.add_argument("--min-lr", type=float, default=DEFAULTS.min_lr)
    t.add_argument("--warmup-epochs", type=float, default=DEFAULTS.warmup_epochs)
    t.add_argument("--weight-decay", type=float, default=DEFAULTS.weight_decay)
    t.add_argument("--label-smoothing", type=float, default=DEFAULTS.label_smoothing)
    t.add_argument("--distill", type=float, default=DEFAULTS.distill_alpha,
                   help="weight of distillation from the unpruned model (0 = labels only)")
    t.add_argument("--temperature", type=float, default=DEFAULTS.distill_temperature)
    t.add_argument("--grad-clip", type=float, default=None)
    t.add_argument("--amp", choices=AMP_MODES, default=DEFAULTS.amp)
    t.add_argument("--seed", type=int, default=DEFAULTS.seed)
    r = parser.add_argument_group("run")
    r.add_argument("--out", required=True, help="folder for checkpoint, history and final evaluation")
    r.add_argument("--device", default="auto", help="auto | cpu | cuda (torchrun: each process its LOCAL_RANK GPU)")
    r.add_argument("--no-resume", action="store_true", help="start over even if <out>/checkpoint.pt exists")
    r.add_argument("--checkpoint-every", type=int, default=0, help="steps between mid-epoch checkpoints")
    r.add_argument("--stop-after", type=int, default=None, help="stop after N steps of this call (testing)")
    r.add_argument("--workers", type=int, default=0, help="data-loading worker processes per training process")
    r.add_argument("--no-eval-every-epoch", action="store_true", help="evaluate at the end only")
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, min_lr=args.min_lr,
                       warmup_epochs=args.warmup_epochs, weight_decay=args.weight_decay,
                       label_smoothing=args.label_smoothing, distill_alpha=args.distill,
                       distill_temperature=args.temperature, grad_clip=args.grad_clip, amp=args.amp, seed=args.seed,
                       checkpoint_every=args.checkpoint_every, stop_after=args.stop_after, workers=args.workers,
                       eval_every_epoch=not args.no_eval_every_epoch)


def main(args: argparse.Namespace) -> int:
    """Run one fine-tuning job from parsed arguments; returns an exit status."""
    from heart_lib import data, models, results
    from heart_lib.finetune import distributed
    from heart_lib.finetune.inputs import image_transform, materialize, model_at_resolution
    from heart_lib.finetune.loop import train
    from heart_lib.pruning import PruningConfig, prune

    config = config_from_args(args)  # validate before any process group starts
    ctx = distributed.init(args.device)
    try:
        dense = model_at_resolution(args.model, args.weights, args.num_classes, args.image_size, seed=args.seed,
                                    **args.model_kwargs)
        teacher = copy.deepcopy(dense) if config.distill_alpha > 0 else None
        model = dense if args.pruning is None else prune(dense, PruningConfig.parse(args.pruning))
        size, classes = int(dense.patch_embed.img_size[0]), dense.num_classes
        synthetic = {"image_size": size, "num_classes": classes}
        train_set = data.image_dataset(args.train_data, None, limit=args.train_limit, seed=args.seed,
                                       path=args.data_path, **synthetic)
        transform = None if args.train_data == "synthetic" else image_transform(dense, train=True)
        eval_set = None
        if args.eval_data is not None:
            eval_tf = None if args.eval_data == "synthetic" else image_transform(dense, False, args.crop_pct)
            eval_set = materialize(data.image_dataset(args.eval_data, eval_tf, limit=args.eval_limit,
                                                      seed=args.seed, path=args.data_path, **synthetic))
        out = Path(args.out)
        fingerprint = {"model": args.model, "weights": str(args.weights), "image_size": size,
                       "train_data": args.train_data, "train_limit": args.train_limit}
        result = train(model, train_set, config, out, transform=transform, teacher=teacher, eval_set=eval_set,
                       device=ctx.device, resume=not args.no_resume, fingerprint=fingerprint)
        if ctx.is_main:
            done = "finished" if result.finished else f"stopped after step {result.step} (--stop-after)"
            if result.resumed_from is not None:
                done += f", resumed from step {result.resumed_from} of {out / 'checkpoint.pt'} (--no-resume starts over)"
            print(f"fine-tuning {done}; {len(result.history)} epoch(s) in {out / 'history.csv'}")
            if result.finished and eval_set is not None:
                table = models.evaluate(result.model.cpu(), data.make_loader(eval_set, config.batch_size))
                summary = models.summarize(table)
                results.write_table(out / "per_image.csv", table, meta={"args": vars(args)})
                results.write_json(out / "summary.json", summary)
                print(f"{args.eval_data}: top-1 {100 * summary['top1']:.2f} % "
                      f"({100 * summary['top1_lo']:.2f}–{100 * summary['top1_hi']:.2f} %) on {summary['n']} images")
        return 0
    finally:
        distributed.shutdown()


def parser() -> argparse.ArgumentParser:
    return add_arguments(argparse.ArgumentParser(prog="python -m heart_lib.finetune", description=__doc__,
                                                 formatter_class=argparse.RawDescriptionHelpFormatter))


def run(argv: list[str] | None = None) -> int:
    """Entry point of `python -m heart_lib.finetune`: errors in the user's input exit with status 2."""
    from heart_lib.data import DataError

    args = parser().parse_args(argv)
    try:
        return main(args)
    except (ValueError, DataError, FloatingPointError) as err:  # FloatingPointError: the NaN-loss stop
        print(f"error: {err}", file=sys.stderr)
        return 2
