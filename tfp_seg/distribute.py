"""Training at scale with `tf.distribute`: strategies, per-replica losses and noise, resumption.

Everything a `tfp_seg` model needs to train under a `tf.distribute.Strategy`:

```none
get_strategy("auto")                 TPU if one is attached, multi-worker if TF_CONFIG names a
                                     cluster, Mirrored over >1 GPU, else the default strategy
get_strategy("mirrored")             one host, all local GPUs (or all logical CPUs)
get_strategy("multi_worker")         MultiWorkerMirroredStrategy; hosts from TF_CONFIG
logical_cpus(2)                      split the CPU into 2 logical devices (tests, examples)
average_loss(per_example, B_global)  sum / global batch: the `tf.nn.compute_average_loss` rule
replica_seed(seed)                   a stateless seed made distinct for every replica
is_chief(), worker_dir(path)         who writes shared files in a multi-worker job
shard_by_data(ds)                    AutoShardPolicy.DATA for in-memory datasets
divisible_batches(ds, R)             trim a partial last batch to a multiple of R replicas
BackupAndRestore(dir)                keras' BackupAndRestore, atomic and multi-worker aware
seeded_stream(make), skip_epochs     an input stream fixed by its seeds; resume it after k epochs
dtype_policy_scope("mixed_float16")  build a model under a mixed-precision policy
```

Keras 3 (3.15) cannot `fit` under a multi-worker `MultiWorkerMirroredStrategy` as shipped
(keras-team/keras#20585); `get_strategy` installs a narrow fix when it creates one (see
`_patch_keras_multi_worker`).

#### Losses under a strategy

Gradients of the replicas are *summed* by the strategy, so each replica must contribute its
share of the global-batch mean:

```none
loss_replica = sum_{b in replica} loss_b / B_global          (= mean_replica / R, equal splits)
```

`ProbabilisticSegmenter` trains through Keras' own `train_step`: its losses (Keras `Loss`
objects with `reduction="sum_over_batch_size"`) are divided by the number of replicas by Keras
(`keras.losses.Loss.__call__` -> `scale_loss_for_distribution`), as are regularisation losses.
`ProbabilisticUNet.train_step` divides its batch-mean ELBO by the replica count itself.
Both equal the single-device loss when the global batch splits evenly over the replicas
(checked in `tests/test_distribute.py` to 1e-5 on the gradients); with an uneven last batch
Keras weights the replicas' means equally, not their examples. `average_loss` gives the exact
rule for custom training loops.

#### Monte Carlo noise per replica

Every replica runs the same program on a different slice of the batch. Noise drawn from a
*stateless* seed (`seed=<int>`) would therefore be the same on every replica: example `b` of
replica 0 and example `b` of replica 1 would share their noise, correlating the Monte Carlo
estimates across the global batch. `tfp_seg.distributions.standard_normal` (used by every head,
loss and latent sampler) folds `replica_id_in_sync_group` into the seed when more than one
replica is in sync, via `replica_seed`. With `seed=None` the stateful `tf.random.uniform` ops of
different replicas of one process already differ (each replica has its own op), but the
replicas of different *workers* are built from the same graph and global seed and would draw
the same numbers; there a fresh seed is drawn from the stateful RNG and the replica id is
folded into it too. Outside a strategy (or with one replica) nothing changes, so exported
graphs keep their plain `RandomUniform` ops.

#### Fault tolerance

`BackupAndRestore` is `keras.callbacks.BackupAndRestore` with the writes made atomic (a
weights file is written under a new name, then the metadata that names it is renamed into
place, so a `SIGKILL` at any moment leaves a consistent backup), the per-epoch logs kept in the
backup (a resumed run's history is complete), and non-chief workers of a multi-worker job
writing to their own folder. With `save_freq="epoch"` a resumed run repeats no epoch and skips
none; with an integer `save_freq` it restarts the interrupted epoch from its first batch with
the weights of the last backup (Keras' rule).

The backup holds the model and optimiser state, not the input pipeline's or the stateful
RNG's. For the *same* data order as an uninterrupted run, feed one seeded, repeated stream
(`seeded_stream`) with `steps_per_epoch` and skip the completed epochs (`skip_epochs`);
`tfp-seg train --resume` does. Monte Carlo noise drawn with `seed=None` comes from the
stateful RNG, which restarts with the process: a resumed SSN run is statistically equivalent
to an uninterrupted one, not bit-identical (a deterministic head, with
`enable_op_determinism`, is).
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import keras
import tensorflow as tf

__all__ = [
    "STRATEGIES",
    "POLICIES",
    "get_strategy",
    "logical_cpus",
    "num_replicas",
    "replica_id",
    "replica_seed",
    "average_loss",
    "is_chief",
    "worker_dir",
    "shard_by_data",
    "divisible_batches",
    "seeded_stream",
    "skip_epochs",
    "dtype_policy_scope",
    "BackupAndRestore",
]

STRATEGIES = ("auto", "default", "mirrored", "multi_worker", "tpu")
POLICIES = (None, "float32", "mixed_float16", "mixed_bfloat16")


# --- devices and strategies -------------------------------------------------------------------
def logical_cpus(n: int) -> list:
    """Split the first physical CPU into `n` logical devices; returns their names.

    Lets `tf.distribute.MirroredStrategy` run `n` replicas on one CPU (tests, examples, trying
    out a distributed setup without accelerators). TensorFlow fixes its devices when it first
    initialises them (the first op, tensor or device listing of logical devices), so call this at
    the very start of the program; afterwards it raises `RuntimeError` unless the CPU is
    already split into `n` devices. Process-global: tests call it in a subprocess.

    Returns:
      `["/device:CPU:0", ..., "/device:CPU:<n-1>"]`.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"`n` must be a positive int; got {n!r}.")
    cpu = tf.config.list_physical_devices("CPU")[0]
    current = tf.config.get_logical_device_configuration(cpu)
    if current is None or len(current) != n:
        try:
            tf.config.set_logical_device_configuration(
                cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(n)]
            )
        except RuntimeError as exc:
            raise RuntimeError(
                f"logical_cpus({n}) must be called before TensorFlow initialises its devices "
                f"(before the first op or tensor); they are already set: {exc}"
            ) from exc
    return [d.name for d in tf.config.list_logical_devices("CPU")]


