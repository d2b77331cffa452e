"""The flags of `tfp-seg train`: one per `TrainConfig` field, with its type and help text.

`TRAIN_FLAGS` maps a field to `(type, help)`; `tfp_seg.cli` adds `--<field-with-dashes>` for
each. A field of `TrainConfig` that takes a value from the command line is here (the switches
`--no-export`, `--quiet`, `--resume`, `--stream` are the CLI's own).
"""

from __future__ import annotations

import argparse

from tfp_seg.runs.config import AUTO, BACKBONES, BASELINES, HEADS, MODELS, VOLUME_DEFAULTS

__all__ = ["AUTO", "NONE", "TRAIN_FLAGS", "parse_bool", "parse_start"]


def _volume_defaults() -> str:
    return ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in VOLUME_DEFAULTS.items())


def parse_bool(text: str) -> bool:
    """`true` / `yes` / `1` or `false` / `no` / `0` (any case) as a bool, for argparse."""
    value = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}.get(
        text.strip().lower()
    )
    if value is None:
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return value


NONE = "none"  # the field set to None (argparse's None means "flag not given")


def parse_start(text: str):
    """`auto` as `AUTO`, `none` as `NONE`, else the text as a float, for argparse."""
    word = text.strip().lower()
    if word in (AUTO, NONE):
        return word
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, auto or none; got {text!r}") from None


