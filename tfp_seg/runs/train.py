"""Train one run: the run folder, the training loop (strategies, resume, ensembles) and the
saved model. Evaluation and the report follow in `tfp_seg.runs.evaluate`.

```none
<output_dir>/<name>/config.json    the resolved configuration
<output_dir>/<name>/history.json   per-epoch losses; validation curves (tfp_seg.runs.monitor)
<output_dir>/<name>/model.keras    the trained model (ensemble/: one .keras per member)
<output_dir>/<name>/backup/        per-epoch backup of a --resume run (deleted at the end)
```

On NIfTI volumes (`config.patch_data`) the model trains on the random patches of
`tfp_seg.runs.volumes.patch_datasets` (`patches_per_epoch` per epoch) and is evaluated on
whole volumes by its sliding-window sampler.

Every file is written with `tfp_seg._io` (temporary name, fsync, rename), so an interrupted run
never leaves a half-written file in place of a good one.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import time

import keras
import tensorflow as tf

from tfp_seg import _interrupt, distribute, losses
from tfp_seg._io import atomic_dir, atomic_path, atomic_write_json
from tfp_seg.runs import monitor as validation
from tfp_seg.runs import volumes
from tfp_seg.runs.config import TrainConfig
from tfp_seg.runs.data import describe, make_data, write_split
from tfp_seg.runs.evaluate import evaluate_trained
from tfp_seg.runs.model import build_model, compile_model

__all__ = ["NonFiniteGuard", "atomic_save_model", "save_model", "train"]


class NonFiniteGuard(keras.callbacks.Callback):
    """Stops training with a message (`.message`) naming the quantity that became non-finite."""

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


class InterruptGuard(keras.callbacks.Callback):
    """Raises `KeyboardInterrupt` at the next batch once a Ctrl-C was recorded (`_interrupt`),
    even when the `KeyboardInterrupt` raised where the signal landed was swallowed."""

    def _check(self, *args, **kwargs):
        if _interrupt.requested():
            raise KeyboardInterrupt

    on_train_batch_end = on_test_batch_end = on_epoch_end = _check


def atomic_save_model(model, path: str) -> None:
    """`model.save` to a temporary `.keras` name next to `path`, then an atomic rename."""
    with atomic_path(path) as tmp:
        model.save(tmp)


def save_model(model, run_dir: str, config: TrainConfig) -> str:
    """Save a run's model: `model.keras`, or `ensemble/` (one `.keras` per member)."""
    if config.head == "ensemble":
        target = os.path.join(run_dir, "ensemble")
        with atomic_dir(target) as tmp:
            model.save(tmp)
        return target
    path = os.path.join(run_dir, "model.keras")
    atomic_save_model(model, path)
    return path


def _mean_history(histories):
    """A deep ensemble's history: the members' per-epoch values averaged; the validation
    curves of the last member, which are the whole ensemble's (`monitor.validation_sampler`);
    every member's own as `member_<i>/<key>`."""
    keys = set.intersection(*(set(h) for h in histories)) - set(validation.CURVE_KEYS)
    mean = {
        k: [float(sum(vals) / len(vals)) for vals in zip(*(h[k] for h in histories), strict=True)]
        for k in sorted(keys)
    }
    mean |= {k: v for k, v in histories[-1].items() if k in validation.CURVE_KEYS}
    return mean | {f"member_{i}/{k}": v for i, h in enumerate(histories) for k, v in h.items()}


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


def cosine_schedule(learning_rate: float, epochs: int) -> keras.callbacks.Callback:
    """Cosine decay by epoch, `lr_e = learning_rate * (1 + cos(pi e / epochs)) / 2` at the start
    of epoch `e = 0..epochs-1` (from `learning_rate` towards 0). It depends on the epoch index
    alone, so a resumed run continues the same schedule."""

    def rate(epoch: int, _lr=None) -> float:
        return float(learning_rate * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs)))

    return keras.callbacks.LearningRateScheduler(rate)


def constant_schedule(learning_rate: float) -> keras.callbacks.Callback:
    """`learning_rate` in every epoch: what Adam runs at anyway, set by a callback so that
    `history.json` records the rate of every run, whatever its schedule."""

    def rate(epoch: int, _lr=None) -> float:
        return float(learning_rate)

    return keras.callbacks.LearningRateScheduler(rate)


