"""The main job: train, evaluate and save a probabilistic segmenter on the built-in data.

`tfp-seg train` is a thin command-line layer over `TrainConfig` and `train`. A run writes:

```none
runs/<name>/config.json    the resolved configuration
runs/<name>/model.keras    the trained model (loads with keras.models.load_model, safe_mode)
runs/<name>/history.json   per-epoch losses
runs/<name>/report.json    evaluation against the exact label distribution (+ oracle floors)
```

Every file is written to a temporary name and renamed, so an interrupted run never leaves a
half-written file in place of a good one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Optional

__all__ = [
    "TrainConfig",
    "HEADS",
    "BACKBONES",
    "MODELS",
    "build_model",
    "load_config",
    "make_data",
    "train",
    "atomic_write_json",
    "load_run",
    "save_model",
    "sampler_for",
]

HEADS = ("low_rank", "heteroscedastic", "deterministic", "mc_dropout", "ensemble")
BACKBONES = (
    "unet",
    "resnet_fpn",
    "deeplabv3plus_resnet",
    "deeplabv3_mobilenetv3",
    "segformer_mit_b0",
    "keras_cv_deeplabv3plus_resnet",
    "keras_cv_segformer_mit_b0",
)
MODELS = ("segmenter", "prob_unet")


@dataclasses.dataclass
class TrainConfig:
    """Configuration of one training run (all fields settable from YAML/JSON or flags)."""

    name: Optional[str] = None
    model: str = "segmenter"
    head: str = "low_rank"
    backbone: str = "unet"
    rank: int = 10
    num_samples: int = 20
    marginal_weight: float = 1.0
    epochs: int = 12
    batch_size: int = 8
    learning_rate: float = 1e-3
    image_size: int = 64
    num_images: int = 640
    num_annotations: int = 4
    base_filters: int = 16
    depth: int = 3
    dropout: Optional[float] = None
    ensemble_size: int = 3
    latent_dim: int = 6
    beta: float = 1.0
    seed: int = 0
    eval_samples: int = 16
    output_dir: str = "runs"
    savedmodels_dir: str = "savedmodels"
    export: bool = True
    progress: bool = True
    strategy: str = "auto"
    resume: bool = False
    mixed_precision: Optional[str] = None

    def validate(self) -> "TrainConfig":
        if self.model not in MODELS:
            raise ValueError(f"`model` must be one of {MODELS}; got {self.model!r}.")
        if self.head not in HEADS:
            raise ValueError(f"`head` must be one of {HEADS}; got {self.head!r}.")
        if self.backbone not in BACKBONES:
            raise ValueError(f"`backbone` must be one of {BACKBONES}; got {self.backbone!r}.")
        if self.dropout is None:
            self.dropout = 0.2 if self.head == "mc_dropout" else 0.0
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"`dropout` must be in [0, 1); got {self.dropout!r}.")
        if self.model == "prob_unet" and self.head not in ("low_rank", "deterministic"):
            raise ValueError(
                f"`head` {self.head!r} does not apply to `model` prob_unet (its latent space "
                "is the distribution); leave `head` at its default."
            )
        if self.head == "mc_dropout" and self.dropout == 0.0:
            raise ValueError("`head` mc_dropout needs `dropout` > 0 (default 0.2).")
        for field in (
            "rank",
            "num_samples",
            "epochs",
            "batch_size",
            "num_images",
            "eval_samples",
            "ensemble_size",
            "latent_dim",
        ):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{field}` must be a positive int; got {value!r}.")
        if self.image_size % (2**self.depth):
            raise ValueError(
                f"`image_size` ({self.image_size}) must be divisible by 2**depth "
                f"({2**self.depth})."
            )
        if not self.beta >= 0:
            raise ValueError(f"`beta` must be >= 0; got {self.beta!r}.")
        if not self.learning_rate > 0:
            raise ValueError(f"`learning_rate` must be > 0; got {self.learning_rate!r}.")
        from tfp_seg.distribute import POLICIES, STRATEGIES

        if self.strategy not in STRATEGIES:
            raise ValueError(f"`strategy` must be one of {STRATEGIES}; got {self.strategy!r}.")
        if self.mixed_precision not in POLICIES:
            raise ValueError(
                f"`mixed_precision` must be one of {POLICIES}; got {self.mixed_precision!r}."
            )
        if self.resume and not self.name:
            raise ValueError(
                "`resume` needs a run `name` (the run folder <output_dir>/<name> holds the "
                "backup); pass the same name when restarting."
            )
        return self

    def resolved_name(self) -> str:
        if self.name:
            return self.name
        tag = "ssn" if self.head == "low_rank" else self.head
        if self.model != "segmenter":
            tag = self.model
        return f"{tag}_{self.backbone}_{time.strftime('%Y%m%d-%H%M%S')}"


def load_config(path: str) -> dict:
    """Read a YAML or JSON config file into a dict of `TrainConfig` fields."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {path}")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        if path.endswith(".json"):
            values = json.loads(text)
        else:
            import yaml

            values = yaml.safe_load(text)
    except Exception as exc:  # malformed YAML/JSON: say which file and why
        raise ValueError(f"could not parse config file {path}: {exc}") from exc
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ValueError(f"config file {path} must hold a mapping of fields; got {type(values)}.")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(
            f"config file {path} has unknown fields {unknown}; known: {sorted(known)}."
        )
    return values


