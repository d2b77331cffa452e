"""Inference cost of N samples relative to one deterministic forward pass, on CPU.

On `UNet(base_filters, depth)` with each head, times (as `tf.function`s, side by side):

```none
deterministic       argmax(model(x))                                    the reference
<head> label maps   n label maps [n, B, H, W] (model.sample: head.sample_labels, drawn from
                    the C - 1 logit differences for the SSN and heteroscedastic heads)
<head> argmax       argmax of n logit samples (head.sample_logits): the same distribution
<head> proba        mean of softmax over n samples -> [B, H, W, C]
                    (model.predict_proba: head.mean_probabilities, on class planes)
```

for the SSN (`LowRankLogits`), the heteroscedastic head and the Probabilistic U-Net (which
runs the backbone and prior net once and f_comb on the n latents). Label-map samples are
independent (`antithetic=False`, as `model.sample`); the mean probabilities use the head's
default (antithetic pairs for the SSN when N is even, as `model.predict_proba`).
Times are medians of interleaved repeats; ratios are against the deterministic forward pass
of the same batch.

`--user-calls` (issue 21, item 3) times instead what a user calls, side by side for
U-Net(16, 3) and U-Net(8, 2) x 2 and 3 classes (`--configs`), batch 8, 128x128, N = 100:

```none
baseline          one compiled deterministic forward pass (`tf.function`, CategoricalLogits)
sample            model.sample(x, N)          (SSN head LowRankLogits(C, rank=10); numpy out)
predict_proba     model.predict_proba(x, N)
floor sample      compiled forward pass + the noise `sample` draws (z, C - 2 normal planes
                  and one uniform plane [B, N, H*W]), nothing else
floor proba       compiled forward pass + the noise `predict_proba` draws (z, C - 1 normal
                  planes [B, N/2, H*W]: antithetic pairs)
```

with ratios to the baseline of the same configuration.

Run:
    python benchmarks/bench_inference.py [benchmarks/results/inference.json] [--quick]
    python benchmarks/bench_inference.py benchmarks/results/inference_user.json --user-calls
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", nargs="?", default="benchmarks/results/inference.json")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--base-filters", type=int, default=16)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--num-classes", type=int, default=3)
    parser.add_argument("--rank", type=int, default=10)
    parser.add_argument("--samples", type=int, nargs="+", default=[1, 16, 100])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="64x64, batch 2")
    parser.add_argument("--user-calls", action="store_true", help="model.sample / predict_proba")
    parser.add_argument(
        "--configs",
        nargs="+",
        default=["16,3,2", "16,3,3", "8,2,2", "8,2,3"],
        help="--user-calls: base_filters,depth,classes triples",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.batch, args.repeats = 64, 2, 5
    return args


def _models(args):
    import keras

    import tfp_seg

    def unet():
        return tfp_seg.models.UNet(base_filters=args.base_filters, depth=args.depth)

    c = args.num_classes
    built = {}
    for name, head in (
        ("deterministic", tfp_seg.layers.CategoricalLogits(c)),
        ("ssn", tfp_seg.layers.LowRankLogits(c, rank=args.rank)),
        ("heteroscedastic", tfp_seg.layers.HeteroscedasticLogits(c)),
    ):
        keras.utils.set_random_seed(0)
        model = tfp_seg.models.ProbabilisticSegmenter(unet(), head)
        model.build((None, args.size, args.size, 1))
        built[name] = model
    keras.utils.set_random_seed(0)
    prob_unet = tfp_seg.models.ProbabilisticUNet(c, latent_dim=6, backbone=unet())
    prob_unet.build((None, args.size, args.size, 1))
    built["prob_unet"] = prob_unet
    return built


def _user_call_fns(args, config, x):
    """The timed functions of one `base_filters,depth,classes` configuration."""
    import keras
    import tensorflow as tf

    import tfp_seg
    from tfp_seg.distributions import noise

    base_filters, depth, c = (int(v) for v in config.split(","))
    models = {}
    for name, head in (
        ("det", tfp_seg.layers.CategoricalLogits(c)),
        ("ssn", tfp_seg.layers.LowRankLogits(c, rank=args.rank)),
    ):
        keras.utils.set_random_seed(0)
        unet = tfp_seg.models.UNet(base_filters=base_filters, depth=depth)
        models[name] = tfp_seg.models.ProbabilisticSegmenter(unet, head)
        models[name].build((None, *x.shape[1:]))
    det, ssn = models["det"], models["ssn"]
    n, (b, h, w) = args.samples[-1], x.shape[:3]
    r, pixels = args.rank, h * w

    @tf.function
    def forward(v):
        return det(v, training=False)

    @tf.function
    def floor_sample(v, seed):
        z = noise.standard_normal([b, n, r], seed)
        planes = noise.standard_normal([c - 2, b, n, pixels], seed) if c > 2 else None
        u = tf.random.stateless_uniform([b, n, pixels], seed=seed, minval=-1.0, maxval=1.0)
        return det(v, training=False), z, planes, u

    @tf.function
    def floor_proba(v, seed):
        z = noise.standard_normal([b, n // 2, r], seed)
        planes = noise.standard_normal([c - 1, b, n // 2, pixels], seed)
        return det(v, training=False), z, planes

    seed = tf.constant([0, 1], tf.int64)
    xt = tf.constant(x)
    return {
        (config, "baseline: compiled forward"): lambda: _common.block(forward(xt)),
        (config, "model.sample"): lambda: ssn.sample(x, num_samples=n),
        (config, "model.predict_proba"): lambda: ssn.predict_proba(x, num_samples=n),
        (config, "floor sample: forward + noise"): lambda: _common.block(floor_sample(xt, seed)),
        (config, "floor proba: forward + noise"): lambda: _common.block(floor_proba(xt, seed)),
    }


def user_calls(args, x) -> dict:
    fns = {}
    for config in args.configs:
        fns.update(_user_call_fns(args, config, x))
    for fn in fns.values():
        fn()  # trace
    times = _common.interleaved_ms(fns, args.repeats, args.warmup)
    rows = []
    for (config, output), ms in times.items():
        base = times[(config, "baseline: compiled forward")]
        rows.append({"U-Net, C": config, "output": output, "ms": ms, "ratio": ms / base})
    columns = [
        ("U-Net, C", "base_filters,depth,C", ""),
        ("output", "output", ""),
        ("ms", "ms", ".1f"),
        ("ratio", "/ compiled forward", ".2f"),
    ]
    title = (
        f"User calls on CPU, batch {args.batch}, {args.size}x{args.size}, N={args.samples[-1]}, "
        f"SSN R={args.rank}; median of {args.repeats} interleaved calls"
    )
    return _common.publish(args, title, rows, columns)


def main(argv=None) -> dict:
    args = parse_args(argv)
    import numpy as np
    import tensorflow as tf

    import tfp_seg

    x = (
        np.random.default_rng(0)
        .normal(size=(args.batch, args.size, args.size, 1))
        .astype("float32")
    )
    if args.user_calls:
        return user_calls(args, x)
    models = _models(args)
    x = tf.constant(x)

    def wrap(fn):
        compiled = tf.function(fn)
        return lambda: _common.block(compiled(x))

    det = models["deterministic"]
    fns = {("deterministic", "forward", 0): wrap(lambda v: tf.argmax(det(v), axis=-1))}
    for name in ("ssn", "heteroscedastic"):
        model = models[name]
        for n in args.samples:
            fns[(name, "label maps", n)] = wrap(
                lambda v, m=model, n=n: m.head.sample_labels(m(v), n, antithetic=False)
            )
            fns[(name, "argmax of logits", n)] = wrap(
                lambda v, m=model, n=n: tfp_seg.distributions.argmax_classes(
                    m.head.sample_logits(m(v), n, antithetic=False)
                )
            )
            fns[(name, "proba", n)] = wrap(
                lambda v, m=model, n=n: m.head.mean_probabilities(m(v), n)
            )
    pu = models["prob_unet"]
    for n in args.samples:
        fns[("prob_unet", "label maps", n)] = wrap(
            lambda v, n=n: tfp_seg.distributions.argmax_classes(pu.sample_logits_tensor(v, n))
        )
        fns[("prob_unet", "proba", n)] = wrap(
            lambda v, n=n: tfp_seg.distributions.mean_softmax(pu.sample_logits_tensor(v, n))
        )
    for fn in fns.values():
        fn()  # trace
    times = _common.interleaved_ms(fns, args.repeats, args.warmup)
    base = times[("deterministic", "forward", 0)]
    rows = [
        {"model": m, "output": out, "N": n or None, "ms": ms, "ratio": ms / base}
        for (m, out, n), ms in times.items()
    ]
    columns = [
        ("model", "model", ""),
        ("output", "output", ""),
        ("N", "N", "d"),
        ("ms", "ms", ".1f"),
        ("ratio", "/ det forward", ".2f"),
    ]
    title = (
        f"Inference on CPU, batch {args.batch}, {args.size}x{args.size}, UNet(base_filters="
        f"{args.base_filters}, depth={args.depth}), C={args.num_classes}, SSN R={args.rank}; "
        f"median of {args.repeats} interleaved calls"
    )
    return _common.publish(args, title, rows, columns)


if __name__ == "__main__":
    main()
