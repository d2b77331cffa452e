"""Input pipelines under a strategy: sharding, replica-divisible batches, seeded streams and
resuming them after completed epochs."""

from __future__ import annotations

from typing import Callable

import tensorflow as tf

from tfp_seg import _checks


def shard_by_data(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """Set `AutoShardPolicy.DATA`: each worker keeps every n-th element (in-memory datasets).

    The default policy (AUTO) first tries to shard by file, which an in-memory dataset
    (`from_tensor_slices`, `tfp_seg.data`) does not have; it then falls back to DATA with a
    warning. Shard by data explicitly; apply before batching or after, as `fit` distributes it.
    """
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.with_options(options)


def divisible_batches(dataset: tf.data.Dataset, num_replicas: int) -> tf.data.Dataset:
    """Trim each batch of `dataset` to a multiple of `num_replicas` examples.

    Keras 3 (3.15, TensorFlow backend) fails under `MirroredStrategy` when the FIRST batch of a
    dataset does not split evenly over the replicas, in `fit` and in `evaluate` alike
    (`InvalidArgumentError: Inputs to operation AddN ... must have the same size and shape`):
    that is a dataset smaller than one global batch, such as a small validation set, with a
    size not divisible by the replica count. (An uneven partial batch after full ones passes.)
    Only a partial last batch can be uneven, so at most `num_replicas - 1` examples of an epoch
    are left out: the last ones of the batch order (with a shuffled training set, different
    ones each epoch). With one replica the dataset is returned unchanged.

    Args:
      dataset: batched; every element's components share the leading batch axis (`(x, y)`,
        `(x, y, sample_weight)`, a dict).
      num_replicas: replicas in sync (`strategy.num_replicas_in_sync`), a positive int.
    """
    num_replicas = _checks.positive_int(
        num_replicas, "num_replicas", message="num_replicas must be {what}; got {value}"
    )
    if num_replicas == 1:
        return dataset

    def batch_size(*element):
        return tf.shape(tf.nest.flatten(element)[0])[0]

    def trim(*element):
        keep = batch_size(*element) // num_replicas * num_replicas
        trimmed = tf.nest.map_structure(lambda t: t[:keep], element)
        return trimmed[0] if len(element) == 1 else trimmed

    return dataset.map(trim).filter(lambda *element: batch_size(*element) > 0)


def seeded_stream(make_dataset: Callable[[], tf.data.Dataset]) -> tf.data.Dataset:
    """A dataset whose every iterator yields the same stream: `make_dataset()`, built afresh.

    A shuffling dataset (`shuffle(..., seed=s, reshuffle_each_iteration=True)`,
    `Dataset.random(seed=s, rerandomize_each_iteration=True)`) keeps its seed state in the
    dataset object: every iterator made from it (and every repetition such an iterator reads)
    draws the next seeds. What `fit` sees then depends on how many iterators Keras made and
    how far each read - under a strategy Keras reads one batch for a symbolic build before
    training, with prefetching in the background - which a resumed process cannot replay.
    Wrapped here in `Dataset.range(1).flat_map(...)`, the dataset (and its seed state) is
    rebuilt for each iterator, so each iterator starts the same seeded stream.

    Feed `seeded_stream(lambda: ds.repeat())` with `fit(..., steps_per_epoch=S)` and resume
    with `skip_epochs`: the data order is a function of the seeds alone.

    Args:
      make_dataset: a function of no arguments returning the (batched) dataset.
    """
    cardinality = make_dataset().cardinality()
    stream = tf.data.Dataset.range(1).flat_map(lambda _: make_dataset())
    if cardinality >= 0 or cardinality == tf.data.INFINITE_CARDINALITY:
        stream = stream.apply(tf.data.experimental.assert_cardinality(cardinality))
    return stream


def skip_epochs(dataset: tf.data.Dataset, epochs: int, steps_per_epoch: int) -> tf.data.Dataset:
    """`dataset.skip(epochs * steps_per_epoch)`: resume a seeded, repeated stream exactly.

    For a run fed one repeated stream (`seeded_stream(lambda: ds.repeat())`,
    `fit(..., steps_per_epoch=S)`) and resumed after `k` epochs: the resumed run continues
    with batch `k * S` of the same stream, as an uninterrupted run would. Skipping reads (and
    drops) the skipped batches.

    Args:
      dataset: the repeated (infinite), batched dataset passed to `fit`.
      epochs: completed epochs.
      steps_per_epoch: `S`, the `steps_per_epoch` given to `fit`.
    """
    epochs = _checks.positive_int(epochs, "epochs", minimum=0)
    steps_per_epoch = _checks.positive_int(steps_per_epoch, "steps_per_epoch", minimum=0)
    if dataset.cardinality() != tf.data.INFINITE_CARDINALITY:
        raise ValueError(
            "skip_epochs expects a repeated (infinite) dataset fed with steps_per_epoch; "
            f"got cardinality {int(dataset.cardinality())}."
        )
    return dataset.skip(epochs * steps_per_epoch) if epochs else dataset
