"""What several chapters share: the model and evaluation set a `Params` describes."""

from __future__ import annotations

from typing import Any

from heart_lib import data, models


def model_and_dataset(params: Any):
    """The model (eval mode, CPU) and its dataset, from the fields every image chapter has:
    model, weights, num_classes, seed, model_kwargs, dataset, limit, data_path."""
    model = models.create_model(params.model, params.weights, params.num_classes, seed=params.seed,
                                **params.model_kwargs)
    image_size = model.patch_embed.img_size[0] if hasattr(model, "patch_embed") else 224
    dataset = data.image_dataset(params.dataset, data.model_transform(model), limit=params.limit,
                                 seed=params.seed, path=params.data_path, image_size=image_size,
                                 num_classes=model.num_classes)
    return model, dataset