def _tf_config() -> dict:
    raw = os.environ.get("TF_CONFIG", "")
    if not raw.strip():
        return {}
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"TF_CONFIG is not valid JSON ({exc}): {raw[:200]!r}") from exc
    if not isinstance(config, dict) or not isinstance(config.get("cluster", {}), dict):
        raise ValueError(
            'TF_CONFIG must be a JSON object {"cluster": {"worker": [...]}, '
            f'"task": {{"type": "worker", "index": i}}}}; got {raw[:200]!r}.'
        )
    return config


def _num_cluster_tasks(config: dict) -> int:
    cluster = config.get("cluster", {})
    return sum(len(cluster.get(kind, [])) for kind in ("chief", "worker"))


def _tpu_hint() -> bool:
    # Only probe for a TPU where one can be expected: the resolver's default lookup talks to
    # the GCE metadata server and can block for a long time elsewhere.
    if os.environ.get("TPU_NAME") or os.environ.get("COLAB_TPU_ADDR"):
        return True
    try:
        return bool(tf.config.list_physical_devices("TPU"))
    except Exception:  # pragma: no cover - platform dependent
        return False


def _tpu_strategy(tpu: Optional[str]):
    try:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu)
        if tpu not in (None, "", "local"):
            tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver)
    except Exception as exc:
        raise ValueError(
            f"strategy 'tpu': no TPU could be reached (tpu={tpu!r}): {str(exc).rstrip('.')}. "
            "Pass the TPU's name or grpc:// address as `devices`, or use 'auto' to fall back "
            "to GPUs/CPU."
        ) from exc


