"""`tfp-seg`: train, evaluate, sample and export probabilistic segmenters.

```none
tfp-seg train                         # SSN head + built-in U-Net on the built-in ambiguous data
tfp-seg train --head deterministic --epochs 5 --name baseline
tfp-seg train --head mixture --components 3   # K low-rank components, image-level weights
tfp-seg train --ensemble batch --ensemble-size 4   # BatchEnsemble U-Net (or packed), SSN head
tfp-seg train --config my.yaml        # any TrainConfig field; flags override the file
tfp-seg train --data lidc:data_lidc.pickle --config examples/configs/lidc_ssn.yaml
tfp-seg train --spatial-dims 3        # volumes: the built-in benchmark in 3D, the 3D U-Net
tfp-seg evaluate runs/<name>          # report.json: vs the exact distribution, or the raters
tfp-seg sample runs/<name> -n 8       # sampled label maps of test images (.npz)
                                      # (and their mean probabilities, the report's Dice)
tfp-seg export runs/<name> --format saved_model|onnx   # --roi-mask: a region-of-interest input
tfp-seg evaluate runs/<name> --covariance-temperature auto   # (or T; and sample, export):
                                      # SSN samples with Sigma x T, T fitted on validation raters
```

Errors (missing or corrupt files, unwritable folders, bad values) print one line starting with
`tfp-seg: error:` and exit with status 1 (2 for bad command-line usage); Ctrl-C exits 130.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys
import threading
from typing import Optional, Sequence

import keras
import numpy as np

from tfp_seg import __version__, _interrupt, export
from tfp_seg._io import atomic_path
from tfp_seg.evaluation import format_report
from tfp_seg.export import ExportError
from tfp_seg.runs.config import TrainConfig, load_config, stored_config
from tfp_seg.runs.control import add_control_args, controlled_sampler
from tfp_seg.runs.data import evaluation_data
from tfp_seg.runs.dice import batch_size_for, mean_probabilities
from tfp_seg.runs.evaluate import evaluate_data, load_run
from tfp_seg.runs.flags import NONE, TRAIN_FLAGS, parse_bool
from tfp_seg.runs.model import sampler_for
from tfp_seg.runs.report import write_report
from tfp_seg.runs.train import train

_TRAIN_FLAGS = TRAIN_FLAGS  # the flags of `train`, one per TrainConfig field (runs/flags.py)
_bool = parse_bool


_STREAM_HELP = (
    "users' data: decode once into a disk cache and stream batches from it, or --no-stream: "
    "into memory (default: %sstream when the decoded size exceeds a quarter of the memory or "
    "$TFP_SEG_STREAM_THRESHOLD)"
)


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status 1."""


def _add_train(sub):
    p = sub.add_parser(
        "train",
        help="train a model (built-in ambiguous data or --data SPEC), evaluate it, save it",
        description=(
            "Train a probabilistic segmenter on tfp_seg.data.ambiguous_shapes (or the data of "
            "--data), evaluate it against the exact label distribution (or the raters) and "
            "write runs/<name>/{config,history,report,split}.json and model.keras. With no "
            "arguments: SSN head (rank 10) on the built-in U-Net, 64x64 images, a few minutes "
            "on a CPU; --spatial-dims 3: the same on volumes."
        ),
    )
    p.add_argument("--config", help="YAML or JSON file of TrainConfig fields (flags override)")
    for field, (ftype, help_text) in _TRAIN_FLAGS.items():
        p.add_argument("--" + field.replace("_", "-"), dest=field, type=ftype, help=help_text)
    p.add_argument(
        "--no-export",
        dest="export",
        action="store_false",
        default=None,
        help="do not export a SavedModel to <savedmodels-dir>/<name>/<version>",
    )
    p.add_argument(
        "--quiet",
        dest="progress",
        action="store_false",
        default=None,
        help="no progress bars",
    )
    p.add_argument(
        "--resume",
        dest="resume",
        action="store_true",
        default=None,
        help="back up every epoch to <run>/backup and, if a backup is there, continue from it "
        "(needs --name; rerun the same command after an interruption)",
    )
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, help=_STREAM_HELP % "")


