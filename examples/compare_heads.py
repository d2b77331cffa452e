"""Compare distribution heads on the same U-Net backbone and the same training budget.

Trains, on the built-in ambiguous-shapes benchmark (`tfp_seg.data.ambiguous_shapes`):

```none
deterministic   CategoricalLogits       one softmax per pixel (the usual segmenter)
heteroscedastic HeteroscedasticLogits   independent Gaussian logits per pixel (Kendall & Gal 2017)
ssn             LowRankLogits           low-rank Gaussian logits over the image (Monteiro 2020)
mixture         MixtureLowRankLogits    K low-rank components, image-level weights (MoSE-style,
                                        Gao 2023); --train-samples per component
prob_unet       ProbabilisticUNet       Gaussian latent + f_comb (Kohl 2018; if importable)
hprob_unet      HierarchicalProbabilisticUNet   spatial latents, coarse to fine (Kohl 2019;
                                        only when named in --heads)
```

each with `tfp_seg.models.UNet(base_filters, depth)` as the backbone, the same data, batch size,
optimiser and number of epochs (or `--steps-per-epoch` x epochs), by default with the recipe of
`tfp-seg train`: every rater of an image in each step (label sets `[B, K, H, W]`) and Adam
from 3e-3 with cosine decay by epoch, the Probabilistic U-Net at a constant 1e-3
(`tfp_seg.runs.config.OPTIMISER_DEFAULTS`; `--annotations random`, `--learning-rate`,
`--lr-schedule` set one for all). Every
model is evaluated against the exact label distribution of the held-out images
(`evaluate_ambiguous`), and the median wall time of a training step is measured in this run,
so the step-time ratio against the deterministic head compares like with like.

    python examples/compare_heads.py --epochs 8 --out runs/compare_heads/

Prints one table and writes `compare_heads.json`, `compare_heads.md` and, per head,
`<head>/report.{json,md}` with figures (unless `--no-figures`) to `--out`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402

import tfp_seg  # noqa: E402
from tfp_seg.evaluation import evaluate_ambiguous  # noqa: E402
from tfp_seg.reporting import write_report  # noqa: E402
from tfp_seg.runs.config import OPTIMISER_DEFAULTS  # noqa: E402
from tfp_seg.runs.train import cosine_schedule  # noqa: E402

DEFAULT_HEADS = ("deterministic", "heteroscedastic", "ssn", "mixture", "prob_unet")
HEADS = DEFAULT_HEADS + ("hprob_unet",)
LATENT_HEADS = ("prob_unet", "hprob_unet")
# (report key, column title, format)
COLUMNS = (
    ("ged", "GED↓", "{:.4f}"),
    ("hm_iou", "HM-IoU↑", "{:.4f}"),
    ("ece", "ECE↓", "{:.4f}"),
    ("nll", "NLL↓", "{:.4f}"),
    ("nll_joint", "joint NLL↓", "{:.4f}"),
    ("miou", "mIoU↑", "{:.4f}"),
    ("diversity", "diversity≈", "{:.4f}"),
    ("step_ms", "step ms", "{:.1f}"),
    ("step_ratio", "step ×det", "{:.2f}"),
    ("params", "params", "{:,}"),
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epochs", type=int, default=8, help="training epochs per head (default 8)")
    p.add_argument(
        "--steps-per-epoch",
        type=int,
        default=None,
        help="steps per epoch (default: one pass over the training images)",
    )
    p.add_argument(
        "--heads",
        nargs="+",
        default=list(DEFAULT_HEADS),
        choices=HEADS,
        help="heads to compare (default: all but hprob_unet; deterministic is always included)",
    )
    p.add_argument("--num-images", type=int, default=320, help="images generated (80/10/10)")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--base-filters", type=int, default=8)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument(
        "--learning-rate",
        type=float,
        help="Adam, for every head (default: `tfp-seg train`'s, 3e-3; prob_unet 1e-3)",
    )
    p.add_argument(
        "--lr-schedule",
        choices=("constant", "cosine"),
        help="cosine decay to 0 by epoch or constant, for every head (default: `tfp-seg "
        "train`'s, cosine; prob_unet constant)",
    )
    p.add_argument(
        "--annotations",
        choices=("all", "random"),
        default="all",
        help="all raters of an image in each step (label sets, as `tfp-seg train`; default) "
        "or one random rater per image and step",
    )
    p.add_argument("--rank", type=int, default=10, help="SSN (and mixture component) rank")
    p.add_argument("--components", type=int, default=3, help="mixture components K")
    p.add_argument(
        "--factor-init-scale",
        type=float,
        default=None,
        help="SSN / mixture factor kernel at initialisation x this (default: the head's)",
    )
    p.add_argument(
        "--initial-diagonal",
        type=float,
        default=None,
        help="SSN / mixture starting diagonal variance (default: the head's)",
    )
    p.add_argument(
        "--train-samples",
        type=int,
        default=20,
        help="Monte Carlo samples in the SSN / heteroscedastic losses (mixture: per component)",
    )
    p.add_argument(
        "--marginal-weight",
        type=float,
        default=None,
        help="weight of the per-pixel term in the SSN / mixture loss (0: the paper's "
        "estimator; default: the loss's, 1)",
    )
    p.add_argument(
        "--mean-weight",
        type=float,
        default=0.0,
        help="weight of the mean logits' cross-entropy in the SSN loss (default: 0, none)",
    )
    p.add_argument(
        "--mean-warmup-epochs",
        type=int,
        default=0,
        help="first epochs in which the SSN head trains its mean logits alone "
        "(tfp_seg.losses.MeanWarmup; default: 0, none)",
    )
    p.add_argument("--latent-dim", type=int, default=6, help="Prob U-Net latent size")
    p.add_argument("--eval-samples", type=int, default=16, help="samples per test image")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join("runs", "compare_heads"))
    p.add_argument(
        "--no-figures", dest="figures", action="store_false", help="skip the per-head figures"
    )
    return p.parse_args(argv)


class StepTimer(keras.callbacks.Callback):
    """Wall time of every training step after the first `warmup` (tracing, caches)."""

    def __init__(self, warmup: int = 5):
        super().__init__()
        self.warmup = warmup
        self.seen = 0
        self.times: list[float] = []
        self._start = 0.0

    def on_train_batch_begin(self, batch, logs=None):
        self._start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.seen += 1
        if self.seen > self.warmup:
            self.times.append(time.perf_counter() - self._start)

    @property
    def median_ms(self) -> float:
        return 1000.0 * statistics.median(self.times) if self.times else float("nan")


def optimiser_of(head: str, args) -> tuple[float, str]:
    """The head's learning rate and schedule: the flags', else `tfp-seg train`'s defaults."""
    defaults = OPTIMISER_DEFAULTS[head if head in LATENT_HEADS else "segmenter"]
    rate = defaults["learning_rate"] if args.learning_rate is None else args.learning_rate
    schedule = defaults["lr_schedule"] if args.lr_schedule is None else args.lr_schedule
    return float(rate), str(schedule)