def make_data(config: TrainConfig):
    """The built-in ambiguous benchmark, split 80/10/10 reproducibly."""
    from tfp_seg.data import ambiguous_shapes

    data = ambiguous_shapes(
        num_images=config.num_images,
        image_size=config.image_size,
        num_annotations=config.num_annotations,
        seed=config.seed,
    )
    return data.train_val_test()


def _head(config: TrainConfig, num_classes: int):
    from tfp_seg import layers

    if config.head == "low_rank":
        return layers.LowRankLogits(num_classes, rank=config.rank)
    if config.head == "heteroscedastic":
        return layers.HeteroscedasticLogits(num_classes)
    return layers.CategoricalLogits(num_classes)


def _backbone(config: TrainConfig):
    """The built-in U-Net, or a keras-hub / keras-cv family built from config (no download)."""
    from tfp_seg import models

    if config.backbone == "unet":
        return models.UNet(
            base_filters=config.base_filters, depth=config.depth, dropout=config.dropout
        )
    return models.build_backbone(
        config.backbone, input_shape=(config.image_size, config.image_size, 1)
    )


def _segmenter(config: TrainConfig, num_classes: int):
    from tfp_seg import models

    return models.ProbabilisticSegmenter(_backbone(config), _head(config, num_classes))


def build_model(config: TrainConfig, num_classes: int):
    """Build the (uncompiled) model described by `config`.

    `head="ensemble"` gives a `tfp_seg.uncertainty.DeepEnsemble` of `ensemble_size`
    independently initialised deterministic segmenters; `head="mc_dropout"` a deterministic
    segmenter with dropout (wrapped in `MCDropout` for evaluation by `sampler_for`).
    """
    if config.model == "prob_unet":
        from tfp_seg import models

        return models.ProbabilisticUNet(
            num_classes,
            latent_dim=config.latent_dim,
            beta=config.beta,
            backbone=_backbone(config),
        )
    if config.head == "ensemble":
        from tfp_seg.uncertainty import DeepEnsemble

        return DeepEnsemble.from_factory(
            lambda: _segmenter(config, num_classes), config.ensemble_size
        )
    return _segmenter(config, num_classes)


def sampler_for(model, config: TrainConfig):
    """The object whose `sample_logits` represents the run's predictive distribution."""
    if config.head == "mc_dropout":
        from tfp_seg.uncertainty import MCDropout

        return MCDropout(model, num_samples=config.eval_samples)
    return model


def _compile(model, config: TrainConfig):
    import keras

    def optimizer():
        return keras.optimizers.Adam(config.learning_rate)

    if config.model == "prob_unet":
        model.compile(optimizer=optimizer())
        return
    if config.head == "ensemble":
        for member in model.members:
            member.compile(optimizer=optimizer(), loss="auto")
        return
    if config.head == "low_rank":
        loss = model.head.default_loss(
            num_samples=config.num_samples, marginal_weight=config.marginal_weight
        )
    elif config.head == "heteroscedastic":
        loss = model.head.default_loss(num_samples=config.num_samples)
    else:
        loss = "auto"
    model.compile(optimizer=optimizer(), loss=loss)


def atomic_write_json(path: str, payload: Any) -> None:
    """Write JSON to `path` via a temporary file and an atomic rename."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def atomic_save_model(model, path: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}.keras"
    model.save(tmp)
    os.replace(tmp, path)


def save_model(model, run_dir: str, config: TrainConfig) -> str:
    """Save a run's model: `model.keras`, or `ensemble/` (one `.keras` per member)."""
    if config.head == "ensemble":
        import shutil

        target = os.path.join(run_dir, "ensemble")
        tmp = f"{target}.tmp-{os.getpid()}"
        model.save(tmp)
        if os.path.isdir(target):
            shutil.rmtree(target)
        os.replace(tmp, target)
        return target
    path = os.path.join(run_dir, "model.keras")
    atomic_save_model(model, path)
    return path


