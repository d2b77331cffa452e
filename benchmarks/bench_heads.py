"""Train-step time and peak memory of each head on the built-in U-Net, relative to a
deterministic head, measured side by side on CPU.

For every image size the script builds, on `UNet(base_filters, depth)` (the `tfp-seg train`
default backbone), one model per head and times `model.train_on_batch` on one fixed batch:

```none
deterministic      CategoricalLogits + SegmentationCrossEntropy            (the baseline)
ssn                LowRankLogits(R) + StochasticSegmentationNLL(M)          (default chunking)
ssn_chunked        the same loss with chunk_size=K (memory flat in M)
heteroscedastic    HeteroscedasticLogits + HeteroscedasticNLL(M)
prob_unet          ProbabilisticUNet(latent_dim=6) on the same backbone (its own ELBO step)
```

`--jit` adds each head compiled with `jit_compile=True` (XLA). Times are medians of
interleaved repeats (all models of a size in turn, so load changes hit all alike); memory is
the peak resident memory of one step above the resident memory before it, each model in a
fresh child process (`_common.peak_rss_increase_mib`, median of 3 steps). Ratios are against
the deterministic head of the same size (and the same compilation mode).

Run:
    python benchmarks/bench_heads.py [benchmarks/results/heads.json] [--quick] [--jit]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common  # noqa: E402

HEADS = ("deterministic", "ssn", "ssn_chunked", "heteroscedastic", "prob_unet")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", nargs="?", default="benchmarks/results/heads.json")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--base-filters", type=int, default=16)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--num-classes", type=int, default=3)
    parser.add_argument("--rank", type=int, default=10)
    parser.add_argument("--num-samples", type=int, default=20)
    parser.add_argument("--chunk-size", type=int, default=4, help="K of ssn_chunked")
    parser.add_argument("--heads", nargs="+", default=list(HEADS), choices=HEADS)
    parser.add_argument("--jit", action="store_true", help="also time jit_compile=True models")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="32x32 and 64x64, 3 repeats")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes = [32, 64]
        args.repeats = 3
    return args


def _build(name: str, args, jit: bool):
    import keras

    import tfp_seg

    keras.utils.set_random_seed(0)
    c = args.num_classes
    backbone = tfp_seg.models.UNet(base_filters=args.base_filters, depth=args.depth)
    if name == "prob_unet":
        model = tfp_seg.models.ProbabilisticUNet(c, latent_dim=6, backbone=backbone)
        model.compile(optimizer="adam", jit_compile=jit)
        return model
    if name == "deterministic":
        head = tfp_seg.layers.CategoricalLogits(c)
        loss = tfp_seg.losses.SegmentationCrossEntropy(c)
    elif name in ("ssn", "ssn_chunked"):
        head = tfp_seg.layers.LowRankLogits(c, rank=args.rank)
        chunk = args.chunk_size if name == "ssn_chunked" else None
        loss = tfp_seg.losses.StochasticSegmentationNLL(
            head, num_samples=args.num_samples, chunk_size=chunk
        )
    else:
        head = tfp_seg.layers.HeteroscedasticLogits(c)
        loss = tfp_seg.losses.HeteroscedasticNLL(head, num_samples=args.num_samples)
    model = tfp_seg.models.ProbabilisticSegmenter(backbone, head)
    model.compile(optimizer="adam", loss=loss, jit_compile=jit)
    return model


def _batch(args, size):
    import numpy as np

    rng = np.random.default_rng(size)
    x = rng.normal(size=(args.batch, size, size, 1)).astype("float32")
    y = rng.integers(0, args.num_classes, size=(args.batch, size, size)).astype("int32")
    return x, y


def memory_step(config, size, name, jit):
    """One train step, built in the memory child process (`_common.peak_rss_increase_mib`)."""
    args = argparse.Namespace(**config)
    x, y = _batch(args, size)
    model = _build(name, args, jit)
    return lambda: model.train_on_batch(x, y)


def main(argv=None) -> dict:
    args = parse_args(argv)
    rows = []
    modes = [False, True] if args.jit else [False]
    for size in args.sizes:
        x, y = _batch(args, size)
        memory = {
            (name, jit): _common.peak_rss_increase_mib(
                __file__, "memory_step", dict(config=vars(args), size=size, name=name, jit=jit)
            )
            for jit in modes
            for name in args.heads
        }
        models = {}
        for jit in modes:
            for name in args.heads:
                model = _build(name, args, jit)
                model.train_on_batch(x, y)  # trace (and compile)
                models[(name, jit)] = model
        step = {key: (lambda m=m, x=x, y=y: m.train_on_batch(x, y)) for key, m in models.items()}
        times = _common.interleaved_ms(step, args.repeats, args.warmup)
        for (name, jit), ms in times.items():
            rows.append(
                {
                    "size": size,
                    "head": name + (" (XLA)" if jit else ""),
                    "jit": jit,
                    "step_ms": ms,
                    "peak_mib": memory[(name, jit)],
                    "time_ratio": _ratio(ms, times.get(("deterministic", jit))),
                    "memory_ratio": _ratio(memory[(name, jit)], memory.get(("deterministic", jit))),
                    "vs_no_jit": ms / times[(name, False)] if jit else None,
                }
            )
        del models, step

    columns = [
        ("size", "size", "d"),
        ("head", "head", ""),
        ("step_ms", "step ms", ".0f"),
        ("time_ratio", "time / det", ".2f"),
        ("peak_mib", "peak MiB", ".0f"),
        ("memory_ratio", "memory / det", ".2f"),
    ]
    if args.jit:
        columns.append(("vs_no_jit", "XLA / no XLA", ".2f"))
    title = (
        f"Train step on CPU, batch {args.batch}, UNet(base_filters={args.base_filters}, "
        f"depth={args.depth}), C={args.num_classes}; SSN R={args.rank}, M={args.num_samples} "
        f"(chunked K={args.chunk_size}); heteroscedastic M={args.num_samples}; Prob U-Net "
        f"latent 6; median of {args.repeats} interleaved steps"
    )
    return _common.publish(args, title, rows, columns, memory_source=_common.MEMORY_SOURCE)


def _ratio(value, reference):
    """`value / reference`, or None unless both are positive: the deterministic head not
    measured, or either step making nothing new resident at tiny sizes (a peak of 0 MiB is
    below what peak RSS resolves, so 0 / x is no measured ratio)."""
    return value / reference if value and reference else None


if __name__ == "__main__":
    main()