def get_strategy(
    name: str = "auto", devices: Optional[Union[str, Sequence[str]]] = None
) -> tf.distribute.Strategy:
    """A `tf.distribute.Strategy` by name.

    ```none
    "auto"          TPU if TPU_NAME / COLAB_TPU_ADDR is set or a local TPU is listed and it can
                    be initialised; else MultiWorkerMirrored if TF_CONFIG names >1 task; else
                    Mirrored over the local GPUs if there are 2 or more; else the default
    "default"       tf.distribute.get_strategy(): no distribution (one device)
    "mirrored"      MirroredStrategy over `devices`, or all GPUs, or all logical CPUs
    "multi_worker"  MultiWorkerMirroredStrategy; the cluster comes from TF_CONFIG
    "tpu"           TPUStrategy; `devices` is the TPU name / grpc address (None: the default)
    ```

    Create it at the start of the program, before building models: `MultiWorkerMirrored`
    must exist before TensorFlow initialises its devices, and models (and optimisers) must
    be built and compiled under `strategy.scope()`. `batch_size` passed to `fit` is the
    *global* batch, split over `strategy.num_replicas_in_sync` replicas.

    Args:
      name: one of `STRATEGIES`.
      devices: device names for "mirrored" (e.g. `logical_cpus(2)` or `["/gpu:0", "/gpu:1"]`),
        the TPU for "tpu"; must be None otherwise.

    Raises:
      ValueError: unknown name, `devices` where they do not apply, "multi_worker" without a
        TF_CONFIG cluster, or "tpu" with no reachable TPU.
    """
    if name not in STRATEGIES:
        raise ValueError(f"`name` must be one of {STRATEGIES}; got {name!r}.")
    if devices is not None and name not in ("mirrored", "tpu"):
        raise ValueError(
            f"`devices` applies to 'mirrored' and 'tpu' only; got devices={devices!r} with "
            f"{name!r}."
        )
    if name == "auto":
        if _tpu_hint():
            try:
                return _tpu_strategy(None)
            except ValueError:
                pass
        if _num_cluster_tasks(_tf_config()) > 1:
            return _multi_worker_strategy()
        gpus = tf.config.list_logical_devices("GPU")
        if len(gpus) > 1:
            return tf.distribute.MirroredStrategy([d.name for d in gpus])
        return tf.distribute.get_strategy()
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "tpu":
        if devices is not None and not isinstance(devices, str):
            raise ValueError(f"`devices` for 'tpu' is the TPU's name or address; got {devices!r}.")
        return _tpu_strategy(devices)
    if name == "multi_worker":
        config = _tf_config()
        if _num_cluster_tasks(config) < 1 or "task" not in config:
            raise ValueError(
                "strategy 'multi_worker' needs TF_CONFIG describing the cluster and this task, "
                'e.g. {"cluster": {"worker": ["host1:12345", "host2:12345"]}, '
                '"task": {"type": "worker", "index": 0}}; use "mirrored" on one machine.'
            )
        return _multi_worker_strategy()
    # mirrored
    if devices is None:
        gpus = tf.config.list_logical_devices("GPU")
        devices = [d.name for d in (gpus or tf.config.list_logical_devices("CPU"))]
    elif isinstance(devices, str):
        devices = [devices]
    devices = list(devices)
    if not devices:
        raise ValueError("`devices` for 'mirrored' must name at least one device; got [].")
    return tf.distribute.MirroredStrategy(devices)


def _multi_worker_strategy() -> tf.distribute.MultiWorkerMirroredStrategy:
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    _patch_keras_multi_worker()
    return strategy


def _in_multi_worker_mode(strategy) -> bool:
    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) and bool(
        strategy.extended._in_multi_worker_mode()
    )


def _patch_keras_multi_worker() -> bool:
    """Work around Keras 3's broken `fit` under a multi-worker `MultiWorkerMirroredStrategy`.

    Keras 3 (checked on 3.15; keras-team/keras#20585, tensorflow/tensorflow#72388) fails in
    two places when more than one worker is in sync:

    - `TensorFlowTrainer._maybe_symbolic_build` averages the first *data batch* over the
      workers with `strategy.reduce("MEAN", (x, y), axis=None)`, which raises on the tuple
      (and would average integer labels). Fixed: build from this worker's first local batch;
      only shapes and dtypes matter there.
    - `reduce_per_replica(..., "auto")` reduces the per-step logs with
      `strategy.reduce("MEAN", v, axis=0)`, which raises on the scalar losses and metrics.
      Fixed: `axis=None` (the mean over replicas, as Keras does for one worker).

    The replacements fall through to Keras' own code unless the strategy is a multi-worker
    `MultiWorkerMirroredStrategy`. Installed once, when `get_strategy` creates such a
    strategy; returns False (and changes nothing) if Keras' internals are not as expected.
    """
    global _KERAS_PATCHED
    if _KERAS_PATCHED:
        return True
    try:
        from keras.src import tree
        from keras.src.backend.tensorflow import trainer as tf_trainer

        trainer_cls = tf_trainer.TensorFlowTrainer
        original_build = trainer_cls._maybe_symbolic_build
        original_reduce = tf_trainer.reduce_per_replica
    except (ImportError, AttributeError):  # pragma: no cover - other Keras versions
        return False

    def local_first(value, strategy):
        if isinstance(value, tf.distribute.DistributedValues):
            return strategy.experimental_local_results(value)[0]
        return value

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        strategy = self._distribute_strategy
        if strategy is None or iterator is None or not _in_multi_worker_mode(strategy):
            return original_build(self, iterator=iterator, data_batch=data_batch)
        for _, _, it in iterator:
            data_batch = tree.map_structure(lambda v: local_first(v, strategy), next(it))
            break
        with strategy.scope():
            self._symbolic_build(data_batch=data_batch)

    def reduce_per_replica(values, strategy, reduction):
        if reduction in ("auto", "mean") and _in_multi_worker_mode(strategy):
            return tree.map_structure(lambda v: strategy.reduce("MEAN", v, axis=None), values)
        return original_reduce(values, strategy, reduction)

    trainer_cls._maybe_symbolic_build = _maybe_symbolic_build
    tf_trainer.reduce_per_replica = reduce_per_replica
    _KERAS_PATCHED = True
    return True


