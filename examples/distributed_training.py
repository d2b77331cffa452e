"""Data-parallel training of an SSN with tf.distribute: one host (mirrored) or several (TF_CONFIG).

Without TF_CONFIG the script trains on one machine with `MirroredStrategy`: over all GPUs when
there are two or more, otherwise over `--replicas` logical CPU devices (the CPU split by
`tfp_seg.distribute.logical_cpus`, which shows the mechanics but gives no speed-up). With
TF_CONFIG naming a cluster it runs one worker of a `MultiWorkerMirroredStrategy` job; start the
same command on every worker with its own TF_CONFIG (the chief, worker 0, writes the outputs;
the others write under `<out>/workers/`).

`--batch-size` is the global batch: each of the R replicas gets batch/R examples, Keras divides
each replica's mean loss by R, and the strategy sums the gradients, so a step is the
single-device step on the whole batch. Every epoch is backed up to `<out>/backup`
(`tfp_seg.distribute.BackupAndRestore`); rerun the same command after an interruption to
continue from the last completed epoch.

Single host (2 logical CPUs, or all GPUs):
    python examples/distributed_training.py --epochs 3 --out runs/distributed

Two workers on one machine, two shells (use the hosts' addresses across machines):
    TF_CONFIG='{"cluster": {"worker": ["127.0.0.1:12345", "127.0.0.1:12346"]},
                "task": {"type": "worker", "index": 0}}' \\
        python examples/distributed_training.py --out runs/mw
    TF_CONFIG='{"cluster": {"worker": ["127.0.0.1:12345", "127.0.0.1:12346"]},
                "task": {"type": "worker", "index": 1}}' \\
        python examples/distributed_training.py --out runs/mw

Prints the strategy, the number of replicas, and one line per epoch (loss, seconds).
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8, help="global batch (default 8)")
    parser.add_argument(
        "--replicas",
        type=int,
        default=2,
        help="logical CPU replicas when there is no GPU and no TF_CONFIG",
    )
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--num-images", type=int, default=160)
    parser.add_argument("--num-samples", type=int, default=8, help="MC samples in the SSN loss")
    parser.add_argument(
        "--mixed-precision",
        default=None,
        choices=["mixed_float16", "mixed_bfloat16"],
        help="dtype policy of the backbone (the head stays float32)",
    )
    parser.add_argument("--out", default="runs/distributed")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def make_strategy(replicas: int):
    """Multi-worker if TF_CONFIG is set, else mirrored (GPUs, or logical CPUs)."""
    import tensorflow as tf

    from tfp_seg import distribute

    if os.environ.get("TF_CONFIG"):
        return distribute.get_strategy("multi_worker")
    if len(tf.config.list_physical_devices("GPU")) < 2:
        # Must run before TensorFlow initialises its devices (first op or tensor).
        return distribute.get_strategy("mirrored", devices=distribute.logical_cpus(replicas))
    return distribute.get_strategy("mirrored")


def main(argv=None) -> dict:
    args = parse_args(argv)
    strategy = make_strategy(args.replicas)  # first: before any other TensorFlow work

    import keras

    import tfp_seg
    from tfp_seg import distribute

    keras.utils.set_random_seed(args.seed)  # the same seed on every worker
    chief = distribute.is_chief(strategy)
    os.makedirs(args.out, exist_ok=True)
    out = distribute.worker_dir(args.out, strategy)  # <out>/workers/worker-<i> off the chief
    print(
        f"strategy {type(strategy).__name__}: {strategy.num_replicas_in_sync} replica(s), "
        f"global batch {args.batch_size}, chief={chief}",
        flush=True,
    )

    data = tfp_seg.data.ambiguous_shapes(
        num_images=args.num_images, image_size=args.image_size, seed=args.seed
    )
    train, val, _ = data.train_val_test()
    # One seeded, repeated stream with steps_per_epoch: its order depends on the seed alone,
    # so a resumed run can skip exactly the batches it already trained on.
    steps = len(train) // args.batch_size
    train_ds = distribute.shard_by_data(
        distribute.seeded_stream(
            lambda: train.to_dataset(
                batch_size=args.batch_size, seed=args.seed, repeat=True, drop_remainder=True
            )
        )
    )
    # A last batch that does not split evenly over the replicas fails in Keras: trim it.
    val_ds = distribute.shard_by_data(
        distribute.divisible_batches(
            val.to_dataset(batch_size=args.batch_size, shuffle=False, annotation="first"),
            strategy.num_replicas_in_sync,
        )
    )

    with distribute.dtype_policy_scope(args.mixed_precision), strategy.scope():
        model = tfp_seg.models.ProbabilisticSegmenter(
            tfp_seg.models.UNet(base_filters=8, depth=2),
            tfp_seg.layers.LowRankLogits(data.num_classes, rank=5),
        )
        model.build((None, args.image_size, args.image_size, data.images.shape[-1]))
        model.compile(
            optimizer=keras.optimizers.Adam(1e-3),
            loss=model.head.default_loss(num_samples=args.num_samples),
        )

    backup = distribute.BackupAndRestore(os.path.join(args.out, "backup"), strategy=strategy)
    done = backup.completed_epochs()
    if done:
        print(f"resuming after epoch {done}", flush=True)
        train_ds = distribute.skip_epochs(train_ds, done, steps)
    start = time.time()

    class EpochLog(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            logs = logs or {}
            print(
                f"epoch {epoch + 1:3d}  loss {logs.get('loss', float('nan')):.4f}  "
                f"val_loss {logs.get('val_loss', float('nan')):.4f}  "
                f"({time.time() - start:5.1f} s)",
                flush=True,
            )

    model.fit(
        train_ds,
        validation_data=val_ds,
        epochs=args.epochs,
        steps_per_epoch=steps,
        verbose=0,
        callbacks=[backup, EpochLog()],
    )
    summary = {
        "strategy": type(strategy).__name__,
        "replicas": strategy.num_replicas_in_sync,
        "chief": chief,
        "history": backup.history,
        "train_seconds": round(time.time() - start, 2),
    }
    model.save(os.path.join(out, "model.keras"))
    with open(os.path.join(out, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    print(f"wrote {os.path.join(out, 'model.keras')} and summary.json", flush=True)
    return summary


if __name__ == "__main__":
    main()