def build(head: str, args, num_classes: int, learning_rate: float):
    """Model with the shared backbone configuration, compiled for its head."""
    backbone = tfp_seg.models.UNet(base_filters=args.base_filters, depth=args.depth)
    optimizer = keras.optimizers.Adam(learning_rate)
    if head == "prob_unet":
        model = tfp_seg.models.ProbabilisticUNet(
            num_classes=num_classes, latent_dim=args.latent_dim, backbone=backbone
        )
        model.compile(optimizer=optimizer)
        return model
    if head == "hprob_unet":  # its own default latent size (1 per cell and level)
        model = tfp_seg.models.HierarchicalProbabilisticUNet(
            num_classes=num_classes, backbone=backbone
        )
        model.compile(optimizer=optimizer)
        return model
    if head == "deterministic":
        layer = tfp_seg.layers.CategoricalLogits(num_classes)
        loss = "auto"
    elif head == "heteroscedastic":
        layer = tfp_seg.layers.HeteroscedasticLogits(num_classes)
        loss = layer.default_loss(num_samples=args.train_samples)
    elif head == "mixture":
        layer = tfp_seg.layers.MixtureLowRankLogits(
            num_classes, num_components=args.components, rank=args.rank, **_covariance_start(args)
        )
        loss = layer.default_loss(num_samples=args.train_samples, **_loss_weights(args))
    else:
        layer = tfp_seg.layers.LowRankLogits(num_classes, rank=args.rank, **_covariance_start(args))
        loss = layer.default_loss(
            num_samples=args.train_samples,
            mean_weight=args.mean_weight,
            mean_warmup=args.mean_warmup_epochs > 0,
            **_loss_weights(args),
        )
    model = tfp_seg.models.ProbabilisticSegmenter(backbone, layer)
    model.compile(optimizer=optimizer, loss=loss)
    return model


