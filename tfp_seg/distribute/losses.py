"""The global-batch loss rule of a custom training loop under a strategy (`average_loss`)."""

from __future__ import annotations

import tensorflow as tf


def average_loss(per_example_loss, global_batch_size=None, sample_weight=None) -> tf.Tensor:
    """Per-replica share of the global-batch mean, float32 (`tf.nn.compute_average_loss`).

    ```none
    loss = sum_b w_b * loss_b / B_global        (B_global = per-replica batch * replicas)
    ```

    Use it in a custom `train_step` whose gradients the strategy sums over replicas; the sum
    over replicas is then the single-device mean, also with uneven per-replica batches when
    `global_batch_size` is given.

    Args:
      per_example_loss: `[B]` (or `[B, ...]`, reduced over all but the batch axis first).
      global_batch_size: the global batch; default: per-replica batch * replicas.
      sample_weight: optional `[B]` weights.
    """
    loss = tf.cast(tf.convert_to_tensor(per_example_loss), tf.float32)
    if loss.shape.rank is not None and loss.shape.rank == 0:
        raise ValueError("`per_example_loss` must have a batch axis ([B]); got a scalar.")
    if loss.shape.rank is not None and loss.shape.rank > 1:
        loss = tf.reduce_mean(loss, axis=list(range(1, loss.shape.rank)))
    if sample_weight is not None:
        sample_weight = tf.cast(sample_weight, tf.float32)
    return tf.nn.compute_average_loss(
        loss, sample_weight=sample_weight, global_batch_size=global_batch_size
    )
