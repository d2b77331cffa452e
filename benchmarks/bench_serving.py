"""Serving latency on CPU: Keras vs the exported SavedModel vs onnxruntime, in one run.

Builds an SSN (U-Net + `LowRankLogits`; weights untrained, which does not change latency),
exports it with `tfp_seg.export.saved_model` and `tfp_seg.export.onnx`, and times

```none
serving_default B=1     mean probabilities over 16 samples + label map, one image
serving_default B=8     the same for a batch of 8
sample N=100 B=1        100 sampled label maps of one image
```

Keras is the library's Python API (`model.predict_proba`, `model.sample`), the SavedModel is
called through its signatures (`loaded.signatures[...]`, what TF Serving runs), onnxruntime
runs the ONNX graph (a second graph with N = 100 for the sampling case, since N is fixed in
ONNX). Each number is the median of `--repeats` calls after `--warmup` calls. The ratios
(`keras / x`, > 1 means faster than Keras) are the result; absolute times depend on the
machine and its load.

Run:
    python benchmarks/bench_serving.py [benchmarks/results/serving.json] --size 64 --repeats 20
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common  # noqa: E402
import numpy as np


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "out",
        nargs="?",
        default="benchmarks/results/serving.json",
        help="JSON results path (default benchmarks/results/serving.json)",
    )
    parser.add_argument("--size", type=int, default=64, help="image size H = W (default 64)")
    parser.add_argument("--base-filters", type=int, default=16)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--rank", type=int, default=10)
    parser.add_argument("--num-classes", type=int, default=3)
    parser.add_argument("--num-samples", type=int, default=16, help="serving_default samples")
    parser.add_argument("--many-samples", type=int, default=100, help="the sampling case's N")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    return parser.parse_args(argv)


def _median_ms(fn, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000.0 * statistics.median(times)


def main(argv=None) -> dict:
    args = parse_args(argv)
    import keras
    import onnxruntime
    import tensorflow as tf

    import tfp_seg
    from tfp_seg import export

    keras.utils.set_random_seed(0)
    model = tfp_seg.models.ProbabilisticSegmenter(
        tfp_seg.models.UNet(base_filters=args.base_filters, depth=args.depth),
        tfp_seg.layers.LowRankLogits(args.num_classes, rank=args.rank),
    )
    model.build((None, args.size, args.size, 1))
    rng = np.random.default_rng(0)
    x1 = rng.normal(size=(1, args.size, args.size, 1)).astype("float32")
    x8 = rng.normal(size=(8, args.size, args.size, 1)).astype("float32")

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        version_dir = export.saved_model(
            model, os.path.join(tmp, "ssn", "1"), num_samples=args.num_samples
        )
        export_s = time.perf_counter() - start
        start = time.perf_counter()
        onnx_default = export.onnx(model, os.path.join(tmp, "d.onnx"), args.num_samples)
        onnx_many = export.onnx(model, os.path.join(tmp, "m.onnx"), args.many_samples)
        onnx_s = time.perf_counter() - start
        loaded = tf.saved_model.load(version_dir)
        providers = ["CPUExecutionProvider"]
        sess_default = onnxruntime.InferenceSession(onnx_default, providers=providers)
        sess_many = onnxruntime.InferenceSession(onnx_many, providers=providers)

        serving_default = loaded.signatures["serving_default"]
        sample = loaded.signatures["sample"]
        n, many = args.num_samples, args.many_samples
        t_x1, t_x8 = tf.constant(x1), tf.constant(x8)
        cases = {
            "serving_default B=1": {
                "keras": lambda: model.predict_proba(x1, num_samples=n),
                "savedmodel": lambda: serving_default(
                    images=t_x1, num_samples=tf.constant(n), seed=tf.constant([], tf.int64)
                ),
                "onnxruntime": lambda: sess_default.run(
                    ["probabilities", "labels"], {"images": x1}
                ),
            },
            "serving_default B=8": {
                "keras": lambda: model.predict_proba(x8, num_samples=n),
                "savedmodel": lambda: serving_default(
                    images=t_x8, num_samples=tf.constant(n), seed=tf.constant([], tf.int64)
                ),
                "onnxruntime": lambda: sess_default.run(
                    ["probabilities", "labels"], {"images": x8}
                ),
            },
            f"sample N={many} B=1": {
                "keras": lambda: model.sample(x1, num_samples=many),
                "savedmodel": lambda: sample(
                    images=t_x1, num_samples=tf.constant(many), seed=tf.constant([], tf.int64)
                )["labels"],
                "onnxruntime": lambda: sess_many.run(["label_samples"], {"images": x1}),
            },
        }
        results = []
        for case, fns in cases.items():
            row = {"case": case}
            for runtime, fn in fns.items():
                row[f"{runtime}_ms"] = _median_ms(fn, args.repeats, args.warmup)
            row["savedmodel_speedup"] = row["keras_ms"] / row["savedmodel_ms"]
            row["onnxruntime_speedup"] = row["keras_ms"] / row["onnxruntime_ms"]
            results.append(row)

    print(
        f"\nCPU serving latency, {args.size}x{args.size} images, U-Net(base_filters="
        f"{args.base_filters}, depth={args.depth}) + LowRankLogits(C={args.num_classes}, "
        f"rank={args.rank}); median of {args.repeats} calls"
    )
    header = (
        f"{'case':<22} | {'keras ms':>9} | {'SavedModel ms':>13} | {'ORT ms':>8} | "
        f"{'keras/SM':>8} | {'keras/ORT':>9}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        print(
            f"{r['case']:<22} | {r['keras_ms']:9.2f} | {r['savedmodel_ms']:13.2f} | "
            f"{r['onnxruntime_ms']:8.2f} | {r['savedmodel_speedup']:8.2f} | "
            f"{r['onnxruntime_speedup']:9.2f}"
        )
    print(f"(export: SavedModel {export_s:.1f} s, two ONNX graphs {onnx_s:.1f} s)")

    report = {
        "config": vars(args),
        "environment": {**_common.environment(), "onnxruntime": onnxruntime.__version__},
        "export_seconds": {"saved_model": export_s, "onnx_two_graphs": onnx_s},
        "results": results,
    }
    _common.write_report(args.out, report)
    return report


if __name__ == "__main__":
    main()