def _covariance_start(args) -> dict:
    """Where the SSN / mixture covariance starts: the flags given, else the heads' defaults."""
    start = {}
    if args.factor_init_scale is not None:
        start["factor_init_scale"] = args.factor_init_scale
    if args.initial_diagonal is not None:
        start["initial_diagonal"] = args.initial_diagonal
    return start


def _loss_weights(args) -> dict:
    """The SSN / mixture loss's per-pixel weight: the flag given, else the loss's default."""
    return {} if args.marginal_weight is None else {"marginal_weight": args.marginal_weight}


def available_heads(requested) -> list:
    heads = ["deterministic"] + [h for h in requested if h != "deterministic"]
    if "prob_unet" in heads and not hasattr(tfp_seg.models, "ProbabilisticUNet"):
        print("prob_unet skipped: tfp_seg.models.ProbabilisticUNet is not available")
        heads.remove("prob_unet")
    return heads


def format_table(results: dict, oracle: dict) -> str:
    rows = [["head"] + [title for _, title, _ in COLUMNS]]
    for head, r in results.items():
        rows.append([head] + [fmt.format(r[k]) if k in r else "—" for k, _, fmt in COLUMNS])
    rows.append(
        ["oracle"] + [fmt.format(oracle[k]) if k in oracle else "—" for k, _, fmt in COLUMNS]
    )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    )


def optimiser_line(heads, args) -> str:
    """`3e-3 (cosine)`, or per head where they differ: `3e-3 (cosine), prob_unet 1e-3 (...)`."""
    by_head = {head: optimiser_of(head, args) for head in heads}
    common = optimiser_of("deterministic", args)
    parts = [f"{common[0]:g} ({common[1]})"]
    parts += [f"{h} {r:g} ({s})" for h, (r, s) in by_head.items() if (r, s) != common]
    return ", ".join(parts)


