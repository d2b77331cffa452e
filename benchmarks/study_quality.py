"""What the heads learn of the built-in benchmark's label distribution, variant by variant.

Each variant is one `tfp-seg train` run on the built-in data (the exact-distribution
benchmark, its generator and test split unchanged) with some flags changed from the study's
base (`BASE`: the default job at the time of the study); the script runs them one after the
other, each in a fresh process, and tabulates what the
run's report measured on the test split against the exact label distribution:

```none
ged         squared generalised energy distance D^2_GED (1 - IoU distance; unbiased U-statistic
            over the 16 samples and the exact modes), oracle ~0.002
hm_iou      Hungarian-matched IoU of samples and modes, oracle ~0.76
diversity   mean IoU distance between two samples (the data's: oracle_diversity)
miou        mean IoU of the mean prediction's arg max against the annotations
nll         per-pixel NLL of the predictive probabilities against the exact marginals
```

and the training time. `--seeds` repeats every variant on other benchmark seeds (the seed of
data generation, initialisation and sampling), so that nothing is tuned to seed 0.

Run (about 1.5 minutes per 12-epoch variant on 2 CPU cores):
    python benchmarks/study_quality.py [--variants base,all_raters] [--seeds 0 1]
        [--out benchmarks/results/quality.jsonl] [--list]

Results are appended to `--out` (one JSON line per run: variant, seed, flags, metrics), so an
interrupted study resumes where it stopped (a variant and seed already in the file is skipped
unless `--rerun`); the table printed at the end covers every line of the file.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

# name -> (what it tests, flags). Every variant but `default_job` starts from the study's base,
# the default job at the time of the study (`BASE`: 12 epochs, one random rater per image and
# step; SSN rank 10, 20 antithetic samples, marginal_weight 1 on U-Net(16, depth 3), 64x64,
# 640 images (512 train), Adam 1e-3); flags after it override it. The default job since the
# study is `all_raters_36ep` (= `default_job`).
BASE = ["--epochs", "12", "--annotations", "random"]
VARIANTS = {
    "default_job": ("today's default job (no flags)", None),
    "base": ("the study's base: 12 epochs, one random rater", []),
    "paper_estimator": ("marginal_weight 0 (Monteiro et al.)", ["--marginal-weight", "0"]),
    "all_raters": ("every rater of an image in each step", ["--annotations", "all"]),
    "all_raters_36ep": ("all raters, 3x the epochs", ["--annotations", "all", "--epochs", "36"]),
    "all_raters_36ep_paper": (
        "all raters, 36 epochs, marginal_weight 0",
        ["--annotations", "all", "--epochs", "36", "--marginal-weight", "0"],
    ),
    "all_raters_60ep": ("all raters, 5x the epochs", ["--annotations", "all", "--epochs", "60"]),
    "36ep": ("3x the epochs", ["--epochs", "36"]),
    "samples_40": ("40 Monte Carlo samples", ["--num-samples", "40"]),
    "rank_5": ("rank 5", ["--rank", "5"]),
    "rank_20": ("rank 20", ["--rank", "20"]),
    "lr_3e-4": ("learning rate 3e-4", ["--learning-rate", "3e-4"]),
    "lr_3e-3": ("learning rate 3e-3", ["--learning-rate", "3e-3"]),
    "batch_norm": ("batch norm in the U-Net", ["--norm", "batch"]),
    "filters_32": ("U-Net(32, depth 3)", ["--base-filters", "32"]),
    "augment": ("flips and 90-degree rotations", ["--augment", "true"]),
    "heteroscedastic": ("the heteroscedastic head", ["--head", "heteroscedastic"]),
    "deterministic": ("the deterministic head", ["--head", "deterministic"]),
    "prob_unet": ("the Probabilistic U-Net", ["--model", "prob_unet"]),
    # On today's default job (no BASE): where the SSN head's covariance starts. Glorot's
    # factor gives the logits a standard deviation of ~2 at initialisation and D starts at 1.
    "start_small": (
        "the default job, factor kernel x0.03, diagonal from 0.018 (exp(-4))",
        ["--factor-init-scale", "0.03", "--initial-diagonal", "0.018"],
    ),
    "start_small_0.1": (
        "the default job, factor kernel x0.1, diagonal from 0.018 (the SSN default since)",
        ["--factor-init-scale", "0.1", "--initial-diagonal", "0.018"],
    ),
    "start_glorot": (
        "the default job, glorot factor, diagonal from 1 (the start before the study)",
        ["--factor-init-scale", "1", "--initial-diagonal", "none"],
    ),
    # The SSN loss plus the mean logits' cross-entropy (`mean_weight`), on the default job.
    "mean_weight_1": (
        "the default job, plus the mean logits' cross-entropy (weight 1)",
        ["--mean-weight", "1"],
    ),
    "marginal_weight_3": (
        "the default job, the per-pixel term weighted 3",
        ["--marginal-weight", "3"],
    ),
    "mean_3_marginal_3": (
        "the default job, the mean logits' cross-entropy weighted 3, the per-pixel term 3",
        ["--mean-weight", "3", "--marginal-weight", "3"],
    ),
    "marginal_weight_0.3": (
        "the default job, the per-pixel term weighted 0.3",
        ["--marginal-weight", "0.3"],
    ),
    # The first epochs train the mean logits alone (tfp_seg.losses.MeanWarmup).
    "mean_warmup_6": (
        "the default job, its first 6 of 36 epochs on the mean logits' cross-entropy alone",
        ["--mean-warmup-epochs", "6"],
    ),
    # The loss's Monte Carlo samples per step on the default job (20 there).
    "samples_10": ("the default job, 10 samples per step", ["--num-samples", "10"]),
    "samples_40_default": ("the default job, 40 samples per step", ["--num-samples", "40"]),
    "rank_20_default": ("the default job, rank 20", ["--rank", "20"]),
    # The head's projection over a 3x3 neighbourhood of features instead of one pixel.
    "head_kernel_3": ("the default job, a 3x3 head projection", ["--head-kernel-size", "3"]),
    # The Probabilistic U-Net on the default job: today's recipe, and its earlier optimiser.
    "prob_unet_default": ("the default job, Probabilistic U-Net", ["--model", "prob_unet"]),
    "prob_unet_lr_1e-3": (
        "the default job, Probabilistic U-Net, Adam 1e-3 constant",
        ["--model", "prob_unet", "--learning-rate", "1e-3", "--lr-schedule", "constant"],
    ),
    # The Hierarchical Probabilistic U-Net (spatial latents at the decoder's 3 coarsest levels,
    # 1 per cell and level) on the default job, its default optimiser (Adam 1e-3 constant).
    "hprob_unet_default": (
        "the default job, Hierarchical Probabilistic U-Net",
        ["--model", "hprob_unet"],
    ),
    "hprob_unet_all_raters": (
        "the default job, Hierarchical Prob U-Net, every rater per step",
        ["--model", "hprob_unet", "--annotations", "all"],
    ),
    "hprob_unet_latent_2": (
        "the default job, Hierarchical Prob U-Net, 2 latents per cell and level",
        ["--model", "hprob_unet", "--latent-dim", "2"],
    ),
    # The Probabilistic U-Net's latent size and KL weight (its default optimiser, Adam 1e-3).
    "prob_unet_latent_2": (
        "the default job, Prob U-Net, latent dim 2",
        ["--model", "prob_unet", "--latent-dim", "2"],
    ),
    "prob_unet_latent_3": (
        "the default job, Prob U-Net, latent dim 3",
        ["--model", "prob_unet", "--latent-dim", "3"],
    ),
    "prob_unet_latent_12": (
        "the default job, Prob U-Net, latent dim 12",
        ["--model", "prob_unet", "--latent-dim", "12"],
    ),
    "prob_unet_beta_0.3": (
        "the default job, Prob U-Net, KL weight 0.3",
        ["--model", "prob_unet", "--beta", "0.3"],
    ),
    "prob_unet_beta_10": (
        "the default job, Prob U-Net, KL weight 10",
        ["--model", "prob_unet", "--beta", "10"],
    ),
    # A mixture of K = 3 rank-10 SSN components with image-level weights, on the default job.
    "mixture_default": ("the default job, mixture of 3 low-rank components", ["--head", "mixture"]),
    # Flips and 90-degree rotations of every training example (image and labels alike).
    "augment_default": ("the default job, flips and rotations", ["--augment", "true"]),
    "prob_unet_augment": (
        "the default job, Prob U-Net, flips and rotations",
        ["--model", "prob_unet", "--augment", "true"],
    ),
}
# Variants whose flags apply to today's default job rather than to BASE.
ON_DEFAULT_JOB = {
    "start_small",
    "start_small_0.1",
    "start_glorot",
    "mean_weight_1",
    "marginal_weight_3",
    "marginal_weight_0.3",
    "mean_3_marginal_3",
    "mean_warmup_6",
    "samples_10",
    "samples_40_default",
    "rank_20_default",
    "head_kernel_3",
    "prob_unet_default",
    "prob_unet_lr_1e-3",
    "prob_unet_latent_2",
    "prob_unet_latent_3",
    "prob_unet_latent_12",
    "prob_unet_beta_0.3",
    "prob_unet_beta_10",
    "augment_default",
    "prob_unet_augment",
    "mixture_default",
    "hprob_unet_default",
    "hprob_unet_all_raters",
    "hprob_unet_latent_2",
}


def variant_flags(name: str) -> list:
    """The `tfp-seg train` flags of a variant (the base's, then its own)."""
    own = VARIANTS[name][1]
    if own is None:
        return []
    return list(own) if name in ON_DEFAULT_JOB else BASE + own


METRICS = ("ged", "hm_iou", "diversity", "miou", "nll", "train_seconds")
ORACLE = ("oracle_ged", "oracle_hm_iou", "oracle_diversity")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", default=None, help="comma-separated names (default: all)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--out", default="benchmarks/results/quality.jsonl")
    parser.add_argument("--extra", default="", help="flags added to every variant")
    parser.add_argument("--rerun", action="store_true", help="run again what --out holds")
    parser.add_argument("--list", action="store_true", help="list the variants and stop")
    return parser.parse_args(argv)


def _done(path: str) -> list:
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def run_variant(name: str, flags: list, seed: int, workdir: str) -> dict:
    """One `tfp-seg train` in a fresh process; returns its report's figures."""
    command = [
        sys.executable, "-m", "tfp_seg.cli", "train", *flags, "--seed", str(seed),
        "--name", f"{name}-s{seed}", "--output-dir", workdir, "--no-export", "--quiet",
    ]  # fmt: skip
    start = time.time()
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{proc.stderr[-3000:]}")
    with open(os.path.join(workdir, f"{name}-s{seed}", "report.json")) as f:
        report = json.load(f)
    row = {k: report.get(k) for k in METRICS + ORACLE}
    row["wall_seconds"] = round(time.time() - start, 1)
    return row


def table(rows: list) -> str:
    by_variant: dict = {}
    for row in rows:
        by_variant.setdefault(row["variant"], []).append(row)
    lines = [
        "| variant | seeds | GED | HM-IoU | diversity | mIoU | NLL | train s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, group in by_variant.items():
        cells = []
        for key in METRICS:
            values = [r["metrics"][key] for r in group if r["metrics"].get(key) is not None]
            if not values:
                cells.append("-")
            elif len(values) == 1:
                cells.append(f"{values[0]:.3f}" if key != "train_seconds" else f"{values[0]:.0f}")
            else:
                mean, sd = statistics.mean(values), statistics.stdev(values)
                cells.append(f"{mean:.3f} ± {sd:.3f}" if key != "train_seconds" else f"{mean:.0f}")
        seeds = ",".join(str(r["seed"]) for r in group)
        lines.append(f"| {name} | {seeds} | " + " | ".join(cells) + " |")
    oracle = rows[0]["metrics"] if rows else {}
    if oracle.get("oracle_ged") is not None:
        lines.append(
            f"| oracle | | {oracle['oracle_ged']:.3f} | {oracle['oracle_hm_iou']:.3f} | "
            f"{oracle['oracle_diversity']:.3f} | - | - | - |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.list:
        for name, (what, _) in VARIANTS.items():
            print(f"{name:24s} {what}: {' '.join(variant_flags(name)) or '(no flags)'}")
        return 0
    names = args.variants.split(",") if args.variants else list(VARIANTS)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; --list shows them")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    done = {(r["variant"], r["seed"], r.get("extra", "")) for r in _done(args.out)}
    workdir = tempfile.mkdtemp(prefix="tfp_seg_quality_")
    try:
        for seed in args.seeds:
            for name in names:
                if (name, seed, args.extra) in done and not args.rerun:
                    continue
                flags = variant_flags(name) + args.extra.split()
                metrics = run_variant(name, flags, seed, workdir)
                row = {"variant": name, "seed": seed, "extra": args.extra, "flags": flags}
                row["metrics"] = metrics
                with open(args.out, "a") as f:
                    f.write(json.dumps(row) + "\n")
                print(f"{name} seed {seed}: " + ", ".join(
                    f"{k} {metrics[k]:.4g}" for k in METRICS if metrics.get(k) is not None
                ), flush=True)  # fmt: skip
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(table(_done(args.out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
