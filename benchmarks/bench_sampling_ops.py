"""The sampling building blocks alone, each against the plain TensorFlow op it replaced, on CPU.

On tensors of the size of 100 samples of a batch of 8 at 128x128 with 3 classes (39 M values),
as `tf.function`s timed side by side (median of interleaved repeats):

```none
noise          tf.random.stateless_normal  vs  distributions.standard_normal (Box-Muller)
               and tf.random.stateless_uniform alone (the random bits: a floor for both)
arg max        tf.argmax over the trailing class axis  vs  distributions.argmax_classes
mean softmax   mean of tf.nn.softmax over the trailing axis  vs  distributions.mean_softmax
index select   tf.where(condition, label, index) on int8 label planes  vs  readouts.raise_index
Cholesky noise `L xi` for 2 difference planes (sample_low_rank_labels' O(K) factor):
               with tf.math.cumsum over the short class axis  vs  its plane-by-plane loop
label maps     argmax_classes(sample_low_rank(...))  vs  sample_low_rank_labels (head
               parameters only, R = 10), also under jit_compile=True (unless --no-jit)
probabilities  mean_softmax(sample_low_rank(...))  vs  low_rank_mean_probabilities
```

Ratios are against the first row of each group.

Run:
    python benchmarks/bench_sampling_ops.py [benchmarks/results/sampling_ops.json] [--quick]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", nargs="?", default="benchmarks/results/sampling_ops.json")
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--num-classes", type=int, default=3)
    parser.add_argument("--rank", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--no-jit", action="store_true", help="skip the XLA rows (slow)")
    parser.add_argument("--quick", action="store_true", help="batch 1, 64x64, 3 repeats")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.size, args.repeats = 1, 64, 3
    return args


def _groups(args):
    import numpy as np
    import tensorflow as tf

    from tfp_seg import distributions as dists
    from tfp_seg.distributions.readouts import raise_index

    n, b, c, r = args.samples, args.batch, args.num_classes, args.rank
    x = args.size * args.size
    size = n * b * x * c
    # A variable, not a constant: Grappler folds stateless draws from a constant seed into
    # constants where they are small enough, which would time nothing.
    seed_var = tf.Variable([3, 4], dtype=tf.int64)

    def seed():
        return seed_var.read_value()

    rng = np.random.default_rng(0)
    logits = tf.constant(rng.normal(size=(n, b, x, c)).astype("float32"))
    planes = tf.constant(rng.normal(size=(b, n, 2, x)).astype("float32"))
    chol_diag = tf.constant(rng.uniform(0.5, 1.0, size=(b, 1, 2, x)).astype("float32"))
    chol_coef = tf.constant(rng.uniform(0.1, 0.5, size=(b, 1, 2, x)).astype("float32"))
    loc = tf.constant(rng.normal(size=(b, args.size, args.size, c)).astype("float32"))
    factor = tf.constant(0.5 * rng.normal(size=(b, args.size, args.size, c, r)).astype("float32"))
    diag = tf.constant(rng.uniform(0.1, 1.0, size=(b, args.size, args.size, c)).astype("float32"))

    index = tf.constant(rng.integers(0, c - 1, size=(b, n, x)).astype("int8"))
    condition = tf.constant(rng.random((b, n, x)) < 0.3)

    def first(t):  # one element back to the host: the op itself, not a 157 MB copy
        return tf.reshape(t, [-1])[:1]

    def cholesky_noise_cumsum():
        noise = chol_diag * planes + tf.math.cumsum(chol_coef * planes, axis=2, exclusive=True)
        return first(noise)

    def cholesky_noise_planes():
        xi0, xi1 = tf.unstack(planes, 2, axis=2)
        l0, l1 = tf.unstack(chol_diag, 2, axis=2)
        c0 = chol_coef[:, :, 0]
        return first(l0 * xi0), first(l1 * xi1 + c0 * xi0)

    def labels_via_logits(jit):
        return tf.function(
            lambda: first(
                dists.argmax_classes(dists.sample_low_rank(loc, factor, diag, n, seed=seed()))
            ),
            jit_compile=jit,
        )

    def labels_direct(jit):
        return tf.function(
            lambda: first(dists.sample_low_rank_labels(loc, factor, diag, n, seed=seed())),
            jit_compile=jit,
        )

    fn = tf.function
    label_maps = {
        "argmax of sample_low_rank": labels_via_logits(False),
        "sample_low_rank_labels": labels_direct(False),
    }
    if not args.no_jit:
        label_maps["argmax of sample_low_rank, XLA"] = labels_via_logits(True)
        label_maps["sample_low_rank_labels, XLA"] = labels_direct(True)
    return {
        f"noise ({size / 1e6:.0f} M values)": {
            "tf.random.stateless_normal": fn(
                lambda: first(tf.random.stateless_normal([size], seed()))
            ),
            "standard_normal (Box-Muller)": fn(
                lambda: first(dists.standard_normal([size], seed=seed()))
            ),
            "stateless_uniform only": fn(
                lambda: first(tf.random.stateless_uniform([size], seed()))
            ),
        },
        f"arg max over {c} classes": {
            "tf.argmax, trailing axis": fn(
                lambda: first(tf.argmax(logits, axis=-1, output_type=tf.int32))
            ),
            "argmax_classes": fn(lambda: first(dists.argmax_classes(logits))),
        },
        "mean softmax": {
            "mean of tf.nn.softmax": fn(
                lambda: first(tf.reduce_mean(tf.nn.softmax(logits, axis=-1), axis=0))
            ),
            "mean_softmax": fn(lambda: first(dists.mean_softmax(logits))),
        },
        f"index select ({n * b * x / 1e6:.0f} M int8)": {
            "tf.where": fn(lambda: first(tf.where(condition, tf.constant(c - 1, tf.int8), index))),
            "raise_index": fn(lambda: first(raise_index(index, condition, c - 1))),
        },
        "Cholesky noise, 2 difference planes": {
            "with tf.math.cumsum": fn(cholesky_noise_cumsum),
            "plane by plane": fn(cholesky_noise_planes),
        },
        f"{n} label maps from head parameters": label_maps,
        f"mean probabilities of {n} samples from head parameters": {
            "mean_softmax of sample_low_rank": fn(
                lambda: first(
                    dists.mean_softmax(dists.sample_low_rank(loc, factor, diag, n, seed=seed()))
                )
            ),
            "low_rank_mean_probabilities": fn(
                lambda: first(dists.low_rank_mean_probabilities(loc, factor, diag, n, seed=seed()))
            ),
        },
    }


def main(argv=None) -> dict:
    args = parse_args(argv)
    groups = _groups(args)
    rows = []
    for group, fns in groups.items():
        timed = {name: (lambda f=f: _common.block(f())) for name, f in fns.items()}
        for call in timed.values():
            call()  # trace (and compile)
        times = _common.interleaved_ms(timed, args.repeats, args.warmup)
        reference = times[next(iter(fns))]
        rows += [
            {"group": group, "variant": name, "ms": ms, "ratio": ms / reference}
            for name, ms in times.items()
        ]
    columns = [
        ("group", "group", ""),
        ("variant", "variant", ""),
        ("ms", "ms", ".1f"),
        ("ratio", "/ first of group", ".2f"),
    ]
    title = (
        f"Sampling ops on CPU: N={args.samples}, batch {args.batch}, {args.size}x{args.size}, "
        f"C={args.num_classes}, R={args.rank}; median of {args.repeats} interleaved calls"
    )
    return _common.publish(args, title, rows, columns)


if __name__ == "__main__":
    main()
