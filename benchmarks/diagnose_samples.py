"""Where a trained run's samples differ from the exact label distribution, object by object.

The built-in benchmark's label distribution factorises over its objects (`tfp_seg.data.
ambiguous_shapes`): each object takes one ambiguity type (`boundary`: under / normal / over
segmentation; `faint`: class A or background; `class`: class A or class B) and its own modes.
This script scores the samples of a run (`tfp-seg train` on the built-in data) on the test
split per object, restricted to the object's region (the union of its modes' masks, dilated
by `--margin` pixels), and tabulates by ambiguity type:

```none
objects     number of test objects of the type
diversity   E[d(S, S')] of two samples on the region (U-statistic over distinct samples)
data        E[d(Y, Y')] of the object's exact modes (w^T D w): what `diversity` should be
ged         2 E[d(S, Y)] - E[d(S, S')] - E[d(Y, Y')] on the region (0 for an exact sampler)
nearest     mean IoU distance of a sample to its nearest mode of the object
off_mode    fraction of samples farther than --off-mode (0.1) from every mode (in-between
            segmentations: part of an object flipped, a boundary between two thresholds)
mode_tv     total variation between how often each mode is the nearest and its weight
```

with `d` the IoU distance of `tfp_seg.metrics.pairwise_iou_distance` (mean over foreground
classes present). A sampler of the exact distribution has `diversity` = `data`, `ged` ~ 0,
`nearest` = `off_mode` = 0 and `mode_tv` of the order of its sampling noise.

Run:
    python benchmarks/diagnose_samples.py runs/<name> [--num-samples 32] [--seed 0]
        [--out diagnosis.json]
"""

from __future__ import annotations

import argparse
import json

import numpy as np

KINDS = ("boundary", "faint", "class")
COLUMNS = ("objects", "diversity", "data", "ged", "nearest", "off_mode", "mode_tv")


def _label_samples(sampler, images, num_samples: int, seed: int) -> np.ndarray:
    """`[N, B, *S]` label maps: `sampler.sample` where there is one, else the arg max of
    `sampler.sample_logits`."""
    if hasattr(sampler, "sample"):
        return np.asarray(sampler.sample(images, num_samples, seed=seed))
    return np.asarray(sampler.sample_logits(images, num_samples, seed=seed)).argmax(-1)


def diagnose(
    sampler, data, num_samples: int = 32, seed: int = 0, margin: int = 2, off_mode: float = 0.1
) -> dict:
    """Per ambiguity type of `data` (an `AmbiguousShapes` split), the means over its objects of
    the columns of the module docstring; `{kind: {column: value}}` (types without objects are
    left out)."""
    from scipy import ndimage

    from tfp_seg import metrics

    if num_samples < 2:
        raise ValueError(f"`num_samples` must be >= 2 (sample pairs); got {num_samples}.")
    c = data.num_classes
    samples = _label_samples(sampler, data.images, num_samples, seed)
    expected = (num_samples, len(data)) + tuple(data.images.shape[1:-1])
    if samples.shape != expected:
        raise ValueError(
            f"the sampler gave label maps of shape {samples.shape}; expected {expected}."
        )
    rows: dict = {}
    for j, objects in enumerate(data.objects):
        for o, obj in enumerate(objects):
            keep = data.object_weights[j, o] > 0
            modes = data.object_labels[j, o][keep].astype(np.int32)
            weights = data.object_weights[j, o][keep].astype(np.float64)
            region = (modes > 0).any(axis=0)
            if margin:
                region = ndimage.binary_dilation(region, iterations=margin)
            s, m = samples[:, j][:, region], modes[:, region]
            d_ss = metrics.pairwise_iou_distance(s, s, c)
            d_sy = metrics.pairwise_iou_distance(s, m, c)
            d_yy = metrics.pairwise_iou_distance(m, m, c)
            diversity = (d_ss.sum() - np.trace(d_ss)) / (num_samples * (num_samples - 1))
            data_diversity = weights @ d_yy @ weights
            frequency = np.bincount(d_sy.argmin(axis=1), minlength=len(weights)) / num_samples
            row = rows.setdefault(obj.kind, {key: [] for key in COLUMNS[1:]})
            row["diversity"].append(diversity)
            row["data"].append(data_diversity)
            row["ged"].append(2 * (d_sy @ weights).mean() - diversity - data_diversity)
            row["nearest"].append(d_sy.min(axis=1).mean())
            row["off_mode"].append((d_sy.min(axis=1) > off_mode).mean())
            row["mode_tv"].append(0.5 * np.abs(frequency - weights).sum())
    table = {}
    for kind in KINDS + tuple(sorted(set(rows) - set(KINDS))):
        if kind in rows:
            values = rows[kind]
            table[kind] = {"objects": len(values["diversity"])}
            table[kind].update({key: float(np.mean(v)) for key, v in values.items()})
    return table


def render(table: dict) -> str:
    lines = ["| type | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for kind, row in table.items():
        cells = [str(row["objects"])] + [f"{row[key]:.3f}" for key in COLUMNS[1:]]
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", help="a run folder of `tfp-seg train` on the built-in data")
    parser.add_argument("--num-samples", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--margin", type=int, default=2, help="pixels around each object")
    parser.add_argument("--off-mode", type=float, default=0.1)
    parser.add_argument("--out", help="also write the table as JSON")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from tfp_seg.data import AmbiguousShapes
    from tfp_seg.runs import load_run, make_data, stored_config

    config = stored_config(args.run)
    if config is None:
        raise SystemExit(f"{args.run!r} is not a run folder (no config.json)")
    _, _, test = make_data(config, args.run)
    if not isinstance(test, AmbiguousShapes):
        raise SystemExit(f"{args.run!r} was not trained on the built-in data ({config.data!r})")
    sampler = load_run(args.run, config)
    table = diagnose(sampler, test, args.num_samples, args.seed, args.margin, args.off_mode)
    print(render(table))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(table, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
