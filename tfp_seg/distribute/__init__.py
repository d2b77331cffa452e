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

from tfp_seg._seeds import replica_seed  # re-exported: `tfp_seg.distribute.replica_seed`
from tfp_seg.distribute.backup import BackupAndRestore
from tfp_seg.distribute.losses import average_loss
from tfp_seg.distribute.precision import POLICIES, dtype_policy_scope
from tfp_seg.distribute.strategies import (
    STRATEGIES,
    get_strategy,
    logical_cpus,
    num_replicas,
    replica_id,
)
from tfp_seg.distribute.streams import divisible_batches, seeded_stream, shard_by_data, skip_epochs
from tfp_seg.distribute.workers import is_chief, worker_dir

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