def _add_run_arg(p):
    p.add_argument("run", help="a run folder (runs/<name>) or a .keras model file")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tfp-seg",
        description="Probabilistic segmentation with TensorFlow Probability heads.",
    )
    parser.add_argument("--version", action="version", version=f"tfp_seg {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    _add_train(sub)

    p = sub.add_parser(
        "evaluate",
        help="evaluate a saved run or model on the built-in data's held-out split",
        description=(
            "Evaluate against the exact label distribution (built-in data) or the raters "
            "(users' data: GED and HM-IoU at 16 and 100 samples, per-pixel metrics against the "
            "raters' marginals, mIoU and Dice against each rater); writes report.json, "
            "report.md and "
            "PNG figures (samples, probability / entropy / mutual-information maps, "
            "reliability diagram) under figures/."
        ),
    )
    _add_run_arg(p)
    p.add_argument("--num-samples", type=int, default=16, help="samples per image (default: 16)")
    _add_data_arg(p)
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    p.add_argument(
        "--output",
        help="folder for report.json, report.md and figures/ (default: the run folder, or "
        "next to the model)",
    )
    p.add_argument("--quiet", dest="progress", action="store_false", help="no progress bar")
    add_control_args(p)
    p.add_argument(
        "--figures",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="write the PNG figures (default: yes)",
    )

    p = sub.add_parser(
        "sample",
        help="draw sampled segmentations of held-out images",
        description=(
            "Draw N label-map samples of test images (volumes) and save them as .npz: images, "
            "annotations, samples [N, B, *S] and mean_probabilities [B, *S, C] (the mean "
            "softmax of N logit samples, whose arg max the report's Dice scores)."
        ),
    )
    _add_run_arg(p)
    p.add_argument("-n", "--num-samples", type=int, default=8, help="samples (default: 8)")
    p.add_argument("--images", type=int, default=4, help="number of test images (default: 4)")
    _add_data_arg(p)
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    p.add_argument("--output", help="output .npz (default: <run>/samples.npz)")
    add_control_args(p)

    p = sub.add_parser(
        "export",
        help="export a run for TF Serving (SavedModel) or ONNX",
        description="Export with parity checks against the Keras model.",
    )
    _add_run_arg(p)
    p.add_argument(
        "--format",
        choices=("saved_model", "onnx"),
        default="saved_model",
        help="export format (default: saved_model)",
    )
    p.add_argument(
        "--output",
        help="target: a model folder (next free version) or a version folder for saved_model "
        "(default savedmodels/<name>), "
        "a .onnx file for onnx (default <run>/model.onnx)",
    )
    p.add_argument("--num-samples", type=int, default=16, help="samples in the graph (default: 16)")
    p.add_argument(
        "--roi-mask",
        action="store_true",
        help="add a second input roi_mask [B,H,W] (region of interest) for heads that take one",
    )
    add_control_args(p)
    return parser


def _add_data_arg(p) -> None:
    p.add_argument(
        "--data",
        metavar="SPEC",
        help="images of another source (a --data spec of train), all of them; default: the "
        "run's own test split (<run>/split.json)",
    )
    stream_help = _STREAM_HELP % "as the run did, else "
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, help=stream_help)
    p.add_argument("--cache-dir", help="decode cache of streamed data (default: the run's)")


def _train_config(args) -> TrainConfig:
    values = load_config(args.config) if args.config else {}
    for field in list(_TRAIN_FLAGS) + ["export", "progress", "resume", "stream"]:
        value = getattr(args, field, None)
        if value == NONE:  # `--flag none`: the field set to None
            values[field] = None
        elif value is not None:
            values[field] = value
    try:
        return TrainConfig(**values).validate()
    except TypeError as exc:
        raise CLIError(str(exc)) from exc


def _run_dir_and_config(run: str):
    run_dir = run if os.path.isdir(run) else os.path.dirname(os.path.abspath(run))
    try:
        config = stored_config(run_dir)
    except ValueError as exc:  # "corrupt run config <path>: ..."
        raise CLIError(str(exc)) from exc
    return run_dir, config or TrainConfig()


def cmd_train(args) -> int:
    config = _train_config(args)
    keras.utils.set_random_seed(config.seed)  # the application seeds; the library never does
    result = train(config)
    if config.export:
        # The run's sampler, as evaluated: MC dropout keeps dropout on in the sampled
        # signatures, an ensemble exports every member (tfp_seg.export.as_adapter).
        sampler = sampler_for(result["model"], config)
        _export_saved_model(sampler, config, os.path.basename(result["run_dir"]))
    return 0


def _export_saved_model(model, config: TrainConfig, name: str, target: Optional[str] = None):
    # A model folder gets the next free integer version (TF Serving's repository layout).
    target = export.saved_model(model, target or os.path.join(config.savedmodels_dir, name))
    print(f"exported SavedModel to {target}")
    return target


def _test_data(args, config, run_dir):
    """The run's recorded test split, or with `--data SPEC` every image of that source."""
    return evaluation_data(config, run_dir, args.data, args.stream, args.cache_dir)


def _controlled(args, model, config, run_dir):
    """The run's sampler under `--covariance-temperature` / `--class-scales`, and the facts
    the report records of the control (none without them)."""
    try:
        return controlled_sampler(
            model, config, run_dir, args.covariance_temperature, args.class_scales
        )
    except (FileNotFoundError, ValueError) as exc:
        raise CLIError(str(exc)) from exc


def cmd_evaluate(args) -> int:
    run_dir, config = _run_dir_and_config(args.run)
    model = _load(args.run, load_run, config)
    model, control = _controlled(args, model, config, run_dir)
    test = _test_data(args, config, run_dir)
    report = evaluate_data(model, test, args.num_samples, args.seed, progress=args.progress)
    report.update(control)
    out_dir = args.output or run_dir
    _ensure_writable(out_dir)
    has_config = os.path.isfile(os.path.join(run_dir, "config.json"))
    report["run"] = os.path.basename(os.path.normpath(run_dir))
    written = write_report(
        out_dir,
        report,
        model,
        test,
        num_samples=args.num_samples,
        seed=args.seed,
        config=dataclasses.asdict(config) if has_config else None,
        figures=args.figures,
        progress=None if args.progress else False,
    )
    print(format_report(report))
    print(f"wrote {written['json']} and {written['markdown']}")
    if written["figures"]:
        print(f"wrote {len(written['figures'])} figures to {os.path.join(out_dir, 'figures')}")
    return 0


