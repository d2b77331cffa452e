"""Backbone x head cost on CPU: parameters and train-step time relative to the built-in U-Net.

Builds every backbone of `tfp_seg.models.build_backbone` from config (nothing is downloaded)
with each head

```none
deterministic     CategoricalLogits(C)
heteroscedastic   HeteroscedasticLogits(C)                (loss: 20 MC samples per pixel)
ssn               LowRankLogits(C, rank=10)                (loss: 20 antithetic samples)
```

on single-channel `size x size` images, batch `--batch`, and times one optimizer step
(`model.train_on_batch`) side by side: after a warm-up, `--rounds` rounds visit every model in
turn and time `--steps` steps each; a model's step time is the median over rounds. The result
is the ratio to the U-Net (`tfp_seg.models.UNet(16, depth=3)`, the CLI default) with the same
head, and absolute times, which depend on the machine and its load.

A second table compares the two resolution strategies of `tfp_seg.models.backbones` for the
adapters that upsample (ResNet-FPN and SegFormer, SSN head): upsampling the *features* before
the head (what the library does) versus predicting the parameters at stride 4 and upsampling
the *parameters* (the same distribution for 1x1 heads).

Run:
    python benchmarks/bench_backbones.py [benchmarks/results/backbones.json] --size 64 --batch 2
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common  # noqa: E402
import numpy as np  # noqa: E402

DEFAULT_BACKBONES = (
    "unet",
    "resnet_fpn",
    "deeplabv3plus_resnet",
    "deeplabv3_mobilenetv3",
    "segformer_mit_b0",
)
HEADS = ("deterministic", "heteroscedastic", "ssn")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "out",
        nargs="?",
        default="benchmarks/results/backbones.json",
        help="JSON results path (default benchmarks/results/backbones.json)",
    )
    parser.add_argument("--size", type=int, default=64, help="image size H = W (default 64)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--num-classes", type=int, default=3)
    parser.add_argument("--rank", type=int, default=10)
    parser.add_argument(
        "--backbones",
        default=",".join(DEFAULT_BACKBONES),
        help="comma-separated names (tfp_seg.models.BACKBONE_NAMES)",
    )
    parser.add_argument("--heads", default=",".join(HEADS))
    parser.add_argument("--size-config", default="small", choices=("small", "full"))
    parser.add_argument("--steps", type=int, default=5, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--jit",
        default="auto",
        choices=("auto", "on", "off"),
        help="jit_compile of model.compile (default: Keras' auto)",
    )
    parser.add_argument(
        "--no-strategy",
        action="store_true",
        help="skip the feature- vs parameter-upsampling comparison",
    )
    return parser.parse_args(argv)


def _head(name: str, num_classes: int, rank: int):
    from tfp_seg import layers

    if name == "deterministic":
        return layers.CategoricalLogits(num_classes)
    if name == "heteroscedastic":
        return layers.HeteroscedasticLogits(num_classes)
    if name == "ssn":
        return layers.LowRankLogits(num_classes, rank=rank)
    raise ValueError(f"unknown head {name!r}; one of {HEADS}")


def _params_upsampled_class():
    """A segmenter that predicts parameters at feature resolution and resizes them."""
    from tfp_seg.models import ProbabilisticSegmenter
    from tfp_seg.models.backbones import ResizeToReference

    class ParamsUpsampledSegmenter(ProbabilisticSegmenter):
        def __init__(self, backbone, head, **kwargs):
            super().__init__(backbone, head, **kwargs)
            self.resize = ResizeToReference("bilinear")

        def call(self, inputs, training=None):
            params = self.head(self.backbone(inputs, training=training))
            return self.resize([params, inputs])

    return ParamsUpsampledSegmenter


def build_models(args):
    from tfp_seg import models

    shape = (args.size, args.size, 1)
    jit = {"auto": "auto", "on": True, "off": False}[args.jit]
    entries = []
    for backbone_name in args.backbones.split(","):
        for head_name in args.heads.split(","):
            backbone = models.build_backbone(
                backbone_name, input_shape=shape, size=args.size_config
            )
            model = models.ProbabilisticSegmenter(
                backbone, _head(head_name, args.num_classes, args.rank)
            )
            entries.append(
                {
                    "backbone": backbone_name,
                    "head": head_name,
                    "strategy": "features",
                    "model": model,
                }
            )
    if not args.no_strategy:
        params_cls = _params_upsampled_class()
        for backbone_name in ("resnet_fpn", "segformer_mit_b0"):
            if backbone_name not in args.backbones.split(","):
                continue
            backbone = models.build_backbone(
                backbone_name, input_shape=shape, size=args.size_config
            )
            low_res = models.BackboneAdapter(
                backbone.encoder,
                backbone.feature_level,
                fusion_filters=backbone.fusion_filters,
                upsample=None,
                input_channels=1,
            )
            model = params_cls(low_res, _head("ssn", args.num_classes, args.rank))
            entries.append(
                {"backbone": backbone_name, "head": "ssn", "strategy": "params", "model": model}
            )
    for entry in entries:
        entry["model"].compile(optimizer="adam", loss="auto", jit_compile=jit)
    return entries


def time_models(entries, x, y, args):
    for entry in entries:
        start = time.perf_counter()
        for _ in range(args.warmup):
            entry["model"].train_on_batch(x, y)
        entry["warmup_s"] = time.perf_counter() - start
        entry["round_ms"] = []
    for _ in range(args.rounds):
        for entry in entries:
            start = time.perf_counter()
            for _ in range(args.steps):
                entry["model"].train_on_batch(x, y)
            entry["round_ms"].append(1000.0 * (time.perf_counter() - start) / args.steps)
    for entry in entries:
        entry["step_ms"] = statistics.median(entry["round_ms"])
        entry["params"] = int(entry["model"].count_params())  # built by now


def tables(entries):
    reference = {
        e["head"]: e for e in entries if e["backbone"] == "unet" and e["strategy"] == "features"
    }
    lines = [
        "| backbone | head | params | params / U-Net | step (ms) | step / U-Net |",
        "|---|---|---:|---:|---:|---:|",
    ]
    rows = []
    for e in entries:
        if e["strategy"] != "features":
            continue
        ref = reference.get(e["head"])
        p_ratio = e["params"] / ref["params"] if ref else float("nan")
        t_ratio = e["step_ms"] / ref["step_ms"] if ref else float("nan")
        e["params_ratio"], e["step_ratio"] = p_ratio, t_ratio
        rows.append(e)
        lines.append(
            f"| {e['backbone']} | {e['head']} | {e['params']:,} | {p_ratio:.2f} | "
            f"{e['step_ms']:.0f} | {t_ratio:.2f} |"
        )
    strategy = [e for e in entries if e["strategy"] == "params"]
    if strategy:
        lines += [
            "",
            "| backbone (SSN head) | upsample | params | step (ms) | step / features |",
            "|---|---|---:|---:|---:|",
        ]
        for e in strategy:
            feat = next(
                f
                for f in entries
                if f["backbone"] == e["backbone"]
                and f["head"] == "ssn"
                and f["strategy"] == "features"
            )
            e["step_ratio_vs_features"] = e["step_ms"] / feat["step_ms"]
            lines.append(
                f"| {e['backbone']} | features (library) | {feat['params']:,} | "
                f"{feat['step_ms']:.0f} | |"
            )
            lines.append(
                f"| {e['backbone']} | parameters | {e['params']:,} | "
                f"{e['step_ms']:.0f} | {e['step_ratio_vs_features']:.2f} |"
            )
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)

    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.batch, args.size, args.size, 1)).astype("float32")
    y = rng.integers(0, args.num_classes, size=(args.batch, args.size, args.size)).astype("int32")
    start = time.perf_counter()
    entries = build_models(args)
    time_models(entries, x, y, args)
    table = tables(entries)
    print(table)
    result = {
        "benchmark": "backbones",
        "config": vars(args),
        "machine": {
            **_common.environment(),
            "platform": platform.platform(),
            "processor": platform.processor(),
        },
        "total_s": time.perf_counter() - start,
        "results": [{k: v for k, v in e.items() if k != "model"} for e in entries],
        "markdown": table,
    }
    print(f"\ntotal {result['total_s']:.0f} s")
    _common.write_report(args.out, result)
    return result


if __name__ == "__main__":
    main()