TRAIN_FLAGS: dict = {
    # field: (type, help)
    "name": (
        str,
        "run name; output goes to <output-dir>/<name> (default: <head>_<backbone>_<time>)",
    ),
    "model": (
        str,
        f"model family, one of {', '.join(MODELS)} (default: segmenter = backbone + head)",
    ),
    "data": (
        str,
        "data source: builtin (the exact-distribution benchmark, split 80/10/10), "
        "lidc:PATH (the data_lidc.pickle of LIDC-IDRI crops, or a folder of its parts), or "
        "folder:IMAGES_DIR:MASKS_DIR (one or several masks per image), or nifti:DIR (BraTS-"
        "layout volumes, a folder per case: trained on patches, evaluated by sliding "
        "windows); real data are split 60/20/20 by patient series (cases), recorded in "
        "<run>/split.json (default: builtin)",
    ),
    "cache_dir": (str, "decode cache of streamed data (default: $TFP_SEG_CACHE, ~/.cache/tfp_seg)"),
    "head": (
        str,
        f"distribution head, one of {', '.join(HEADS)}, or a sampling baseline over a "
        f"deterministic network, one of {', '.join(BASELINES)} (default: low_rank = SSN)",
    ),
    "backbone": (
        str,
        f"backbone, one of {', '.join(BACKBONES)} (default: unet, the built-in U-Net; the others "
        "are keras-hub / keras-cv models built from config, nothing is downloaded)",
    ),
    "rank": (int, "rank R of the SSN covariance factor (default: 10)"),
    "head_kernel_size": (
        int,
        "spatial size of the head's projection convolution from the backbone's features to "
        "its parameters (default: 1, per pixel)",
    ),
    "factor_init_scale": (
        parse_start,
        "the SSN / mixture head's factor kernel at initialisation is glorot's times this; 0 "
        "starts the factor at zero, 1 as glorot drew it; auto: the head's default (SSN 0.1, "
        "mixture 1) (default: auto)",
    ),
    "initial_diagonal": (
        parse_start,
        "starting variance D of the SSN / mixture head's diagonal; none starts its raw value "
        "at 0 (D = 1); auto: the head's default (SSN 0.018, mixture none) (default: auto)",
    ),
    "components": (
        int,
        "mixture components K of --head mixture, each a rank-R SSN component (default: 3)",
    ),
    "num_samples": (
        int,
        "Monte Carlo samples M in the SSN training loss, per component with --head mixture "
        "(default: 20)",
    ),
    "marginal_weight": (
        float,
        "weight of the per-pixel term added to the SSN joint MC loss; 0 = the paper's loss "
        "(default: 1)",
    ),
    "mean_weight": (
        float,
        "weight of the mean logits' cross-entropy added to the SSN loss, a regulariser of the "
        "mean for small backbones (--head low_rank only) (default: 0)",
    ),
    "mean_warmup_epochs": (
        int,
        "first epochs that train the mean logits alone on their cross-entropy before the SSN "
        "loss (tfp_seg.losses.MeanWarmup; --head low_rank only) (default: 0)",
    ),
    "epochs": (
        int,
        f"training epochs (default: 36; {VOLUME_DEFAULTS['epochs']} with --spatial-dims 3)",
    ),
    "batch_size": (int, "batch size (default: 8)"),
    "learning_rate": (float, "Adam learning rate (default: 3e-3; 1e-3 with --model prob_unet)"),
    "lr_schedule": (
        str,
        "learning rate over the epochs: constant, or cosine (lr * (1 + cos(pi e / epochs)) / 2 "
        "in epoch e = 0..epochs-1) (default: cosine; constant with --model prob_unet)",
    ),
    "spatial_dims": (
        int,
        "2: images [H, W]; 3: volumes [D, H, W] (the built-in benchmark in 3D, the 3D U-Net, "
        f"the head on 3D features; with 3 the defaults of {_volume_defaults()}) (default: 2; "
        "3 with --data nifti:DIR)",
    ),
    "patch_size": (
        int,
        "nifti data: side of the cubic training patches and of the sliding windows of "
        "evaluation, divisible by 2**depth (default: 32)",
    ),
    "patches_per_epoch": (
        int,
        "nifti data: random training patches per epoch, rounded up to whole batches (default: 256)",
    ),
    "foreground_fraction": (
        float,
        "nifti data: share of the patches centred on a tumour class, the rest anywhere in the "
        "brain (default: 0.5)",
    ),
    "window_overlap": (
        int,
        "nifti data: voxels shared by neighbouring sliding windows, < --patch-size (default: "
        "patch size // 4)",
    ),
    "image_size": (
        int,
        "side of the built-in images (volumes: D = H = W), divisible by 2**depth (default: 64; "
        f"{VOLUME_DEFAULTS['image_size']} with --spatial-dims 3)",
    ),
    "num_images": (
        int,
        "images (volumes) generated; split 80/10/10 into train/val/test (default: 640; "
        f"{VOLUME_DEFAULTS['num_images']} with --spatial-dims 3)",
    ),
    "num_annotations": (int, "sampled annotations ('raters') per image (default: 4)"),
    "base_filters": (int, "U-Net filters at the first level (default: 16)"),
    "depth": (int, "U-Net downsamplings (default: 3)"),
    "max_filters": (int, "cap on the U-Net filters of a level (default: none)"),
    "norm": (str, "U-Net normalisation: group or batch (default: group)"),
    "annotations": (
        str,
        "how an image's raters are scored in training: random (one drawn per image and step), "
        "all (every rater, from one set of logit samples shared by them), marginal (the "
        "raters' per-pixel fractions as soft labels; heteroscedastic and deterministic heads "
        "and the sampling baselines) (default: all; random for --model prob_unet)",
    ),
    "augment": (
        parse_bool,
        "true: a random flip / 90-degree rotation of every training example, the same for "
        "image and labels (default: false)",
    ),
    "dropout": (float, "U-Net dropout rate (default: 0.2 with --head mc_dropout, else 0)"),
    "ensemble_size": (int, "members of --head ensemble (default: 3) or of --ensemble (default: 4)"),
    "ensemble": (
        str,
        "efficient ensemble of the built-in U-Net under the head, trained as one model, its "
        "members the samples: batch (BatchEnsemble) or packed (Packed-Ensembles, alpha 2, "
        "gamma 1); --eval-samples must be a multiple of --ensemble-size (default: none)",
    ),
    "latent_dim": (
        int,
        "latent dimension of --model prob_unet (default: 6); per cell and level of --model "
        "hprob_unet (default: 1)",
    ),
    "latent_levels": (int, "decoder levels with latents of --model hprob_unet (default: 3)"),
    "beta": (float, "KL weight of --model prob_unet / hprob_unet (default: 1.0)"),
    "seed": (int, "seed of data generation, initialisation and sampling (default: 0)"),
    "eval_samples": (int, "samples per image for evaluation (default: 16)"),
    "val_every": (int, "validation GED, HM-IoU, diversity every N epochs; 0 = off (default: 9)"),
    "val_images": (int, "validation images scored for the curves, the first ones (default: 16)"),
    "val_samples": (int, "samples per validation image for the curves (default: 16)"),
    "output_dir": (str, "folder of run folders (default: runs)"),
    "savedmodels_dir": (str, "TF Serving model base folder (default: savedmodels)"),
    "strategy": (
        str,
        "tf.distribute strategy: auto (TPU, else multi_worker if TF_CONFIG names a cluster, "
        "else mirrored over >1 GPU, else default), default, mirrored, multi_worker, tpu "
        "(default: auto); --batch-size is the global batch",
    ),
    "mixed_precision": (
        str,
        "Keras dtype policy of the backbone: mixed_float16 or mixed_bfloat16 (heads and "
        "losses stay float32; default: float32)",
    ),
}