def cmd_sample(args) -> int:
    run_dir, config = _run_dir_and_config(args.run)
    model = _load(args.run, load_run, config)
    model, _ = _controlled(args, model, config, run_dir)
    test = _test_data(args, config, run_dir)
    if args.images < 1:
        raise CLIError(f"--images must be >= 1; got {args.images}")
    subset = test[: args.images]
    images, annotations = np.asarray(subset.images), np.asarray(subset.annotations)
    # Volumes one at a time (a batch of whole volumes' samples would not fit in memory).
    batching = {"batch_size": batch_size_for(images)} if images.ndim == 5 else {}
    samples = model.sample(images, args.num_samples, seed=args.seed, **batching)
    # The mean softmax of the report's draws (runs/dice.py): its arg max is the prediction
    # whose Dice the report gives, for these images, seed and number of samples.
    probs = mean_probabilities(model, images, args.num_samples, args.seed)
    out = args.output or os.path.join(run_dir, "samples.npz")
    _ensure_writable(os.path.dirname(os.path.abspath(out)))
    # Through an open file: numpy would add ".npz" to a path without it.
    with atomic_path(out) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(
            f, images=images, samples=samples, annotations=annotations, mean_probabilities=probs
        )
    print(f"wrote {samples.shape[0]} samples of {samples.shape[1]} images to {out}")
    return 0


def cmd_export(args) -> int:
    run_dir, config = _run_dir_and_config(args.run)
    # With the run's config: an MC-dropout run loads as its MCDropout sampler (an ensemble
    # as its DeepEnsemble), which the exporters export faithfully, not as a plain network.
    model = _load(args.run, load_run, config)
    model, _ = _controlled(args, model, config, run_dir)  # recorded in the export's config
    name = os.path.basename(os.path.normpath(run_dir))
    if args.format == "saved_model":
        target = export.saved_model(
            model,
            args.output or os.path.join(config.savedmodels_dir, name),
            num_samples=args.num_samples,
            roi_mask=args.roi_mask,
        )
        print(f"exported SavedModel to {target}")
    else:
        target = args.output or os.path.join(run_dir, "model.onnx")
        export.onnx(model, target, num_samples=args.num_samples, roi_mask=args.roi_mask)
        print(f"exported ONNX to {target}")
    return 0


def _load(run: str, load_run, config=None):
    try:
        return load_run(run, config)
    except (FileNotFoundError, ValueError) as exc:
        raise CLIError(str(exc)) from exc


def _ensure_writable(folder: str) -> None:
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        raise CLIError(f"cannot create output folder {folder!r}: {exc.strerror}") from exc
    if not os.access(folder, os.W_OK):
        raise CLIError(f"output folder {folder!r} is not writable")


_COMMANDS = {
    "train": cmd_train,
    "evaluate": cmd_evaluate,
    "sample": cmd_sample,
    "export": cmd_export,
}


class _InterruptFlag:
    """Records a Ctrl-C (SIGINT) while a command runs, whatever the exception it turns into.

    Python raises `KeyboardInterrupt` where the signal lands, but library code may catch it and
    raise something else: Keras' loss bookkeeping has bare `except:` clauses that run while
    `fit` traces its first step, and turn an interrupt landing there into a `ValueError` about
    `y_true` / `y_pred` structures. The flag lets `main` report an interrupt as one, with exit
    status 130, instead of a misleading error. A SIGINT that is ignored when the command starts
    (a background job of a non-interactive shell) stays ignored, as for any Python program.
    """

    def __init__(self) -> None:
        self.interrupted = False
        self._previous = None

    def _handler(self, signum, frame):
        self.interrupted = True
        _interrupt.request()  # for a KeyboardInterrupt that library code swallows
        raise KeyboardInterrupt

    def __enter__(self) -> "_InterruptFlag":
        _interrupt.clear()
        if threading.current_thread() is threading.main_thread():
            previous = signal.getsignal(signal.SIGINT)
            if previous is not signal.SIG_IGN:
                self._previous = previous
                signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc_info) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with _InterruptFlag() as flag:
        try:
            return _COMMANDS[args.command](args)
        except KeyboardInterrupt:
            return _interrupted()
        except Exception as exc:
            if flag.interrupted:  # an interrupt that library code re-raised as another error
                return _interrupted()
            if isinstance(exc, _USER_ERRORS):
                print(f"tfp-seg: error: {exc}", file=sys.stderr)
                return 1
            raise


_USER_ERRORS = (CLIError, ValueError, OSError, FloatingPointError, ImportError, ExportError)


def _interrupted() -> int:
    print("tfp-seg: interrupted; files already written are complete", file=sys.stderr)
    return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