def _mean_history(histories):
    keys = set.intersection(*(set(h) for h in histories))
    return {
        k: [float(sum(vals) / len(vals)) for vals in zip(*(h[k] for h in histories), strict=True)]
        for k in sorted(keys)
    } | {f"member_{i}/{k}": v for i, h in enumerate(histories) for k, v in h.items()}


def _prepare_run_dir(config: TrainConfig) -> str:
    run_dir = os.path.join(config.output_dir, config.resolved_name())
    try:
        os.makedirs(run_dir, exist_ok=True)
        probe = os.path.join(run_dir, f".write-test-{os.getpid()}")
        with open(probe, "w") as f:
            f.write("")
        os.remove(probe)
    except OSError as exc:
        raise OSError(f"cannot write to output folder {run_dir!r}: {exc.strerror}") from exc
    return run_dir


class _NonFiniteGuard:
    """Keras callback factory: stop training with a message naming the non-finite quantity."""

    @staticmethod
    def make():
        import math

        import keras

        class NonFiniteGuard(keras.callbacks.Callback):
            def __init__(self):
                super().__init__()
                self.message = None

            def on_train_batch_end(self, batch, logs=None):
                for key, value in (logs or {}).items():
                    try:
                        value = float(value)
                    except (TypeError, ValueError):
                        continue
                    if not math.isfinite(value):
                        self.message = (
                            f"training stopped: `{key}` became {value} at batch {batch}; "
                            "lower the learning rate or check the inputs for NaN/Inf."
                        )
                        self.model.stop_training = True
                        return

        return NonFiniteGuard()