def train(config: TrainConfig, log=print) -> dict:
    """Train, evaluate and save one run. Returns `{"run_dir", "report", "model"}`."""
    config.validate()
    strategy = distribute.get_strategy(config.strategy)
    parts = make_data(config)  # before anything is written: a bad data source fails first
    if config.patch_data:  # the validation and test volumes are evaluated stacked
        volumes.evaluation_shapes(parts[1:])
    run_dir = _prepare_run_dir(config)
    if not distribute.is_chief(strategy):
        # Every worker of a multi-worker job runs this; only the chief writes the run folder
        # (and exports: cmd_train reads config.export after train returns).
        run_dir = distribute.worker_dir(run_dir, strategy)
        config.export = False
    train_data, val_data, test_data = parts
    atomic_write_json(os.path.join(run_dir, "config.json"), dataclasses.asdict(config))
    write_split(run_dir, config, parts)
    log(describe(config, parts))
    if strategy.num_replicas_in_sync > 1 or config.mixed_precision:
        log(
            f"strategy: {type(strategy).__name__}, {strategy.num_replicas_in_sync} replica(s), "
            f"global batch {config.batch_size}; dtype policy {config.mixed_precision or 'float32'}"
        )
    patches = config.patch_data  # NIfTI volumes: random patches (tfp_seg.runs.volumes)
    if patches:
        input_shape = (config.patch_size,) * 3 + (len(train_data.volumes.modalities),)
    else:
        input_shape = tuple(train_data.images.shape[1:])
    with distribute.dtype_policy_scope(config.mixed_precision), strategy.scope():
        model = build_model(config, train_data.num_classes, input_shape)
        compile_model(model, config)
        members = model.members if config.head == "ensemble" else [model]
        if config.resume:  # BackupAndRestore restores into built models
            for member in members:
                member.build((None,) + input_shape)
    if patches:
        train_ds, val_ds, patch_steps = volumes.patch_datasets(config, train_data, val_data)
    else:
        train_ds = train_data.to_dataset(
            batch_size=config.batch_size,
            shuffle=True,
            annotation=config.annotations,
            seed=config.seed,
            augment=config.augment,
        )
        val_ds = val_data.to_dataset(
            batch_size=config.batch_size, shuffle=False, annotation="first"
        )
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        train_ds = distribute.shard_by_data(train_ds)
        val_ds = val_ds if val_ds is None else distribute.shard_by_data(val_ds)
    # Keras fails on a first batch that does not split over the replicas: a split smaller than
    # one global batch is trimmed to a multiple of them (see distribute.divisible_batches).
    replicas = strategy.num_replicas_in_sync
    if config.batch_size % replicas:
        raise ValueError(
            f"--batch-size {config.batch_size} is the global batch and must split evenly over "
            f"the {replicas} replicas of the {type(strategy).__name__}"
        )
    for name, part in (("train", train_data), ("validation", val_data)):
        if not patches and len(part) < config.batch_size and len(part) % replicas:
            log(f"{len(part) % replicas} {name} image(s) left out: {replicas} replicas")
    if not patches and len(train_data) < config.batch_size:  # patches come in whole batches
        train_ds = distribute.divisible_batches(train_ds, replicas)
    if not patches and len(val_data) < config.batch_size:
        val_ds = distribute.divisible_batches(val_ds, replicas)
    start = time.time()
    histories, monitors = [], []
    for i, member in enumerate(members):
        if len(members) > 1:
            log(f"ensemble member {i + 1}/{len(members)}")
        guard = NonFiniteGuard()
        callbacks = [guard, InterruptGuard()]
        if config.lr_schedule == "cosine":
            callbacks.append(cosine_schedule(config.learning_rate, config.epochs))
        else:
            callbacks.append(constant_schedule(config.learning_rate))
        if config.mean_warmup_epochs:
            callbacks.append(losses.MeanWarmup(config.mean_warmup_epochs))
        # Before the backup, which then stores the validation values with the epoch's weights.
        monitor = validation.make_monitor(model, config, val_data, strategy, member=i, log=log)
        if monitor is not None:
            callbacks.append(monitor)
            monitors.append(monitor)
        member_ds, steps = train_ds, (patch_steps if patches else None)
        if config.resume:
            backup_dir = os.path.join(run_dir, "backup")
            if len(members) > 1:
                backup_dir = os.path.join(backup_dir, f"member-{i}")
            backup = distribute.BackupAndRestore(  # run_dir is already per worker
                backup_dir, delete_checkpoint=False, strategy=strategy, per_worker=False
            )
            callbacks.append(backup)
            # One seeded, repeated stream (its order depends on the seed alone): a resumed
            # run skips exactly the batches of the completed epochs. (A patch stream is one:
            # patch k depends on the seed and k alone.)
            if not patches:
                steps = -(-len(train_data) // config.batch_size)
                member_ds = distribute.seeded_stream(
                    lambda seed=config.seed + i: train_data.to_dataset(
                        batch_size=config.batch_size,
                        shuffle=True,
                        annotation=config.annotations,
                        seed=seed,
                        repeat=True,
                        augment=config.augment,
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
        histories.append(validation.history_record(history))
    train_seconds = time.time() - start
    hist = histories[0] if len(histories) == 1 else _mean_history(histories)
    if monitors and validation.EPOCHS_KEY in hist:
        hist.update(monitors[-1].reference_values())
    atomic_write_json(os.path.join(run_dir, "history.json"), hist)
    saved = save_model(model, run_dir, config)
    if config.resume:  # the saved model supersedes the backup
        shutil.rmtree(os.path.join(run_dir, "backup"), ignore_errors=True)

    facts = {
        "epochs": config.epochs,
        "train_seconds": round(train_seconds, 2),
        "final_train_loss": hist["loss"][-1],
        "params": int(sum(m.count_params() for m in members)),
    }
    if math.isfinite(hist.get("val_loss", [math.nan])[-1]):
        facts["final_val_loss"] = hist["val_loss"][-1]
    if monitors:
        facts["val_seconds"] = round(sum(m.seconds for m in monitors), 2)
    facts.update(validation.report_facts(hist))
    report = evaluate_trained(model, config, test_data, run_dir, facts=facts, log=log)
    log(f"wrote {os.path.join(run_dir, 'report.json')} and {saved}")
    keras.backend.clear_session(free_memory=False)
    return {"run_dir": run_dir, "report": report, "model": model}