_KERAS_PATCHED = False


# --- replicas ------------------------------------------------------------------------------------
def num_replicas() -> int:
    """Replicas in sync of the current strategy (1 outside any strategy)."""
    return int(tf.distribute.get_strategy().num_replicas_in_sync)


def replica_id():
    """`replica_id_in_sync_group` in a replica context (a Python int or scalar tensor), else 0."""
    ctx = tf.distribute.get_replica_context()
    return 0 if ctx is None else ctx.replica_id_in_sync_group


def _replicated_context():
    ctx = tf.distribute.get_replica_context()
    if ctx is None or ctx.num_replicas_in_sync <= 1:
        return None
    return ctx


def replica_seed(seed):
    """A seed made distinct for each replica in sync (unchanged with one replica).

    Args:
      seed: None (stateful sampling), an int, or a shape-[2] int seed.

    Returns:
      Outside a strategy, in cross-replica context, or with one replica: `seed` unchanged.
      Otherwise a shape-[2] int64 stateless seed, `fold_in(seed, replica_id)`; for
      `seed=None` the base seed is drawn from the stateful RNG first (so it still changes from
      step to step), then the replica id is folded in (so workers sharing a global seed still
      differ).
    """
    ctx = _replicated_context()
    if ctx is None:
        return seed
    if seed is None:
        base = tf.random.uniform([2], minval=0, maxval=2**31 - 1, dtype=tf.int32)
    elif isinstance(seed, int):
        base = tf.constant([seed, 0], tf.int64)
    else:
        base = tf.convert_to_tensor(seed)
    base = tf.cast(base, tf.int64)
    replica = tf.cast(ctx.replica_id_in_sync_group, tf.int32)
    return tf.cast(tf.random.experimental.stateless_fold_in(base, replica), tf.int64)


def average_loss(per_example_loss, global_batch_size=None, sample_weight=None) -> tf.Tensor:
    """Per-replica share of the global-batch mean, float32 (`tf.nn.compute_average_loss`).

    ```none
    loss = sum_b w_b * loss_b / B_global        (B_global = per-replica batch * replicas)
    ```

    Use it in a custom `train_step` whose gradients the strategy sums over replicas; the sum
    over replicas is then the single-device mean, also with uneven per-replica batches when
    `global_batch_size` is given.

    Args:
      per_example_loss: `[B]` (or `[B, ...]`, reduced over all but the batch axis first).
      global_batch_size: the global batch; default: per-replica batch * replicas.
      sample_weight: optional `[B]` weights.
    """
    loss = tf.cast(tf.convert_to_tensor(per_example_loss), tf.float32)
    if loss.shape.rank is not None and loss.shape.rank == 0:
        raise ValueError("`per_example_loss` must have a batch axis ([B]); got a scalar.")
    if loss.shape.rank is not None and loss.shape.rank > 1:
        loss = tf.reduce_mean(loss, axis=list(range(1, loss.shape.rank)))
    if sample_weight is not None:
        sample_weight = tf.cast(sample_weight, tf.float32)
    return tf.nn.compute_average_loss(
        loss, sample_weight=sample_weight, global_batch_size=global_batch_size
    )


