"""Fine-tuning recovery of pruned ViTs (book/method.md, 'Fine-tuning and edge measurements'): AdamW + cosine warm-up, label smoothing,
optional distillation from the unpruned model, dynamic token selection during training, AMP on GPU,
exact checkpoint/resume, and multi-process / multi-machine training through `torchrun` (DDP).

    from heart_lib.finetune import TrainConfig, train
    result = train(pruned_model, train_set, TrainConfig(epochs=2, lr=1e-4), out_dir, transform=...)

Command line: `python -m heart_lib.finetune --help` (or `torchrun ... -m heart_lib.finetune`).
"""

from heart_lib.finetune.checkpoint import CheckpointMismatch
from heart_lib.finetune.cli import add_arguments, main
from heart_lib.data import TensorImages
from heart_lib.finetune.inputs import (SeededAugment, image_transform, materialize,
                                       model_at_resolution)
from heart_lib.finetune.loop import TIME_COLUMNS, NonFiniteLossError, TrainResult, amp_dtype, train
from heart_lib.finetune.recipe import TrainConfig, distillation_loss, lr_factor, training_loss

__all__ = ["TrainConfig", "train", "TrainResult", "NonFiniteLossError", "CheckpointMismatch", "lr_factor",
           "distillation_loss", "training_loss", "amp_dtype", "model_at_resolution", "image_transform",
           "materialize", "SeededAugment", "TensorImages", "add_arguments", "main", "TIME_COLUMNS"]
