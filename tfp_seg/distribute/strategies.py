"""Strategies by name (`get_strategy`), logical CPUs, the replica count and id, and the narrow
fix that lets Keras 3 `fit` under a multi-worker strategy."""

from __future__ import annotations

import json
import os
from typing import Optional, Sequence, Union

import tensorflow as tf

from tfp_seg import _checks

STRATEGIES = ("auto", "default", "mirrored", "multi_worker", "tpu")
"""The names `get_strategy` (and `tfp-seg train --strategy`) accepts."""


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
    n = _checks.positive_int(n, "n")
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
