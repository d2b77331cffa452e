"""Seeds: the one conversion of user seeds to stateless seeds, and their derivations.

```none
seed argument     None (stateful RNG) | int s | shape-[2] int seed
check_seed        a user's seed checked before anything runs (None | int | int64 array [2])
stateless_seed    int s -> [s, 0] (int64);  [2] -> int64;  None stays None
seed_pair         the same as two Python ints (s0, s1)
split_seed        a distinct stateless seed per salt: [s0, s1 * 7919 + salt]
fold_seed         stateless_fold_in(seed, k): the seed of the k-th chunk / stream
                  (k folded in as int32; the exported graphs fold their chunk index as int64)
draw_seed         a fresh [2] seed from the stateful RNG (changes every call)
replica_seed      fold the replica id into the seed under a multi-replica strategy
```
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple, Union

import numpy as np
import tensorflow as tf

__all__ = [
    "SeedLike",
    "check_seed",
    "stateless_seed",
    "seed_pair",
    "split_seed",
    "fold_seed",
    "batch_seed",
    "draw_seed",
    "replica_seed",
]

SeedLike = Union[None, int, Sequence[int], tf.Tensor]

# Exclusive upper bound of the seeds drawn by `draw_seed` (int32 uniforms).
_MAX_DRAWN_SEED = 2**31 - 1


def check_seed(seed: Any, name: str = "seed", pair: bool = True) -> Union[None, int, np.ndarray]:
    """A user's `seed` argument, checked before anything runs.

    Returns None, a Python int (from a Python or NumPy integer, not a bool) or, with `pair`,
    an int64 array `[2]` (a stateless seed: any integer array-like of shape [2], e.g. a list
    or an eager tensor); anything else is a `ValueError` naming `name`. `pair=False` accepts
    None and ints only (seeds stored in a Keras config).
    """
    if pair:
        message = f"`{name}` must be None, an int or a pair of ints (a shape-[2] stateless seed)"
    else:
        message = f"`{name}` must be None or an int"
    if seed is None:
        return None
    if isinstance(seed, (bool, np.bool_)):
        raise ValueError(f"{message}; got {seed!r}.")
    if isinstance(seed, (int, np.integer)):
        return int(seed)
    if pair:
        try:
            array = np.asarray(seed)
        except (TypeError, ValueError):
            array = None
        if array is not None and array.shape == (2,) and np.issubdtype(array.dtype, np.integer):
            return array.astype(np.int64)
    raise ValueError(f"{message}; got {seed!r}.")


def stateless_seed(seed: SeedLike) -> Optional[tf.Tensor]:
    """A shape-[2] int64 stateless seed from `seed` (None stays None; an int `s` is `[s, 0]`)."""
    if seed is None:
        return None
    if isinstance(seed, (int, np.integer)):
        return tf.constant([int(seed), 0], tf.int64)
    return tf.cast(tf.convert_to_tensor(seed), tf.int64)


def seed_pair(seed: SeedLike) -> Optional[Tuple[int, int]]:
    """`(s0, s1)`: the stateless seed of `seed` as two Python ints (None stays None), for
    seeding what is not a TF stateless op (e.g. a Keras `SeedGenerator`'s state)."""
    seed = stateless_seed(seed)
    if seed is None:
        return None
    s0, s1 = (int(v) for v in np.asarray(seed))
    return s0, s1


def split_seed(seed: SeedLike, salt: int) -> Optional[tf.Tensor]:
    """A stateless seed distinct for each `salt` (None stays None: stateful sampling).

    ```none
    split_seed([s0, s1], salt) = [s0, s1 * 7919 + salt]       (an int s is [s, 0]: [s, salt])
    ```
    """
    seed = stateless_seed(seed)
    if seed is None:
        return None
    return tf.stack([seed[0], seed[1] * 7919 + salt])


def fold_seed(seed: SeedLike, k, dtype: tf.DType = tf.int32) -> Optional[tf.Tensor]:
    """`stateless_fold_in(seed, k)`: the stateless seed of the `k`-th chunk or stream (None
    stays None: stateful sampling).

    `k` is folded in as `dtype` (int32 or int64), which also is the dtype of the result: the
    two give different seeds. int32 everywhere but in the exported serving graphs
    (`tfp_seg.export`), whose sample chunks fold their index as int64; that choice is part of
    what a seeded request to an exported model returns, so it stays.
    """
    seed = stateless_seed(seed)
    if seed is None:
        return None
    return tf.random.experimental.stateless_fold_in(seed, tf.cast(k, dtype))


def batch_seed(seed: Any, index: int) -> Any:
    """The seed of batch `index` of a batched read-out: `seed` itself for batch 0,
    `fold_seed(seed, index)` (as NumPy) after; None stays None. `tfp_seg.models.sampling.Sampler`
    seeds its batches so, and the streaming evaluations and run reports follow it, so that
    their draws equal the Sampler's own."""
    if seed is None or index == 0:
        return seed
    return fold_seed(seed, index).numpy()


def draw_seed() -> tf.Tensor:
    """A fresh stateless seed `[2]` (int32) from the stateful RNG: it changes every call."""
    return tf.random.uniform([2], minval=0, maxval=_MAX_DRAWN_SEED, dtype=tf.int32)


def _replicated_context():
    ctx = tf.distribute.get_replica_context()
    if ctx is None or ctx.num_replicas_in_sync <= 1:
        return None
    return ctx


def replica_seed(seed: SeedLike):
    """A seed made distinct for each replica in sync (unchanged with one replica).

    Args:
      seed: None (stateful sampling), an int, or a shape-[2] int seed.

    Returns:
      Outside a strategy, in cross-replica context, or with one replica: `seed` unchanged.
      Otherwise a shape-[2] int64 stateless seed, `fold_in(seed, replica_id)`; for
      `seed=None` the base seed is drawn from the stateful RNG first (so it still changes from
      step to step), then the replica id is folded in (so workers sharing a global seed still
      differ).
    """
    ctx = _replicated_context()
    if ctx is None:
        return seed
    base = draw_seed() if seed is None else seed
    replica = tf.cast(ctx.replica_id_in_sync_group, tf.int32)
    return tf.cast(fold_seed(base, replica), tf.int64)
