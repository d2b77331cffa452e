"""Peak memory of `tfp_seg.evaluation.evaluate_annotations` as the number of images grows.

`evaluate_annotations` streams: one `sample_logits` call per batch of `--batch` images, every
metric kept as running sums, the batch's samples `[N, batch, H, W, C]` dropped before the next.
So its peak memory should be that of one batch (for N = 100, batch 16, 128 x 128, C = 2 the
logits alone are 100 * 16 * 128 * 128 * 2 * 4 B = 200 MiB) and flat in the number of images.
This script measures it: one fresh child process per number of images
(`_common.peak_rss_increase_mib`), the peak resident memory of one call above the resident
memory before it.

The model is a cheap fake sampler (the memory figure is the evaluation's, not a network's): it
returns float32 logits of the right shape `[N, b, H, W, C]`, each sample a random pick from a
fixed pool of random logit maps (fresh memory every call, like a model's output). The raters'
annotations are jittered discs (K raters per image, some empty). `--source arrays` (default)
builds the images and annotations before the call (then not counted: they are the input);
`--source stream` passes a generator of batches made on the fly, so the data set never exists
in memory and its batches are counted. Before returning the measured function the child runs
the evaluation once on 2 images (TensorFlow's runtime start and first-call setup), so one
measured call (`--repeats 1 --warmup 0`, the default: a call over 2,000 images takes minutes)
is the steady state.

Run:
    python benchmarks/bench_evaluation_memory.py [benchmarks/results/evaluation_memory.json]
        [--images 500 1000 2000] [--samples 100] [--batch 16] [--size 128] [--source stream]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", nargs="?", default="benchmarks/results/evaluation_memory.json")
    parser.add_argument("--images", type=int, nargs="+", default=[500, 1000, 2000])
    parser.add_argument("--size", type=int, default=128, help="H = W (default 128)")
    parser.add_argument("--samples", type=int, default=100, help="N drawn per image")
    parser.add_argument("--batch", type=int, default=16, help="evaluation batch size")
    parser.add_argument("--num-classes", type=int, default=2)
    parser.add_argument("--raters", type=int, default=4, help="K annotations per image")
    parser.add_argument("--source", choices=("arrays", "stream"), default="arrays")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=0)
    return parser.parse_args(argv)


class RandomLogits:
    """Fake sampler: `[N, b, H, W, C]` float32 logits, each sample a random map of a pool."""

    def __init__(self, size, num_classes, pool=64, seed=0):
        import numpy as np

        self.rng = np.random.default_rng(seed)
        self.pool = self.rng.normal(size=(pool, size, size, num_classes)).astype(np.float32)

    def sample_logits(self, x, num_samples, seed=None, batch_size=None):
        pick = self.rng.integers(0, len(self.pool), size=(num_samples, len(x)))
        return self.pool[pick]


def annotated_batch(rng, num_images, size, raters, num_classes):
    """`(images [b, H, W, 1] float32, annotations [b, K, H, W] uint8)`: jittered discs."""
    import numpy as np

    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    images = rng.uniform(size=(num_images, size, size, 1)).astype(np.float32)
    annotations = np.zeros((num_images, raters, size, size), np.uint8)
    for i in range(num_images):
        centre = rng.uniform(0.3 * size, 0.7 * size, size=2)
        radius = rng.uniform(0.05 * size, 0.2 * size)
        cls = rng.integers(1, num_classes)
        for k in range(raters):
            if rng.random() < 0.2:
                continue
            cy, cx = centre + rng.normal(scale=0.02 * size, size=2)
            r = radius * rng.uniform(0.8, 1.2)
            annotations[i, k][(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = cls
    return images, annotations


def make_evaluation(
    num_images, size, num_samples, batch_size, num_classes, raters, source, timing_path=None
):
    """The measured call (a `peak_rss_increase_mib` factory): `evaluate_annotations` of
    `num_images` images with the fake sampler; its wall time is appended to `timing_path`."""
    import numpy as np

    from tfp_seg.evaluation import evaluate_annotations

    model = RandomLogits(size, num_classes)
    kwargs = dict(num_samples=16, sample_counts=(16, num_samples), batch_size=batch_size)
    rng = np.random.default_rng(1)
    evaluate_annotations(model, *annotated_batch(rng, 2, size, raters, num_classes), **kwargs)
    if source == "arrays":
        images, annotations = annotated_batch(rng, num_images, size, raters, num_classes)

    def data():
        if source == "arrays":
            return (images, annotations)
        stream_rng = np.random.default_rng(2)
        sizes = [batch_size] * (num_images // batch_size) + [num_images % batch_size]
        return (
            (annotated_batch(stream_rng, b, size, raters, num_classes) for b in sizes if b),
            None,
        )

    def run():
        start = time.perf_counter()
        report = evaluate_annotations(model, *data(), **kwargs)
        seconds = time.perf_counter() - start
        assert report["num_images"] == num_images
        if timing_path:
            with open(timing_path, "a") as f:
                f.write(json.dumps({"seconds": seconds, "ged_100": report.get("ged_100")}) + "\n")

    return run


def main(argv=None) -> dict:
    args = parse_args(argv)
    out_dir = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(out_dir, exist_ok=True)
    logits_mib = args.samples * args.batch * args.size**2 * args.num_classes * 4 / _common.MIB
    rows = []
    for num_images in args.images:
        timing_path = os.path.join(out_dir, f".evaluation_memory_{os.getpid()}_{num_images}")
        if os.path.exists(timing_path):
            os.remove(timing_path)
        kwargs = dict(
            num_images=num_images,
            size=args.size,
            num_samples=args.samples,
            batch_size=args.batch,
            num_classes=args.num_classes,
            raters=args.raters,
            source=args.source,
            timing_path=timing_path,
        )
        peak = _common.peak_rss_increase_mib(
            __file__, "make_evaluation", kwargs, repeats=args.repeats, warmup=args.warmup
        )
        with open(timing_path) as f:
            seconds = [json.loads(line)["seconds"] for line in f]
        os.remove(timing_path)
        rows.append(
            {
                "images": num_images,
                "peak_mib": peak,
                "peak_vs_batch_logits": peak / logits_mib,
                "seconds": seconds[-1],
                "ms_per_image": 1000.0 * seconds[-1] / num_images,
            }
        )
        print(f"{num_images} images: peak {peak:.0f} MiB, {seconds[-1]:.0f} s", flush=True)
    first = rows[0]["peak_mib"]
    for row in rows:
        row["peak_vs_first"] = row["peak_mib"] / first if first > 0 else None
    columns = [
        ("images", "images", "d"),
        ("peak_mib", "peak MiB", ".0f"),
        ("peak_vs_first", f"peak / {rows[0]['images']} images", ".2f"),
        ("peak_vs_batch_logits", "peak / one batch's logits", ".2f"),
        ("seconds", "call s", ".0f"),
        ("ms_per_image", "ms / image", ".0f"),
    ]
    title = (
        f"evaluate_annotations peak memory: N={args.samples} samples (ged/hm_iou at 16 and "
        f"{args.samples}), batch {args.batch}, {args.size}x{args.size}, C={args.num_classes}, "
        f"K={args.raters} raters, source={args.source}, fake sampler; one batch's logits = "
        f"{logits_mib:.0f} MiB"
    )
    return _common.publish(
        args, title, rows, columns, memory_source=_common.MEMORY_SOURCE, batch_logits_mib=logits_mib
    )


if __name__ == "__main__":
    main()
