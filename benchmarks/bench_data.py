"""Generation time of the built-in benchmark data, `tfp_seg.data.ambiguous_shapes`.

Generation runs before every training job and every evaluation of a run (the data are
regenerated from the run's seed, never stored), so it should stay a small fraction of them.
Times the generator at a few sizes (median of repeats, after one warm-up call), and the
per-image cost.

Run:
    python benchmarks/bench_data.py [benchmarks/results/data.json] [--quick]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", nargs="?", default="benchmarks/results/data.json")
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--num-images", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="one small size, one repeat")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.num_images, args.repeats, args.warmup = [32], 32, 1, 0
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    from tfp_seg.data import ambiguous_shapes

    rows = []
    for size in args.sizes:
        fns = {size: lambda s=size: ambiguous_shapes(num_images=args.num_images, image_size=s)}
        ms = _common.interleaved_ms(fns, args.repeats, args.warmup)[size]
        rows.append(
            {
                "size": f"{size}x{size}",
                "images": args.num_images,
                "ms": ms,
                "ms_per_image": ms / args.num_images,
            }
        )
    columns = [
        ("size", "size", ""),
        ("images", "images", "d"),
        ("ms", "ms", ".0f"),
        ("ms_per_image", "ms / image", ".3f"),
    ]
    title = (
        f"ambiguous_shapes generation on CPU: {args.num_images} images, median of "
        f"{args.repeats} calls"
    )
    return _common.publish(args, title, rows, columns)


if __name__ == "__main__":
    main()