# --- multi-worker housekeeping -------------------------------------------------------------------
def _task(strategy) -> tuple:
    resolver = getattr(strategy, "cluster_resolver", None)
    task_type = getattr(resolver, "task_type", None)
    task_id = getattr(resolver, "task_id", None)
    return task_type, task_id


def is_chief(strategy: Optional[tf.distribute.Strategy] = None) -> bool:
    """True unless this process is a non-chief worker of a multi-worker job.

    The chief is the task of type "chief", or worker 0 when the cluster has no chief. Only the
    chief should write shared files (reports, models, exports).
    """
    strategy = strategy or tf.distribute.get_strategy()
    task_type, task_id = _task(strategy)
    if task_type is None:
        return True
    if task_type == "chief":
        return True
    if task_type == "worker":
        cluster = getattr(strategy.cluster_resolver, "cluster_spec", lambda: None)()
        has_chief = cluster is not None and "chief" in cluster.as_dict()
        return (not has_chief) and task_id == 0
    return False


def worker_dir(path: str, strategy: Optional[tf.distribute.Strategy] = None) -> str:
    """`path` for the chief, `path/workers/<type>-<id>` (created) for the other workers.

    Every worker of a multi-worker job runs the same code; this keeps the non-chief workers'
    writes (backups, logs, models) apart from the chief's.
    """
    strategy = strategy or tf.distribute.get_strategy()
    if is_chief(strategy):
        return path
    task_type, task_id = _task(strategy)
    out = os.path.join(path, "workers", f"{task_type}-{task_id}")
    os.makedirs(out, exist_ok=True)
    return out


