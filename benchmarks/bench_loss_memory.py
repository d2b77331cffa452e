"""SSN loss alone, forward + backward: time and peak memory as M (samples) and R (rank) grow.

The loss `StochasticSegmentationNLL` (joint + marginal term) of a `LowRankLogits` head is
differentiated with respect to fixed parameters `[B, H, W, C*(2+R)]` inside a `tf.function`,
in three forms measured side by side:

```none
materialised  all M samples drawn through head.sample_logits ([M, B, H, W, C]) and scored by
              the public mc_categorical_nll + mc_marginal_nll (what any head gets)
fused         StochasticSegmentationNLL(chunk_size=None): the fused class-planar path
chunked K=k   StochasticSegmentationNLL(chunk_size=k): k samples at a time, recomputed in
              the backward pass (memory flat in M); one row per --chunk-sizes entry
auto          StochasticSegmentationNLL() (chunk_size="auto", the default): the chunk size
              tfp_seg.losses.chunked.auto_chunk_size picks from M and the image size
```

`--head heteroscedastic` measures `HeteroscedasticNLL` of a `HeteroscedasticLogits` head instead
(M sweep only): `direct` (chunk_size=None: `head.sample_logits` + `mc_marginal_nll`) against
`chunked K=k`.

The M sweep uses independent samples (`antithetic=False`, so that M = 1 is allowed); the R
sweep uses the head's default antithetic pairs. Times are medians of interleaved repeats;
memory is the peak resident memory of one call above the resident memory before it, each
variant in a fresh child process (`_common.peak_rss_increase_mib`, median of 3 calls).

Run:
    python benchmarks/bench_loss_memory.py [benchmarks/results/loss_memory.json] [--quick]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", nargs="?", default="benchmarks/results/loss_memory.json")
    parser.add_argument("--size", type=int, default=128, help="H = W (default 128)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--num-classes", type=int, default=3)
    parser.add_argument("--rank", type=int, default=10, help="R of the M sweep")
    parser.add_argument("--samples", type=int, nargs="+", default=[1, 10, 20, 50, 100])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 5, 10, 20, 50])
    parser.add_argument("--rank-samples", type=int, default=20, help="M of the R sweep")
    parser.add_argument(
        "--chunk-sizes", type=int, nargs="+", default=[2, 10], help="K of the chunked forms"
    )
    parser.add_argument("--head", choices=("low_rank", "heteroscedastic"), default="low_rank")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="64x64, M up to 50, R up to 20")
    args = parser.parse_args(argv)
    if args.quick:
        args.size = 64
        args.samples = [1, 10, 20, 50]
        args.ranks = [1, 10, 20]
        args.repeats = 3
    return args


def _variants(head, labels, params, num_samples, chunk_sizes, antithetic):
    import tensorflow as tf

    from tfp_seg import layers, losses

    heteroscedastic = isinstance(head, layers.HeteroscedasticLogits)

    def grad_fn(loss_fn):
        @tf.function
        def step(p):
            with tf.GradientTape() as tape:
                tape.watch(p)
                value = loss_fn(p)
            return value, tape.gradient(value, p)

        return lambda: _common.block(step(params))

    def materialised(p):
        samples = head.sample_logits(p, num_samples, antithetic=antithetic)
        nll = losses.mc_categorical_nll(labels, samples) + losses.mc_marginal_nll(labels, samples)
        return tf.reduce_mean(nll) / float(labels.shape[1] * labels.shape[2])

    variants = {} if heteroscedastic else {"materialised": grad_fn(materialised)}
    loss_class = losses.HeteroscedasticNLL if heteroscedastic else losses.StochasticSegmentationNLL
    for chunk in [None] + list(chunk_sizes):
        if chunk is not None and (
            num_samples % chunk or num_samples <= chunk or (antithetic and chunk % 2)
        ):
            continue  # not a valid chunking of M (or one chunk: the fused form)
        loss = loss_class(head, num_samples, antithetic=antithetic, chunk_size=chunk)
        name = _reference(heteroscedastic) if chunk is None else f"chunked K={chunk}"
        variants[name] = grad_fn(lambda p, loss=loss: loss(labels, p))
    if not heteroscedastic:  # the loss's default: chunks chosen from the problem size
        loss = loss_class(head, num_samples, antithetic=antithetic)
        variants["auto (default)"] = grad_fn(lambda p, loss=loss: loss(labels, p))
    return variants


def _reference(heteroscedastic: bool) -> str:
    return "direct" if heteroscedastic else "fused"


def _setup(args, rank, num_samples, antithetic):
    """The variants of one configuration, as functions of no argument."""
    import numpy as np
    import tensorflow as tf

    import tfp_seg

    rng = np.random.default_rng(0)
    if args.head == "heteroscedastic":
        head = tfp_seg.layers.HeteroscedasticLogits(args.num_classes)
    else:
        head = tfp_seg.layers.LowRankLogits(args.num_classes, rank=rank)
    shape = (args.batch, args.size, args.size)
    params = tf.constant(0.3 * rng.normal(size=shape + (head.params_size,)).astype("float32"))
    labels = tf.constant(rng.integers(0, args.num_classes, size=shape).astype("int32"))
    return _variants(head, labels, params, num_samples, args.chunk_sizes, antithetic)


def memory_step(config, rank, num_samples, antithetic, variant):
    """One variant, built in the memory child process (`_common.peak_rss_increase_mib`)."""
    return _setup(argparse.Namespace(**config), rank, num_samples, antithetic)[variant]


def _measure(args, rank, num_samples, antithetic):
    fns = _setup(args, rank, num_samples, antithetic)
    config = dict(rank=rank, num_samples=num_samples, antithetic=antithetic)
    memory = {
        name: _common.peak_rss_increase_mib(
            __file__, "memory_step", dict(config=vars(args), variant=name, **config)
        )
        for name in fns
    }
    for fn in fns.values():
        fn()  # trace
    times = _common.interleaved_ms(fns, args.repeats, args.warmup)
    return [
        {
            "variant": name,
            "M": num_samples,
            "R": None if args.head == "heteroscedastic" else rank,
            "ms": times[name],
            "peak_mib": memory[name],
        }
        for name in fns
    ]


def main(argv=None) -> dict:
    args = parse_args(argv)
    import tensorflow as tf

    rows_m, rows_r = [], []
    for m in args.samples:
        rows_m += _measure(args, args.rank, m, antithetic=False)
    heteroscedastic = args.head == "heteroscedastic"
    for r in [] if heteroscedastic else args.ranks:
        rows_r += _measure(args, r, args.rank_samples, antithetic=True)
    reference = _reference(heteroscedastic)
    _add_ratios(rows_m, "M", 10 if 10 in args.samples else args.samples[0], reference)
    if rows_r:
        _add_ratios(rows_r, "R", args.ranks[0], reference)

    columns = [
        ("variant", "variant", ""),
        ("M", "M", "d"),
        ("R", "R", "d"),
        ("ms", "fwd+bwd ms", ".1f"),
        ("ms_vs_fused", f"time / {reference}", ".2f"),
        ("peak_mib", "peak MiB", ".1f"),
        ("peak_vs_base", "peak / base", ".2f"),
    ]
    loss_name = "HeteroscedasticNLL" if heteroscedastic else "SSN loss"
    title = (
        f"{loss_name} forward+backward on CPU, B={args.batch}, {args.size}x{args.size}, "
        f"C={args.num_classes}; median of {args.repeats} interleaved repeats"
    )
    print(f"\n{title}")
    rank_text = "" if heteroscedastic else f"R={args.rank}, "
    print(f"M sweep ({rank_text}independent samples; peak base: the same loss at M=10)")
    print(_common.markdown_table(rows_m, columns))
    if rows_r:
        r_base = args.ranks[0]
        print(
            f"\nR sweep (M={args.rank_samples}, antithetic; peak base: the same loss at R={r_base})"
        )
        print(_common.markdown_table(rows_r, columns))
    report = {
        "title": title,
        "config": vars(args),
        "environment": _common.environment(),
        "memory_source": _common.MEMORY_SOURCE,
        "tensorflow_threads": tf.config.threading.get_intra_op_parallelism_threads(),
        "m_sweep": rows_m,
        "r_sweep": rows_r,
    }
    _common.write_report(args.out, report)
    return report


def _add_ratios(rows, key, base, reference_variant="fused"):
    """Time against the reference (fused / direct) form of the same M / R; peak against the
    same loss at the base M / R (a chunked loss with K >= M runs the reference form there)."""
    fused = {(r[key]): r["ms"] for r in rows if r["variant"] == reference_variant}
    base_peak = {r["variant"]: r["peak_mib"] for r in rows if r[key] == base}
    for r in rows:
        r["ms_vs_fused"] = r["ms"] / fused[r[key]] if r[key] in fused else None
        reference = base_peak.get(r["variant"], base_peak.get(reference_variant))
        if reference:
            r["peak_vs_base"] = r["peak_mib"] / reference


if __name__ == "__main__":
    main()
