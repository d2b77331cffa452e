"""Standard normal noise in export-safe ops (Box-Muller from uniforms)."""

from __future__ import annotations

import math

import tensorflow as tf

from tfp_seg import _seeds
from tfp_seg._seeds import SeedLike

__all__ = ["standard_normal"]


def standard_normal(shape, seed: SeedLike = None, dtype=tf.float32) -> tf.Tensor:
    """Standard normal noise in export-safe ops, by the Box-Muller transform of uniforms.

    ```none
    u1, u2 ~ U[0, 1)    r = sqrt(-2 log(1 - u1)),  a = 2 pi u2    ->   r cos(a), r sin(a) ~ N(0, 1)
    ```

    Exact in distribution, with the same float32 resolution as TensorFlow's own normal kernel
    (which is Box-Muller too: tails reach ~5.6 sigma), but built from vectorised elementwise
    ops on uniforms: ~1.6x faster on CPU than `tf.random.stateless_normal`, and the noise is
    the bulk of the cost of drawing many samples. Half precision and bfloat16 are drawn in
    float32 and cast; float64 is drawn from float64 uniforms.

    `seed=None` uses the stateful `tf.random.uniform` (converts to ONNX `RandomUniformLike`);
    an int or a shape-[2] int seed uses `tf.random.stateless_uniform`, reproducible across
    calls and independent of global state. Under a `tf.distribute` strategy with more than
    one replica in sync, the replica id is folded into the seed
    (`tfp_seg.distribute.replica_seed`) so that replicas do not draw identical noise for their
    different examples; with one replica (and in exported graphs) nothing changes.
    """
    seed = _seeds.replica_seed(seed)
    dtype = tf.as_dtype(dtype)
    draw_dtype = tf.float64 if dtype == tf.float64 else tf.float32
    shape = tf.cast(shape, tf.int32)
    size = tf.reduce_prod(shape)
    pairs = tf.stack([2, (size + 1) // 2])
    if seed is None:
        u = tf.random.uniform(pairs, dtype=draw_dtype)
    else:
        u = tf.random.stateless_uniform(pairs, seed=_seeds.stateless_seed(seed), dtype=draw_dtype)
    # 1 - u is exact (u is a multiple of 2^-23, or 2^-52) and in (0, 1]; `log(1 - u)`, not
    # `log1p(-u)`, because ONNX has no Log1p.
    radius = tf.sqrt(-2.0 * tf.math.log(1.0 - u[0]))
    angle = tf.constant(2.0 * math.pi, draw_dtype) * u[1]
    flat = tf.concat([radius * tf.cos(angle), radius * tf.sin(angle)], axis=0)
    return tf.cast(tf.reshape(flat[:size], shape), dtype)