def format_markdown(results: dict, oracle: dict, args, data_line: str) -> str:
    heads = list(results)
    head_row = "| head | " + " | ".join(title for _, title, _ in COLUMNS) + " |"
    lines = [
        "# Distribution heads on the same U-Net backbone",
        "",
        data_line,
        "",
        f"Backbone `UNet(base_filters={args.base_filters}, depth={args.depth})`, "
        f"{args.epochs} epochs"
        + (f" x {args.steps_per_epoch} steps" if args.steps_per_epoch else "")
        + f", batch {args.batch_size}, Adam {optimiser_line(heads, args)}, "
        f"{args.annotations} annotations per step; SSN rank {args.rank}, "
        f"mixture {args.components} components of rank {args.rank}, "
        f"{args.train_samples} Monte Carlo samples in the SSN / heteroscedastic losses "
        "(mixture: per component); "
        f"{args.eval_samples} samples per test image.",
        "",
        head_row,
        "|---|" + "---:|" * len(COLUMNS),
    ]
    for head, r in list(results.items()) + [("oracle", oracle)]:
        cells = [fmt.format(r[k]) if k in r else "—" for k, _, fmt in COLUMNS]
        link = f"[{head}]({head}/report.md)" if head in results and args.figures else head
        lines.append(f"| {link} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "GED: squared generalised energy distance to the exact label distribution. HM-IoU: "
        "Hungarian-matched IoU with the annotations. ECE: calibration error vs the "
        "annotations. NLL: per-pixel NLL under the exact marginals (oracle = their entropy). "
        "joint NLL: -log p(annotation | image) per pixel (Monte Carlo). diversity: E[d(S,S')] "
        "of the samples, should match the oracle (the true ambiguity). step ms: median wall "
        "time of a training step in this run; step ×det: ratio to the deterministic head.",
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    heads = available_heads(args.heads)
    data = tfp_seg.data.ambiguous_shapes(
        num_images=args.num_images, image_size=args.image_size, seed=args.seed
    )
    train, val, test = data.train_val_test(seed=args.seed)
    data_line = (
        f"ambiguous_shapes {args.image_size}x{args.image_size}: {len(train)} train / "
        f"{len(val)} val / {len(test)} test images, {train.num_annotations} annotations each"
    )
    print(data_line)
    # Full batches only: every timed step does the same work.
    train_ds = train.to_dataset(
        batch_size=args.batch_size,
        seed=args.seed,
        annotation=args.annotations,
        repeat=args.steps_per_epoch is not None,
        drop_remainder=True,
    )
    val_ds = val.to_dataset(batch_size=args.batch_size, shuffle=False, annotation="first")
    os.makedirs(args.out, exist_ok=True)

    results: dict = {}
    oracle: dict = {}
    for head in heads:
        keras.utils.set_random_seed(args.seed)
        rate, schedule = optimiser_of(head, args)
        model = build(head, args, data.num_classes, rate)
        model.build((None, args.image_size, args.image_size, data.images.shape[-1]))
        timer = StepTimer()
        callbacks: list = [timer]
        if schedule == "cosine":
            callbacks.append(cosine_schedule(rate, args.epochs))
        if head == "ssn" and args.mean_warmup_epochs:
            callbacks.append(tfp_seg.losses.MeanWarmup(args.mean_warmup_epochs))
        start = time.time()
        model.fit(
            train_ds,
            validation_data=val_ds,
            epochs=args.epochs,
            steps_per_epoch=args.steps_per_epoch,
            verbose=0,
            callbacks=callbacks,
        )
        seconds = time.time() - start
        report = evaluate_ambiguous(model, test, num_samples=args.eval_samples, seed=args.seed)
        report.update(
            {
                "head": head,
                "epochs": args.epochs,
                "train_seconds": round(seconds, 2),
                "step_ms": timer.median_ms,
                "params": int(model.count_params()),
            }
        )
        report["step_ratio"] = report["step_ms"] / results.get("deterministic", report)["step_ms"]
        results[head] = report
        oracle = {k[len("oracle_") :]: v for k, v in report.items() if k.startswith("oracle_")}
        print(
            f"{head:<16} trained in {seconds:6.1f} s  (step {timer.median_ms:6.1f} ms)  "
            f"GED {report['ged']:.4f}  HM-IoU {report['hm_iou']:.4f}",
            flush=True,
        )
        if args.figures:
            write_report(
                os.path.join(args.out, head),
                report,
                model,
                test,
                num_samples=args.eval_samples,
                seed=args.seed,
                config={"head": head, **vars(args)},
                title=f"Evaluation report: {head} head",
            )
        keras.backend.clear_session(free_memory=False)

    table = format_table(results, oracle)
    print()
    print(table)
    payload = {"config": vars(args), "data": data_line, "results": results, "oracle": oracle}
    with open(os.path.join(args.out, "compare_heads.json"), "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2, sort_keys=True, default=float)
        f.write("\n")
    with open(os.path.join(args.out, "compare_heads.md"), "w", encoding="utf-8") as f:
        f.write(format_markdown(results, oracle, args, data_line))
    print(f"\nwrote {args.out}/compare_heads.json and compare_heads.md")
    return payload


if __name__ == "__main__":
    main()