def train(config: TrainConfig, log=print) -> dict:
    """Train, evaluate and save one run. Returns `{"run_dir", "report", "model"}`."""
    import keras
    import numpy as np
    import tensorflow as tf

    from tfp_seg import distribute
    from tfp_seg.evaluation import evaluate_ambiguous, format_report

    config.validate()
    strategy = distribute.get_strategy(config.strategy)
    run_dir = _prepare_run_dir(config)
    if not distribute.is_chief(strategy):
        # Every worker of a multi-worker job runs this; only the chief writes the run folder
        # (and exports: cmd_train reads config.export after train returns).
        run_dir = distribute.worker_dir(run_dir, strategy)
        config.export = False
    atomic_write_json(os.path.join(run_dir, "config.json"), dataclasses.asdict(config))
    train_data, val_data, test_data = make_data(config)
    log(
        f"data: ambiguous_shapes {config.image_size}x{config.image_size}, "
        f"{len(train_data)} train / {len(val_data)} val / {len(test_data)} test images, "
        f"{train_data.num_annotations} annotations each"
    )
    if strategy.num_replicas_in_sync > 1 or config.mixed_precision:
        log(
            f"strategy: {type(strategy).__name__}, {strategy.num_replicas_in_sync} replica(s), "
            f"global batch {config.batch_size}; dtype policy {config.mixed_precision or 'float32'}"
        )
    with distribute.dtype_policy_scope(config.mixed_precision), strategy.scope():
        model = build_model(config, train_data.num_classes)
        _compile(model, config)
        members = model.members if config.head == "ensemble" else [model]
        if config.resume:  # BackupAndRestore restores into built models
            shape = (None,) + tuple(train_data.images.shape[1:])
            for member in members:
                member.build(shape)
    train_ds = train_data.to_dataset(
        batch_size=config.batch_size, shuffle=True, annotation="random", seed=config.seed
    )
    val_ds = val_data.to_dataset(batch_size=config.batch_size, shuffle=False, annotation="first")
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        train_ds, val_ds = distribute.shard_by_data(train_ds), distribute.shard_by_data(val_ds)
    # Keras fails on a first batch that does not split over the replicas: a split smaller than
    # one global batch is trimmed to a multiple of them (see distribute.divisible_batches).
    replicas = strategy.num_replicas_in_sync
    if config.batch_size % replicas:
        raise ValueError(
            f"--batch-size {config.batch_size} is the global batch and must split evenly over "
            f"the {replicas} replicas of the {type(strategy).__name__}"
        )
    for name, part in (("train", train_data), ("validation", val_data)):
        if len(part) < config.batch_size and len(part) % replicas:
            log(f"{len(part) % replicas} {name} image(s) left out: {replicas} replicas")
    if len(train_data) < config.batch_size:
        train_ds = distribute.divisible_batches(train_ds, replicas)
    if len(val_data) < config.batch_size:
        val_ds = distribute.divisible_batches(val_ds, replicas)
    start = time.time()
    histories = []
    for i, member in enumerate(members):
        if len(members) > 1:
            log(f"ensemble member {i + 1}/{len(members)}")
        guard = _NonFiniteGuard.make()
        callbacks = [guard]
        member_ds, steps = train_ds, None
        if config.resume:
            backup_dir = os.path.join(run_dir, "backup")
            if len(members) > 1:
                backup_dir = os.path.join(backup_dir, f"member-{i}")
            backup = distribute.BackupAndRestore(  # run_dir is already per worker
                backup_dir, delete_checkpoint=False, strategy=strategy, per_worker=False
            )
            callbacks.append(backup)
            # One seeded, repeated stream (its order depends on the seed alone): a resumed
            # run skips exactly the batches of the completed epochs.
            steps = -(-len(train_data) // config.batch_size)
            member_ds = distribute.seeded_stream(
                lambda seed=config.seed + i: train_data.to_dataset(
                    batch_size=config.batch_size, shuffle=True, annotation="random",
                    seed=seed, repeat=True,
                )
            )
            if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
                member_ds = distribute.shard_by_data(member_ds)
            done = backup.completed_epochs()
            if done:
                log(f"resuming from {backup.backup_dir}: {done}/{config.epochs} epochs done")
                member_ds = distribute.skip_epochs(member_ds, done, steps)
        history = member.fit(
            member_ds,
            validation_data=val_ds,
            epochs=config.epochs,
            steps_per_epoch=steps,
            verbose=1 if config.progress else 0,
            callbacks=callbacks,
        )
        if guard.message:
            raise FloatingPointError(guard.message)
        history = backup.history if config.resume else history.history
        histories.append({k: [float(v) for v in vals] for k, vals in history.items()})
    train_seconds = time.time() - start
    hist = histories[0] if len(histories) == 1 else _mean_history(histories)
    atomic_write_json(os.path.join(run_dir, "history.json"), hist)
    saved = save_model(model, run_dir, config)
    if config.resume:  # the saved model supersedes the backup
        import shutil

        shutil.rmtree(os.path.join(run_dir, "backup"), ignore_errors=True)

    report = evaluate_ambiguous(
        sampler_for(model, config),
        test_data,
        num_samples=config.eval_samples,
        seed=config.seed,
        progress=config.progress,
    )
    report.update(
        {
            "run": os.path.basename(run_dir),
            "head": config.head,
            "model": config.model,
            "backbone": config.backbone,
            "epochs": config.epochs,
            "train_seconds": round(train_seconds, 2),
            "final_train_loss": hist["loss"][-1],
            "params": int(sum(m.count_params() for m in members)),
        }
    )
    if np.isfinite(hist.get("val_loss", [np.nan])[-1]):
        report["final_val_loss"] = hist["val_loss"][-1]
    from tfp_seg.reporting import write_report

    # report.json, report.md (a table a person reads) and PNG figures under figures/.
    write_report(
        run_dir,
        report,
        sampler_for(model, config),
        test_data,
        num_samples=config.eval_samples,
        seed=config.seed,
        config=dataclasses.asdict(config),
        progress=config.progress,
    )
    log(format_report(report))
    log(f"wrote {os.path.join(run_dir, 'report.json')} and {saved}")
    keras.backend.clear_session(free_memory=False)
    return {"run_dir": run_dir, "report": report, "model": model}


def load_run(path: str, config: Optional[TrainConfig] = None):
    """Load a run's model from its folder (`runs/<name>`) or a `.keras` file, `safe_mode=True`.

    Ensembles load as `DeepEnsemble` (from `<run>/ensemble/`); MC-dropout runs come back
    wrapped in `MCDropout` so that `sample_logits` samples dropout masks.
    """
    import keras

    import tfp_seg  # noqa: F401  (registers the serialisable classes)

    config = config or TrainConfig()
    if os.path.isdir(path) and os.path.isdir(os.path.join(path, "ensemble")):
        from tfp_seg.uncertainty import DeepEnsemble

        try:
            return DeepEnsemble.load(os.path.join(path, "ensemble"))
        except Exception as exc:
            raise ValueError(f"could not load ensemble in {path!r}: {exc}") from exc
    model_path = os.path.join(path, "model.keras") if os.path.isdir(path) else path
    if not os.path.isfile(model_path):
        raise FileNotFoundError(
            f"no model found at {model_path!r} (expected a run folder or a .keras file)"
        )
    try:
        model = keras.models.load_model(model_path, safe_mode=True)
    except Exception as exc:
        raise ValueError(f"could not load model {model_path!r}: {exc}") from exc
    return sampler_for(model, config)