def shard_by_data(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """Set `AutoShardPolicy.DATA`: each worker keeps every n-th element (in-memory datasets).

    The default policy (AUTO) first tries to shard by file, which an in-memory dataset
    (`from_tensor_slices`, `tfp_seg.data`) does not have; it then falls back to DATA with a
    warning. Shard by data explicitly; apply before batching or after, as `fit` distributes it.
    """
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.with_options(options)


def divisible_batches(dataset: tf.data.Dataset, num_replicas: int) -> tf.data.Dataset:
    """Trim each batch of `dataset` to a multiple of `num_replicas` examples.

    Keras 3 (3.15, TensorFlow backend) fails under `MirroredStrategy` when the FIRST batch of a
    dataset does not split evenly over the replicas, in `fit` and in `evaluate` alike
    (`InvalidArgumentError: Inputs to operation AddN ... must have the same size and shape`):
    that is a dataset smaller than one global batch, such as a small validation set, with a
    size not divisible by the replica count. (An uneven partial batch after full ones passes.)
    Only a partial last batch can be uneven, so at most `num_replicas - 1` examples of an epoch
    are left out: the last ones of the batch order (with a shuffled training set, different
    ones each epoch). With one replica the dataset is returned unchanged.

    Args:
      dataset: batched; every element's components share the leading batch axis (`(x, y)`,
        `(x, y, sample_weight)`, a dict).
      num_replicas: replicas in sync (`strategy.num_replicas_in_sync`), a positive int.
    """
    if isinstance(num_replicas, bool) or not isinstance(num_replicas, int) or num_replicas < 1:
        raise ValueError(f"num_replicas must be a positive int; got {num_replicas!r}")
    if num_replicas == 1:
        return dataset

    def batch_size(*element):
        return tf.shape(tf.nest.flatten(element)[0])[0]

    def trim(*element):
        keep = batch_size(*element) // num_replicas * num_replicas
        trimmed = tf.nest.map_structure(lambda t: t[:keep], element)
        return trimmed[0] if len(element) == 1 else trimmed

    return dataset.map(trim).filter(lambda *element: batch_size(*element) > 0)


def seeded_stream(make_dataset: Callable[[], tf.data.Dataset]) -> tf.data.Dataset:
    """A dataset whose every iterator yields the same stream: `make_dataset()`, built afresh.

    A shuffling dataset (`shuffle(..., seed=s, reshuffle_each_iteration=True)`,
    `Dataset.random(seed=s, rerandomize_each_iteration=True)`) keeps its seed state in the
    dataset object: every iterator made from it (and every repetition such an iterator reads)
    draws the next seeds. What `fit` sees then depends on how many iterators Keras made and
    how far each read - under a strategy Keras reads one batch for a symbolic build before
    training, with prefetching in the background - which a resumed process cannot replay.
    Wrapped here in `Dataset.range(1).flat_map(...)`, the dataset (and its seed state) is
    rebuilt for each iterator, so each iterator starts the same seeded stream.

    Feed `seeded_stream(lambda: ds.repeat())` with `fit(..., steps_per_epoch=S)` and resume
    with `skip_epochs`: the data order is a function of the seeds alone.

    Args:
      make_dataset: a function of no arguments returning the (batched) dataset.
    """
    cardinality = make_dataset().cardinality()
    stream = tf.data.Dataset.range(1).flat_map(lambda _: make_dataset())
    if cardinality >= 0 or cardinality == tf.data.INFINITE_CARDINALITY:
        stream = stream.apply(tf.data.experimental.assert_cardinality(cardinality))
    return stream


def skip_epochs(dataset: tf.data.Dataset, epochs: int, steps_per_epoch: int) -> tf.data.Dataset:
    """`dataset.skip(epochs * steps_per_epoch)`: resume a seeded, repeated stream exactly.

    For a run fed one repeated stream (`seeded_stream(lambda: ds.repeat())`,
    `fit(..., steps_per_epoch=S)`) and resumed after `k` epochs: the resumed run continues
    with batch `k * S` of the same stream, as an uninterrupted run would. Skipping reads (and
    drops) the skipped batches.

    Args:
      dataset: the repeated (infinite), batched dataset passed to `fit`.
      epochs: completed epochs.
      steps_per_epoch: `S`, the `steps_per_epoch` given to `fit`.
    """
    for name, value in (("epochs", epochs), ("steps_per_epoch", steps_per_epoch)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"`{name}` must be an int >= 0; got {value!r}.")
    if dataset.cardinality() != tf.data.INFINITE_CARDINALITY:
        raise ValueError(
            "skip_epochs expects a repeated (infinite) dataset fed with steps_per_epoch; "
            f"got cardinality {int(dataset.cardinality())}."
        )
    return dataset.skip(epochs * steps_per_epoch) if epochs else dataset


# --- mixed precision -----------------------------------------------------------------------------
@contextlib.contextmanager
def dtype_policy_scope(policy: Optional[str]) -> Iterator[None]:
    """Build layers under a Keras dtype policy, restoring the previous global policy after.

    Layers take the global policy when they are constructed, so build the model inside the
    scope and compile/fit it anywhere. `tfp_seg` heads compute their parameters, samples and
    losses in float32 under every policy; the backbone runs in float16 / bfloat16. Under
    `mixed_float16` Keras wraps the optimiser in a `LossScaleOptimizer` at `compile`.

    Args:
      policy: None or "float32" (no change), "mixed_float16" or "mixed_bfloat16".
    """
    if policy not in POLICIES:
        raise ValueError(f"`mixed_precision` policy must be one of {POLICIES}; got {policy!r}.")
    if policy in (None, "float32"):
        yield
        return
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


# --- fault tolerance -----------------------------------------------------------------------------
_METADATA = "training_metadata.json"
_FORMAT = "tfp_seg.backup/1"


def _atomic_json(path: str, payload: Any) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(payload, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _to_float(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


class BackupAndRestore(keras.callbacks.BackupAndRestore):
    """`keras.callbacks.BackupAndRestore` with atomic writes, full history and worker folders.

    At the end of every epoch (`save_freq="epoch"`) or every `save_freq` batches it writes

    ```none
    <backup_dir>/epoch-<e>-batch-<b>.weights.h5   model + optimiser state (a new file each time)
    <backup_dir>/training_metadata.json           {"epoch", "batch", "weights", "history"}
    ```

    the weights first, then the metadata naming them (renamed into place), then it deletes the
    previous weights file: a kill at any point leaves a metadata file that names a complete
    weights file. On `fit`'s start it restores the weights and optimiser state and sets the
    initial epoch. `history` holds the logs of every completed epoch, restored ones included.
    Non-chief workers of a multi-worker job back up to a sibling folder
    `<backup_dir>-<type>-<id>` (not inside `backup_dir`, which the chief deletes at the end).

    Args:
      backup_dir: folder of the backup (only this callback's files may live there).
      save_freq: "epoch" or an int number of batches.
      delete_checkpoint: delete the backup when `fit` completes.
      strategy: the training strategy (default: the current one), for the worker folders.
      per_worker: give non-chief workers their own folder (False when `backup_dir` already is
        per worker, e.g. under `worker_dir(...)`).

    #### Examples

    ```python
    backup = tfp_seg.distribute.BackupAndRestore("runs/ssn/backup")
    model.fit(ds, epochs=20, callbacks=[backup])     # killed at epoch 7? run it again:
    model.fit(ds, epochs=20, callbacks=[backup])     # continues with epoch 8 (index 7)
    backup.history["loss"]                            # all 20 epochs
    ```
    """

    def __init__(
        self,
        backup_dir: str,
        save_freq="epoch",
        delete_checkpoint: bool = True,
        strategy: Optional[tf.distribute.Strategy] = None,
        per_worker: bool = True,
    ):
        if not backup_dir:
            raise ValueError("`backup_dir` must be a non-empty path.")
        if strategy is None:
            strategy = tf.distribute.get_strategy()
        if per_worker and not is_chief(strategy):
            task_type, task_id = _task(strategy)
            backup_dir = f"{os.path.normpath(backup_dir)}-{task_type}-{task_id}"
        super().__init__(
            backup_dir=backup_dir,
            save_freq=save_freq,
            double_checkpoint=False,
            delete_checkpoint=delete_checkpoint,
        )
        self.history: dict = {}
        self.restored_epoch = 0

    @staticmethod
    def read_state(backup_dir: str) -> Optional[dict]:
        """The backup's metadata (`{"epoch", "batch", "weights", "history"}`), or None."""
        path = os.path.join(backup_dir, _METADATA)
        if not os.path.isfile(path):
            return None
        try:
            with open(path, encoding="utf-8") as f:
                state = json.load(f)
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"corrupt backup metadata {path}: {exc}") from exc
        if not isinstance(state, dict) or state.get("format") != _FORMAT:
            raise ValueError(
                f"{path} is not a tfp_seg backup (format {_FORMAT!r}); the folder must hold only "
                "this callback's files."
            )
        return state

    def completed_epochs(self) -> int:
        """Epochs completed according to the backup (0 without one)."""
        state = self.read_state(self.backup_dir)
        return 0 if state is None else int(state["epoch"])

    def on_train_begin(self, logs=None):
        self._load_model()

    def _load_model(self):
        if not self.model.built:
            raise ValueError(
                "BackupAndRestore needs a built model before fit(): call model.build(shape) "
                "or run it on a batch first."
            )
        state = self.read_state(self.backup_dir)
        if state is None:
            self.history = {}
            self.restored_epoch = 0
            return
        weights = os.path.join(self.backup_dir, state["weights"])
        if not os.path.isfile(weights):
            raise ValueError(
                f"backup {self.backup_dir} names {state['weights']}, which is missing."
            )
        if self.model.optimizer is not None and not self.model.optimizer.built:
            self.model.optimizer.build(self.model.trainable_variables)
        self.model.load_weights(weights)
        self.restored_epoch = int(state["epoch"])
        self.history = {k: list(v) for k, v in state.get("history", {}).items()}
        self.model._initial_epoch = self.restored_epoch
        self._current_epoch = self.restored_epoch

    def on_epoch_end(self, epoch, logs=None):
        for key, value in (logs or {}).items():
            self.history.setdefault(key, []).append(_to_float(value))
        super().on_epoch_end(epoch, logs)

    def _save_model(self):
        os.makedirs(self.backup_dir, exist_ok=True)
        name = f"epoch-{self._current_epoch}-batch-{self._last_batch_seen}.weights.h5"
        target = os.path.join(self.backup_dir, name)
        tmp = os.path.join(self.backup_dir, f".tmp-{os.getpid()}-{name}")
        self.model.save_weights(tmp, overwrite=True)
        os.replace(tmp, target)
        _atomic_json(
            os.path.join(self.backup_dir, _METADATA),
            {
                "format": _FORMAT,
                "epoch": self._current_epoch,
                "batch": self._last_batch_seen,
                "weights": name,
                "history": self.history,
            },
        )
        for other in os.listdir(self.backup_dir):
            if other.endswith(".weights.h5") and other != name:  # older and stale partial ones
                with contextlib.suppress(OSError):
                    os.remove(os.path.join(self.backup_dir, other))
