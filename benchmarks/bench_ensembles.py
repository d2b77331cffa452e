"""Efficient ensembles against a deep ensemble of the same size: parameters, train-step time
and the time to draw one sample per member, side by side on CPU.

On `UNet(base_filters, depth)` (the `tfp-seg train` default backbone) and one head, M members:

```none
single         one ProbabilisticSegmenter (M = 1; for scale)
deep_ensemble  DeepEnsemble of M independently initialised segmenters: a step trains every
               member on the batch (M `train_on_batch` calls), sampling runs M networks
batch          EnsembleSegmenter(UNet(ensemble="batch", ensemble_size=M)): BatchEnsemble, one
               `train_on_batch` on the batch tiled M times inside the network
packed         EnsembleSegmenter(UNet(ensemble="packed", ensemble_size=M, alpha, gamma)):
               Packed-Ensembles, one grouped network (`PackedConv` implementation "auto")
```

Every member sees the whole batch in every variant (as in the papers). Times are medians of
interleaved repeats after warm-up (all variants in turn, so load changes hit all alike);
ratios are against the deep ensemble.

Run:
    python benchmarks/bench_ensembles.py [benchmarks/results/ensembles.json] [--quick]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common  # noqa: E402

VARIANTS = ("single", "deep_ensemble", "batch", "packed")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", nargs="?", default="benchmarks/results/ensembles.json")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--base-filters", type=int, default=16)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--members", type=int, default=4, help="M")
    parser.add_argument("--alpha", type=float, default=2.0, help="packed width factor")
    parser.add_argument("--gamma", type=int, default=1, help="packed subgroups per member")
    parser.add_argument("--num-classes", type=int, default=3)
    parser.add_argument(
        "--head", choices=("deterministic", "ssn"), default="deterministic", help="the head"
    )
    parser.add_argument("--rank", type=int, default=10, help="SSN rank")
    parser.add_argument("--num-samples", type=int, default=20, help="SSN loss samples")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="32x32, 3 repeats")
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.repeats = 32, 3
    return args


def _head_and_loss(args):
    import tfp_seg

    c = args.num_classes
    if args.head == "ssn":
        head = tfp_seg.layers.LowRankLogits(c, rank=args.rank)
        return head, head.default_loss(num_samples=args.num_samples)
    head = tfp_seg.layers.CategoricalLogits(c)
    return head, head.default_loss()


def _build(name: str, args):
    import keras

    import tfp_seg

    keras.utils.set_random_seed(0)
    unet = dict(base_filters=args.base_filters, depth=args.depth)

    def segmenter():
        head, loss = _head_and_loss(args)
        model = tfp_seg.models.ProbabilisticSegmenter(tfp_seg.models.UNet(**unet), head)
        model.compile(optimizer="adam", loss=loss)
        return model

    if name == "single":
        return segmenter()
    if name == "deep_ensemble":
        return tfp_seg.models.DeepEnsemble([segmenter() for _ in range(args.members)])
    extra = dict(alpha=args.alpha, gamma=args.gamma) if name == "packed" else {}
    backbone = tfp_seg.models.UNet(ensemble=name, ensemble_size=args.members, **unet, **extra)
    head, loss = _head_and_loss(args)
    model = tfp_seg.models.EnsembleSegmenter(backbone, head)
    model.compile(optimizer="adam", loss=loss)
    return model


def _members(model):
    return list(getattr(model, "members", [model]))


def _batch(args):
    import numpy as np

    rng = np.random.default_rng(args.size)
    x = rng.normal(size=(args.batch, args.size, args.size, 1)).astype("float32")
    y = rng.integers(0, args.num_classes, size=(args.batch, args.size, args.size)).astype("int32")
    return x, y


def main(argv=None) -> dict:
    args = parse_args(argv)
    x, y = _batch(args)
    m = args.members
    models = {name: _build(name, args) for name in VARIANTS}
    for model in models.values():
        for member in _members(model):
            member.train_on_batch(x, y)  # build and trace

    def step(model):
        return lambda: [member.train_on_batch(x, y) for member in _members(model)]

    def draw(model, n):
        return lambda: model.sample_logits(x, n, seed=0, batch_size=None)

    steps = _common.interleaved_ms(
        {name: step(model) for name, model in models.items()}, args.repeats, args.warmup
    )
    samples = _common.interleaved_ms(
        {name: draw(model, 1 if name == "single" else m) for name, model in models.items()},
        args.repeats,
        args.warmup,
    )
    params = {
        name: int(sum(member.count_params() for member in _members(model)))
        for name, model in models.items()
    }
    rows = []
    for name in VARIANTS:
        rows.append(
            {
                "model": name,
                "members": 1 if name == "single" else m,
                "params": params[name],
                "params_ratio": params[name] / params["deep_ensemble"],
                "step_ms": steps[name],
                "step_ratio": steps[name] / steps["deep_ensemble"],
                "sample_ms": samples[name],
                "sample_ratio": samples[name] / samples["deep_ensemble"],
            }
        )
    columns = [
        ("model", "model", ""),
        ("members", "M", "d"),
        ("params", "parameters", ",d"),
        ("params_ratio", "params / deep", ".3f"),
        ("step_ms", "train step ms", ".0f"),
        ("step_ratio", "step / deep", ".2f"),
        ("sample_ms", "M samples ms", ".0f"),
        ("sample_ratio", "samples / deep", ".2f"),
    ]
    title = (
        f"Efficient ensembles on CPU, {args.size}x{args.size}, batch {args.batch}, "
        f"UNet(base_filters={args.base_filters}, depth={args.depth}), M={m}, "
        f"{args.head} head, C={args.num_classes}; packed alpha={args.alpha:g}, "
        f"gamma={args.gamma}; median of {args.repeats} interleaved repeats after "
        f"{args.warmup} warm-up"
    )
    return _common.publish(args, title, rows, columns)


if __name__ == "__main__":
    main()
