"""The data source of a run: the built-in ambiguous benchmark described by a `TrainConfig`."""

from __future__ import annotations

from tfp_seg.data import ambiguous_shapes
from tfp_seg.runs.config import TrainConfig

__all__ = ["make_data"]


def make_data(config: TrainConfig):
    """The built-in ambiguous benchmark, split 80/10/10 reproducibly."""
    data = ambiguous_shapes(
        num_images=config.num_images,
        image_size=config.image_size,
        num_annotations=config.num_annotations,
        seed=config.seed,
    )
    return data.train_val_test()
