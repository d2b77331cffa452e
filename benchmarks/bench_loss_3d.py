"""3D SSN loss (volumes), forward + backward: time against cross-entropy, peak memory by path.

The loss `StochasticSegmentationNLL` (joint + marginal term, the library's defaults:
antithetic pairs, `marginal_weight=1`) of a `LowRankLogits(spatial_dims=3)` head is
differentiated with respect to fixed parameters `[B, D, H, W, C (2 + R)]` inside a
`tf.function` (default: a [2, 64, 64, 64] patch, C = 4, R = 10, M = 20, the setting of the
official SSN on BraTS), in these forms:

```none
deterministic   SegmentationCrossEntropy on the mean logits [B, D, H, W, C] (the same values
                as the SSN params' first C channels): the baseline, gradient w.r.t. them
direct          StochasticSegmentationNLL(chunk_size=None): all M samples at once (fused)
chunked K=k     StochasticSegmentationNLL(chunk_size=k): k samples at a time, recomputed in
                the backward pass (memory flat in M)
```

plus the chunked form at each M of `--sweep-samples` (10 and 100): its peak memory at the
largest M over that at the smallest is the flatness target (<= 1.2). Times are medians of
interleaved repeats in this process; memory is the peak resident memory of one call above
the resident memory before it, one fresh child process per row
(`_common.peak_rss_increase_mib`, median of 3 calls).

Run:
    python benchmarks/bench_loss_3d.py [benchmarks/results/loss_3d.json] [--quick]
    python benchmarks/bench_loss_3d.py --size 32 --batch 1     # smaller patches
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common  # noqa: E402

TARGET_RATIO = 1.2  # chunked peak at the largest M over that at the smallest (issue 17)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", nargs="?", default="benchmarks/results/loss_3d.json")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, default=64, help="D = H = W (default 64)")
    parser.add_argument("--num-classes", type=int, default=4)
    parser.add_argument("--rank", type=int, default=10)
    parser.add_argument("--samples", type=int, default=20, help="M of the time comparison")
    parser.add_argument("--chunk-size", type=int, default=2, help="K of the chunked form")
    parser.add_argument(
        "--sweep-samples", type=int, nargs="+", default=[10, 100], help="M of the chunked sweep"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="[1, 16, 16, 16], M sweep 10 / 20")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.size, args.sweep_samples, args.repeats = 1, 16, [10, 20], 2
    for name in ("batch", "size", "num_classes", "rank", "samples", "chunk_size", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1; got {getattr(args, name)}")
    for m in [args.samples] + args.sweep_samples:
        if m % args.chunk_size or m % 2 or args.chunk_size % 2:
            parser.error(
                f"every M (--samples, --sweep-samples) must be even and a multiple of "
                f"--chunk-size, which must be even (antithetic pairs); got M={m}, "
                f"K={args.chunk_size}"
            )
    return args


def _variants(args):
    """`{name: (M, K, fn)}`: the measured forms, each a function of no argument."""
    import numpy as np
    import tensorflow as tf

    import tfp_seg

    c = args.num_classes
    head = tfp_seg.layers.LowRankLogits(c, rank=args.rank, spatial_dims=3)
    rng = np.random.default_rng(0)
    shape = (args.batch,) + (args.size,) * 3
    params = tf.constant(0.3 * rng.normal(size=shape + (head.params_size,)).astype("float32"))
    labels = tf.constant(rng.integers(0, c, size=shape).astype("int32"))
    logits = tf.constant(params[..., :c])

    def ssn(m, k):
        loss = tfp_seg.losses.StochasticSegmentationNLL(head, num_samples=m, chunk_size=k)
        return _common.loss_gradient_fn(loss, labels, params)

    cross_entropy = tfp_seg.losses.SegmentationCrossEntropy(c)

    k = args.chunk_size
    variants = {
        "deterministic": (None, None, _common.loss_gradient_fn(cross_entropy, labels, logits)),
        "direct": (args.samples, None, ssn(args.samples, None)),
    }
    for m in [args.samples] + [m for m in args.sweep_samples if m != args.samples]:
        if m > k:  # K >= M is one chunk: the direct form
            variants[f"chunked K={k}, M={m}"] = (m, k, ssn(m, k))
    return variants


def memory_step(config, variant):
    """One variant, built in the memory child process (`_common.peak_rss_increase_mib`)."""
    return _variants(argparse.Namespace(**config))[variant][2]


def main(argv=None) -> dict:
    args = parse_args(argv)
    variants = _variants(args)
    memory = {
        name: _common.peak_rss_increase_mib(
            __file__, "memory_step", dict(config=vars(args), variant=name)
        )
        for name in variants
    }
    fns = {name: fn for name, (_, _, fn) in variants.items()}
    for fn in fns.values():
        fn()  # trace
    times = _common.interleaved_ms(fns, args.repeats, args.warmup)
    det_ms, det_mib = times["deterministic"], memory["deterministic"]
    rows = []
    for name, (m, k, _) in variants.items():
        rows.append(
            {
                "variant": name,
                "M": m,
                "K": k,
                "ms": times[name],
                "ms_vs_deterministic": times[name] / det_ms,
                "peak_mib": memory[name],
                "peak_vs_deterministic": memory[name] / det_mib if det_mib else None,
            }
        )
    sweep = [r for r in rows if r["K"] is not None and r["M"] in args.sweep_samples]
    flat = None
    if len(sweep) >= 2 and sweep[0]["peak_mib"]:
        low, high = min(sweep, key=lambda r: r["M"]), max(sweep, key=lambda r: r["M"])
        flat = {
            "M_low": low["M"],
            "M_high": high["M"],
            "ratio": high["peak_mib"] / low["peak_mib"],
            "target": TARGET_RATIO,
        }
        flat["met"] = flat["ratio"] <= TARGET_RATIO
    columns = [
        ("variant", "variant", ""),
        ("M", "M", "d"),
        ("K", "K", "d"),
        ("ms", "fwd+bwd ms", ".0f"),
        ("ms_vs_deterministic", "time / deterministic", ".2f"),
        ("peak_mib", "peak MiB", ".0f"),
        ("peak_vs_deterministic", "peak / deterministic", ".2f"),
    ]
    s = args.size
    title = (
        f"3D SSN loss forward + backward on CPU, [{args.batch}, {s}, {s}, {s}], "
        f"C={args.num_classes}, R={args.rank}; median of {args.repeats} interleaved repeats"
    )
    report = _common.publish(
        args, title, rows, columns, memory_source=_common.MEMORY_SOURCE, chunked_flatness=flat
    )
    if flat:
        verdict = "met" if flat["met"] else "MISSED"
        print(
            f"chunked (K={args.chunk_size}) peak at M={flat['M_high']} / M={flat['M_low']}: "
            f"{flat['ratio']:.2f} (target <= {TARGET_RATIO}: {verdict})"
        )
    return report


if __name__ == "__main__":
    main()
