"""tf.distribute: strategies, per-replica losses and noise, multi-worker fit, resumption, AMP.

Anything that needs logical devices or TF_CONFIG runs in a subprocess (TensorFlow's device and
collective configuration is process-global). Multi-worker jobs use 127.0.0.1 only, ports picked
free at run time, bounded time-outs, and every process is killed at the end.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import types
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfp_seg
from tests.helpers import OrderRecorder, RecordBatches, tiny_train_args
from tfp_seg import distribute
from tfp_seg.experiment import TrainConfig

REPO = Path(__file__).resolve().parents[2]


# --- subprocess helpers ------------------------------------------------------------------------
def _env(**extra) -> dict:
    env = dict(os.environ)
    env.pop("TF_CONFIG", None)
    env.update(
        TF_CPP_MIN_LOG_LEVEL="3",
        KERAS_BACKEND="tensorflow",
        PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]),
    )
    env.update(extra)
    return env


def _last_json(stdout: str) -> dict:
    for line in reversed(stdout.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise AssertionError(f"no JSON result in the output:\n{stdout[-3000:]}")


def _start(code: str, args=(), env=None) -> subprocess.Popen:
    """Start `code` in a fresh interpreter (stdout/stderr captured)."""
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env or _env(),
        cwd=str(REPO),
    )


def _result(proc: subprocess.Popen, deadline: float) -> dict:
    """Wait (until `deadline`) for `proc`; its last stdout line starting with `{` is the result."""
    try:
        out, err = proc.communicate(timeout=max(1.0, deadline - time.time()))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    assert proc.returncode == 0, f"subprocess failed ({proc.returncode}):\n{err[-4000:]}"
    return _last_json(out)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- one host, two logical CPUs: per-replica noise and single-device equivalence ---------------
MIRRORED = r"""
import json
import numpy as np
import tensorflow as tf
import tfp_seg
devices = tfp_seg.distribute.logical_cpus(2)     # before TensorFlow initialises its devices
import keras
from tfp_seg import distributions as dists
from tfp_seg.losses.chunked import sampled_nll_terms

out = {"devices": devices}
strategy = tfp_seg.distribute.get_strategy("mirrored", devices=devices)
out["replicas"] = strategy.num_replicas_in_sync
out["logical_cpus_again"] = tfp_seg.distribute.logical_cpus(2) == devices
try:
    tfp_seg.distribute.logical_cpus(3)
    out["logical_cpus_late_error"] = None
except RuntimeError as exc:
    out["logical_cpus_late_error"] = str(exc)

def per_replica(fn):
    res = strategy.run(tf.function(fn))
    return [t.numpy() for t in strategy.experimental_local_results(res)]

def differ(xs):
    return bool(not np.allclose(xs[0], xs[1]))

# Replicas run one program on different examples: is the noise different?
out["raw_stateless_differs"] = differ(
    per_replica(lambda: tf.random.stateless_normal([64], [7, 0])))
out["raw_stateful_differs"] = differ(per_replica(lambda: tf.random.normal([64])))
out["standard_normal_int_differs"] = differ(
    per_replica(lambda: dists.standard_normal([64], seed=7)))
out["standard_normal_none_differs"] = differ(per_replica(lambda: dists.standard_normal([64])))
# Heads: the same params on both replicas, so a difference can only come from the noise.
head = tfp_seg.layers.LowRankLogits(2, rank=2)
params = tf.random.stateless_normal([1, 4, 4, head.params_size], [1, 2])
for seed in (None, 5):
    s = per_replica(lambda: head.sample_logits(params, 4, seed=seed))
    out[f"ssn_differs_seed_{seed}"] = differ(s)
s2 = per_replica(lambda: head.sample_logits(params, 4, seed=5))
out["ssn_int_seed_reproducible"] = bool(all(np.array_equal(a, b) for a, b in zip(s, s2)))
het = tfp_seg.layers.HeteroscedasticLogits(2)
hp = tf.random.stateless_normal([1, 4, 4, het.params_size], [1, 3])
out["heteroscedastic_differs"] = differ(per_replica(lambda: het.sample_logits(hp, 4, seed=5)))
enc = tfp_seg.layers.LatentEncoder(latent_dim=3, filters=[4])
lp = tf.zeros([1, enc.params_size])
out["latent_differs"] = differ(per_replica(lambda: enc.sample(lp, 2, seed=5)))
# The training loss draws its own noise (fused low-rank path): identical inputs per replica.
labels = tf.zeros([1, 4, 4], tf.int32)
for seed in (None, 5):
    nll = per_replica(lambda: sampled_nll_terms(head, labels, params, 4, antithetic=True,
                                                seed=seed)[0])
    out[f"ssn_loss_differs_seed_{seed}"] = differ(nll)

# A resumed fit under the strategy sees the uninterrupted run's batches (skip_epochs).
from tests.helpers import OrderRecorder, RecordBatches

order_data = tfp_seg.data.ambiguous_shapes(num_images=20, image_size=16, seed=0)

def record(skip):
    ds = tfp_seg.distribute.seeded_stream(
        lambda: order_data.to_dataset(batch_size=4, seed=0, repeat=True))
    ds = tfp_seg.distribute.skip_epochs(ds, skip, 5)
    with strategy.scope():
        model = OrderRecorder()
        model.compile()
    rec = RecordBatches()
    model.fit(ds, epochs=4, initial_epoch=skip, steps_per_epoch=5, verbose=0, callbacks=[rec])
    return rec.epochs

full = record(0)
resumed = record(2)
out["order_distinct_epochs"] = len({tuple(full[e]) for e in range(4)})
out["resumed_order_matches"] = bool(resumed[2] == full[2] and resumed[3] == full[3])

# A first batch that does not split over the replicas: Keras fails, divisible_batches trims it.
uneven = tfp_seg.data.ambiguous_shapes(num_images=3, image_size=16, seed=2)  # one batch of 3
uneven_ds = uneven.to_dataset(batch_size=4, shuffle=False, annotation="first")
with strategy.scope():
    keras.utils.set_random_seed(0)
    small = tfp_seg.models.ProbabilisticSegmenter(
        tfp_seg.models.UNet(base_filters=4, depth=1), tfp_seg.layers.CategoricalLogits(3))
    small.build((None, 16, 16, 1))
    small.compile(optimizer="sgd", loss="auto")
try:
    small.evaluate(uneven_ds, verbose=0)
    out["uneven_error"] = None
except tf.errors.InvalidArgumentError as exc:
    out["uneven_error"] = str(exc)[:300]
trimmed = tfp_seg.distribute.divisible_batches(uneven_ds, 2)
out["trimmed_batch_sizes"] = [int(x.shape[0]) for x, _ in trimmed]
small.fit(trimmed, epochs=1, verbose=0)
out["trimmed_loss"] = float(small.evaluate(trimmed, verbose=0))
one = tfp_seg.distribute.divisible_batches(uneven_ds, 1)
out["one_replica_unchanged"] = one is uneven_ds
import tempfile
from tfp_seg.experiment import TrainConfig, train
try:
    train(TrainConfig(strategy="mirrored", batch_size=3, epochs=1, num_images=20, image_size=16,
                      base_filters=4, depth=1, export=False, progress=False,
                      output_dir=tempfile.mkdtemp(), name="odd_batch"))
    out["odd_batch_error"] = None
except ValueError as exc:
    out["odd_batch_error"] = str(exc)

# One SGD step on one device vs two replicas, same batch, same weights, fixed noise.
data = tfp_seg.data.ambiguous_shapes(num_images=4, image_size=16, seed=1)
x = data.images.astype("float32")
y = data.annotations[:, 0].astype("int32")
H = W = 16; C = data.num_classes; R = 3; N = 4; LR = 0.1
rng = np.random.RandomState(0)
Z = tf.constant(rng.normal(size=[N // 2, 1, R]).astype("float32"))
E = tf.constant(rng.normal(size=[N // 2, 1, H, W, C]).astype("float32"))
EPS = tf.constant(rng.normal(size=[1, 1, 2]).astype("float32"))

class FixedNoiseNLL(tfp_seg.losses.StochasticSegmentationNLL):
    # StochasticSegmentationNLL with the same (z, eps) for every example: equal noise on one
    # device and on any split of the batch (its own noise is per replica by design).
    def call(self, y_true, y_pred):
        b = tf.shape(y_pred)[0]
        noise = (tf.broadcast_to(Z, [N // 2, b, R]), tf.broadcast_to(E, [N // 2, b, H, W, C]))
        joint, marginal = sampled_nll_terms(
            self.head, y_true, y_pred, N, chunk_size=self.chunk_size, antithetic=True,
            noise=noise)
        return self._normalize(joint + marginal, y_true)

def segmenter():
    return tfp_seg.models.ProbabilisticSegmenter(
        tfp_seg.models.UNet(base_filters=4, depth=2), tfp_seg.layers.LowRankLogits(C, rank=R))

def nll(chunk_size=None):
    head = tfp_seg.layers.LowRankLogits(C, rank=R)
    return {"loss": FixedNoiseNLL(head, num_samples=N, chunk_size=chunk_size)}

def prob_unet():
    model = tfp_seg.models.ProbabilisticUNet(
        C, latent_dim=2, backbone=tfp_seg.models.UNet(base_filters=4, depth=2),
        encoder_filters=[4, 8], fcomb_filters=4)
    sample = model.posterior_net.sample
    def fixed(params, n, seed=None, noise=None, antithetic=False):
        return sample(params, n, noise=tf.broadcast_to(EPS, [1, tf.shape(params)[0], 2]))
    model.posterior_net.sample = fixed
    return model

def one_step(make, compile_kwargs, strat):
    with strat.scope():
        keras.utils.set_random_seed(0)
        model = make()
        model.build((None, H, W, 1))
        model.compile(optimizer=keras.optimizers.SGD(LR), **compile_kwargs)
    w0 = [v.numpy().copy() for v in model.trainable_variables]
    hist = model.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0)
    w1 = [v.numpy() for v in model.trainable_variables]
    grad = np.concatenate([((a - b) / LR).ravel() for a, b in zip(w0, w1)])
    return grad, float(hist.history["loss"][0]), np.concatenate([a.ravel() for a in w0])

for name, make, kwargs in (("segmenter", segmenter, nll),
                           ("segmenter_chunked", segmenter, lambda: nll(2)),
                           ("prob_unet", prob_unet, dict)):
    g1, l1, i1 = one_step(make, kwargs(), tf.distribute.get_strategy())
    g2, l2, i2 = one_step(make, kwargs(), strategy)
    out[name] = {
        "same_init": bool(np.array_equal(i1, i2)),
        "grad_rel_err": float(np.linalg.norm(g2 - g1) / np.linalg.norm(g1)),
        "grad_max_abs_err": float(np.abs(g2 - g1).max()),
        "grad_norm": float(np.linalg.norm(g1)),
        "loss_one_device": l1,
        "loss_two_replicas": l2,
    }
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def mirrored(jobs):
    procs, _, deadline = jobs
    return _result(procs["mirrored"][0], deadline)


def test_uneven_first_batch_fails_in_keras_and_divisible_batches_trims_it(mirrored):
    # If Keras learns to split uneven batches, the first assertion tells us to drop the trim.
    assert "AddN" in mirrored["uneven_error"], mirrored["uneven_error"]
    assert mirrored["trimmed_batch_sizes"] == [2]  # 3 images: one left out
    assert np.isfinite(mirrored["trimmed_loss"])
    assert mirrored["one_replica_unchanged"] is True
    assert "--batch-size 3 is the global batch and must split evenly over the 2 replicas" in (
        mirrored["odd_batch_error"] or ""
    ), mirrored["odd_batch_error"]


def test_divisible_batches_errors_and_structures():
    ds = tf.data.Dataset.from_tensor_slices({"x": np.arange(7.0), "y": np.arange(7)}).batch(3)
    sizes = [int(b["x"].shape[0]) for b in tfp_seg.distribute.divisible_batches(ds, 2)]
    assert sizes == [2, 2]  # 3 -> 2, 3 -> 2, 1 -> dropped
    for bad in (0, -1, 2.0, True, None):
        with pytest.raises(ValueError, match="num_replicas must be a positive int"):
            tfp_seg.distribute.divisible_batches(ds, bad)


def test_logical_cpus_give_two_replicas(mirrored):
    assert mirrored["replicas"] == 2
    assert len(mirrored["devices"]) == 2
    assert mirrored["logical_cpus_again"] is True  # idempotent
    assert "before TensorFlow initialises its devices" in mirrored["logical_cpus_late_error"]


def test_stateless_noise_is_identical_across_replicas_without_the_fix(mirrored):
    # The problem `replica_seed` solves: one stateless seed, the same numbers on every replica.
    assert mirrored["raw_stateless_differs"] is False
    # Stateful ops differ within one process (each replica builds its own op).
    assert mirrored["raw_stateful_differs"] is True


@pytest.mark.parametrize(
    "key",
    [
        "standard_normal_int_differs",
        "standard_normal_none_differs",
        "ssn_differs_seed_None",
        "ssn_differs_seed_5",
        "ssn_loss_differs_seed_None",
        "ssn_loss_differs_seed_5",
        "heteroscedastic_differs",
        "latent_differs",
    ],
)
def test_replicas_draw_different_noise(mirrored, key):
    assert mirrored[key] is True


def test_skip_epochs_resumes_the_stream_under_mirrored(mirrored):
    assert mirrored["order_distinct_epochs"] == 4
    assert mirrored["resumed_order_matches"] is True


def test_int_seed_stays_reproducible_per_replica(mirrored):
    assert mirrored["ssn_int_seed_reproducible"] is True


@pytest.mark.parametrize("model", ["segmenter", "segmenter_chunked", "prob_unet"])
def test_two_replicas_match_one_device(mirrored, model):
    """One SGD step on the same batch: gradients agree to 1e-5 relative (global 2-norm).

    Keras divides each replica's `sum_over_batch_size` loss by the replica count
    (ProbabilisticSegmenter, also with the chunked SSN loss and its custom gradient);
    ProbabilisticUNet.train_step does it itself. The strategy sums the replicas' gradients, so
    both equal the single-device gradient of the global-batch mean. The noise is fixed and the
    same for every example (the models' own noise differs per replica by design).
    """
    r = mirrored[model]
    assert r["same_init"]
    assert r["grad_norm"] > 1e-3
    assert r["grad_rel_err"] < 1e-5, r
    np.testing.assert_allclose(r["loss_two_replicas"], r["loss_one_device"], rtol=1e-5)


# --- two worker processes on 127.0.0.1 -----------------------------------------------------------
WORKER = r"""
import json, os, sys
import numpy as np
import tensorflow as tf
import tfp_seg
strategy = tfp_seg.distribute.get_strategy("multi_worker")  # first: before any other TF work
import keras
from tfp_seg import distributions as dists

out_dir = sys.argv[1]
task = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
keras.utils.set_random_seed(0)  # the same seed on every worker, as training scripts do

def local(fn):
    res = strategy.run(tf.function(fn))
    return strategy.experimental_local_results(res)[0].numpy()

noise = {
    "raw_stateless": local(lambda: tf.random.stateless_normal([32], [7, 0])),
    "raw_stateful": local(lambda: tf.random.normal([32])),
    "int_seed": local(lambda: dists.standard_normal([32], seed=7)),
    "none_seed": local(lambda: dists.standard_normal([32])),
}
data = tfp_seg.data.ambiguous_shapes(num_images=16, image_size=16, seed=1)
ds = tf.data.Dataset.from_tensor_slices(
    (data.images.astype("float32"), data.annotations[:, 0].astype("int32"))).batch(4)
ds = tfp_seg.distribute.shard_by_data(ds)
with strategy.scope():
    model = tfp_seg.models.ProbabilisticSegmenter(
        tfp_seg.models.UNet(base_filters=4, depth=2),
        tfp_seg.layers.LowRankLogits(data.num_classes, rank=2))
    model.build((None, 16, 16, 1))
    model.compile(optimizer=keras.optimizers.Adam(1e-2),
                  loss=model.head.default_loss(num_samples=4))
hist = model.fit(ds, epochs=2, verbose=0)
np.savez(os.path.join(out_dir, f"worker{task}.npz"),
         **{f"w{i}": w for i, w in enumerate(model.get_weights())},
         **{f"noise_{k}": v for k, v in noise.items()})
print(json.dumps({"task": task, "chief": tfp_seg.distribute.is_chief(strategy),
                  "replicas": strategy.num_replicas_in_sync,
                  "loss": [float(v) for v in hist.history["loss"]]}))
"""


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    """Start the mirrored job and the two multi-worker processes at once (they overlap on a
    loaded machine); every process is killed at teardown."""
    out = tmp_path_factory.mktemp("multi_worker")
    cluster = {"worker": [f"127.0.0.1:{_free_port()}", f"127.0.0.1:{_free_port()}"]}
    procs = {"mirrored": [_start(MIRRORED)], "multi_worker": []}
    try:
        for index in range(2):
            tf_config = {"cluster": cluster, "task": {"type": "worker", "index": index}}
            procs["multi_worker"].append(
                _start(WORKER, args=[out], env=_env(TF_CONFIG=json.dumps(tf_config)))
            )
        yield procs, out, time.time() + 480
    finally:
        for group in procs.values():
            for proc in group:
                if proc.poll() is None:
                    proc.kill()
                    proc.communicate()


@pytest.fixture(scope="module")
def multi_worker(jobs):
    procs, out, deadline = jobs
    results = [_result(proc, deadline) for proc in procs["multi_worker"]]
    arrays = [dict(np.load(out / f"worker{i}.npz")) for i in range(2)]
    return results, arrays


def test_multi_worker_fit_ends_with_identical_weights(multi_worker):
    results, arrays = multi_worker
    assert [r["replicas"] for r in results] == [2, 2]
    assert [r["chief"] for r in results] == [True, False]
    weights = [sorted(k for k in a if k.startswith("w")) for a in arrays]
    assert weights[0] == weights[1] and weights[0]
    for key in weights[0]:
        np.testing.assert_array_equal(arrays[0][key], arrays[1][key], err_msg=key)
    # Logged losses are global means, hence equal on both workers; and they are finite.
    assert results[0]["loss"] == results[1]["loss"]
    assert np.all(np.isfinite(results[0]["loss"]))


def test_multi_worker_noise_differs_across_workers(multi_worker):
    _, arrays = multi_worker
    same = {
        k: bool(np.allclose(arrays[0][k], arrays[1][k])) for k in arrays[0] if k.startswith("noise")
    }
    # Without the fix: workers built from one graph and one global seed draw the same numbers,
    # stateless *and* stateful.
    assert same["noise_raw_stateless"] and same["noise_raw_stateful"]
    # tfp_seg's sampler folds the (global) replica id into the seed.
    assert not same["noise_int_seed"] and not same["noise_none_seed"]


# --- in-process unit tests -----------------------------------------------------------------------
def test_get_strategy_default_and_auto_on_cpu(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    monkeypatch.delenv("TPU_NAME", raising=False)
    monkeypatch.delenv("COLAB_TPU_ADDR", raising=False)
    default = tf.distribute.get_strategy()
    assert distribute.get_strategy("default") is default
    if len(tf.config.list_logical_devices("GPU")) < 2:
        assert distribute.get_strategy("auto") is default
    assert distribute.num_replicas() == 1


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"name": "horovod"}, "must be one of"),
        ({"name": "default", "devices": ["/cpu:0"]}, "applies to 'mirrored' and 'tpu'"),
        ({"name": "mirrored", "devices": []}, "at least one device"),
        ({"name": "tpu"}, "no TPU could be reached"),
        ({"name": "multi_worker"}, "needs TF_CONFIG"),
    ],
)
def test_get_strategy_errors(monkeypatch, kwargs, match):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(ValueError, match=match):
        distribute.get_strategy(**kwargs)


def test_bad_tf_config_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TF_CONFIG", "{not json")
    with pytest.raises(ValueError, match="TF_CONFIG is not valid JSON"):
        distribute.get_strategy("multi_worker")


def test_replica_seed_and_noise_unchanged_outside_a_strategy():
    assert distribute.replica_seed(None) is None
    assert distribute.replica_seed(3) == 3
    a = tfp_seg.distributions.standard_normal([5], seed=3)
    b = tfp_seg.distributions.standard_normal([5], seed=tf.constant([3, 0], tf.int64))
    np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_average_loss_is_sum_over_global_batch():
    per_example = tf.constant([1.0, 2.0, 3.0, 6.0])
    assert float(distribute.average_loss(per_example)) == pytest.approx(3.0)
    assert float(distribute.average_loss(per_example, global_batch_size=8)) == pytest.approx(1.5)
    weighted = distribute.average_loss(per_example, sample_weight=tf.constant([1.0, 1, 0, 0]))
    assert float(weighted) == pytest.approx(0.75)
    per_pixel = tf.ones([2, 3, 3])
    assert float(distribute.average_loss(per_pixel)) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="batch axis"):
        distribute.average_loss(tf.constant(1.0))


class _Resolver:
    def __init__(self, task_type, task_id, cluster):
        self.task_type, self.task_id, self._cluster = task_type, task_id, cluster

    def cluster_spec(self):
        return tf.train.ClusterSpec(self._cluster)


def _fake_strategy(task_type, task_id, cluster):
    return types.SimpleNamespace(cluster_resolver=_Resolver(task_type, task_id, cluster))


def test_chief_and_worker_dirs(tmp_path):
    workers = {"worker": ["a:1", "b:1"]}
    with_chief = {"chief": ["c:1"], "worker": ["a:1", "b:1"]}
    assert distribute.is_chief()  # no cluster
    assert distribute.is_chief(_fake_strategy("worker", 0, workers))
    assert not distribute.is_chief(_fake_strategy("worker", 1, workers))
    assert distribute.is_chief(_fake_strategy("chief", 0, with_chief))
    assert not distribute.is_chief(_fake_strategy("worker", 0, with_chief))
    assert distribute.worker_dir(str(tmp_path), _fake_strategy("worker", 0, workers)) == str(
        tmp_path
    )
    other = distribute.worker_dir(str(tmp_path), _fake_strategy("worker", 1, workers))
    assert other == str(tmp_path / "workers" / "worker-1") and os.path.isdir(other)
    backup = distribute.BackupAndRestore(
        str(tmp_path / "backup"), strategy=_fake_strategy("worker", 1, workers)
    )
    assert backup.backup_dir == str(tmp_path / "backup") + "-worker-1"


def _record(ds, initial_epoch, steps):
    model = OrderRecorder()
    model.compile()
    recorder = RecordBatches()
    model.fit(
        ds,
        epochs=4,
        initial_epoch=initial_epoch,
        steps_per_epoch=steps,
        verbose=0,
        callbacks=[recorder],
    )
    return recorder.epochs


def test_skip_epochs_resumes_the_seeded_stream():
    """A resumed fit (a new dataset object, 2 epochs skipped) sees epochs 2 and 3 as before.

    The built-in data's pipeline (`to_dataset`: random annotation per example, shuffling) fed
    as one repeated `seeded_stream`, as `train(resume=True)` does. (Per-epoch iteration would
    not do: its orders depend on how many iterators Keras made and read, which a new process
    cannot replay; the mirrored variant in the subprocess also covers Keras' extra iterator for
    the symbolic build.)
    """
    data = tfp_seg.data.ambiguous_shapes(num_images=20, image_size=16, seed=0)

    def stream():
        return distribute.seeded_stream(lambda: data.to_dataset(batch_size=4, seed=0, repeat=True))

    steps = 5
    ds = stream()
    assert ds.cardinality() == tf.data.INFINITE_CARDINALITY
    first = [b[1].numpy() for b in ds.take(7)]
    again = [b[1].numpy() for b in ds.take(7)]  # a second iterator: the same stream
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    full = _record(stream(), 0, steps)
    assert len({tuple(full[e]) for e in range(4)}) == 4  # a new order every epoch
    resumed = _record(distribute.skip_epochs(stream(), 2, steps), 2, steps)
    assert [resumed[2], resumed[3]] == [full[2], full[3]]
    with pytest.raises(ValueError, match="epochs"):
        distribute.skip_epochs(stream(), -1, steps)
    with pytest.raises(ValueError, match="repeated"):
        distribute.skip_epochs(data.to_dataset(batch_size=4), 1, steps)


def _tiny_model(seed):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4), keras.layers.Dense(1)])
    model.compile(keras.optimizers.Adam(0.05), "mse")
    return model


class _Stop(RuntimeError):
    pass


class _Interrupt(keras.callbacks.Callback):
    def __init__(self, at_epoch):
        super().__init__()
        self.at_epoch = at_epoch

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.at_epoch:
            raise _Stop("interrupted")


def test_backup_and_restore_resumes_with_full_history(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 3)).astype("float32")
    y = (x @ np.array([[1.0], [-2.0], [0.5]])).astype("float32")
    fit = dict(x=x, y=y, batch_size=8, epochs=5, shuffle=False, verbose=0)

    reference = _tiny_model(0)
    ref_hist = reference.fit(**fit).history

    backup_dir = tmp_path / "backup"
    first = _tiny_model(0)
    with pytest.raises(_Stop):
        first.fit(**fit, callbacks=[distribute.BackupAndRestore(str(backup_dir)), _Interrupt(3)])
    state = distribute.BackupAndRestore.read_state(str(backup_dir))
    assert state["epoch"] == 3 and len(state["history"]["loss"]) == 3
    files = sorted(os.listdir(backup_dir))
    assert files == ["epoch-3-batch-0.weights.h5", "training_metadata.json"], files

    resumed = _tiny_model(1)  # different initial weights: all state comes from the backup
    backup = distribute.BackupAndRestore(str(backup_dir))
    assert backup.completed_epochs() == 3
    hist = resumed.fit(**fit, callbacks=[backup]).history
    assert len(hist["loss"]) == 2  # only epochs 4 and 5 ran
    assert backup.restored_epoch == 3
    np.testing.assert_allclose(backup.history["loss"], ref_hist["loss"], rtol=1e-6)
    for a, b in zip(resumed.get_weights(), reference.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert not backup_dir.exists()  # delete_checkpoint=True after a completed fit


def test_backup_metadata_errors(tmp_path):
    (tmp_path / "training_metadata.json").write_text("{truncated")
    with pytest.raises(ValueError, match="corrupt backup metadata"):
        distribute.BackupAndRestore.read_state(str(tmp_path))
    (tmp_path / "training_metadata.json").write_text('{"epoch": 2, "batch": 0}')
    with pytest.raises(ValueError, match="not a tfp_seg backup"):
        distribute.BackupAndRestore.read_state(str(tmp_path))


def test_train_config_and_cli_flags():
    from tfp_seg import cli

    args = cli.build_parser().parse_args(
        [
            "train",
            "--name",
            "r",
            "--resume",
            "--strategy",
            "mirrored",
            "--mixed-precision",
            "mixed_bfloat16",
        ]
    )
    config = cli._train_config(args)
    assert (config.resume, config.strategy, config.mixed_precision) == (
        True,
        "mirrored",
        "mixed_bfloat16",
    )
    defaults = cli._train_config(cli.build_parser().parse_args(["train"]))
    assert (defaults.resume, defaults.strategy, defaults.mixed_precision) == (False, "auto", None)
    with pytest.raises(ValueError, match="`resume` needs a run `name`"):
        TrainConfig(resume=True).validate()
    with pytest.raises(ValueError, match="`strategy` must be one of"):
        TrainConfig(strategy="gpus").validate()
    with pytest.raises(ValueError, match="`mixed_precision` must be one of"):
        TrainConfig(mixed_precision="float16").validate()


# --- mixed precision -----------------------------------------------------------------------------
def test_dtype_policy_scope_restores_the_global_policy():
    before = keras.config.dtype_policy().name
    with distribute.dtype_policy_scope("mixed_float16"):
        assert keras.config.dtype_policy().name == "mixed_float16"
    assert keras.config.dtype_policy().name == before
    with pytest.raises(ValueError, match="policy must be one of"):
        with distribute.dtype_policy_scope("float16"):
            pass


_AMP_DATA = tfp_seg.data.ambiguous_shapes(num_images=4, image_size=16, seed=3)
_AMP_X = _AMP_DATA.images.astype("float32")
_AMP_Y = _AMP_DATA.annotations[:, 0].astype("int32")
_C = _AMP_DATA.num_classes
_HEADS = {
    "low_rank": lambda: tfp_seg.layers.LowRankLogits(_C, rank=3),
    "heteroscedastic": lambda: tfp_seg.layers.HeteroscedasticLogits(_C),
    "deterministic": lambda: tfp_seg.layers.CategoricalLogits(_C),
}
# Relative tolerances on the loss of the same weights and noise: float16 keeps ~3 significant
# digits per op, bfloat16 ~2; the losses are sums over many pixels in float32 (measured:
# <1e-4 for float16, <5e-4 for bfloat16).
_RTOL = {"mixed_float16": 2e-3, "mixed_bfloat16": 1e-2}


def _segmenter(head):
    return tfp_seg.models.ProbabilisticSegmenter(
        tfp_seg.models.UNet(base_filters=8, depth=2), _HEADS[head]()
    )


def _head_loss(model, head):
    params = model(_AMP_X, training=False)
    kwargs = {} if head == "deterministic" else {"num_samples": 8}
    tf.random.set_seed(5)  # the same stateful noise for both policies (eager op seeds)
    return params, model.head.default_loss(**kwargs)(_AMP_Y, params)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
@pytest.mark.parametrize("head", sorted(_HEADS))
def test_mixed_precision_head_losses_match_float32(policy, head):
    reference = _segmenter(head)
    reference.build((None, 16, 16, 1))
    with distribute.dtype_policy_scope(policy):
        model = _segmenter(head)
    model.build((None, 16, 16, 1))
    model.set_weights(reference.get_weights())
    assert model.backbone.compute_dtype == policy.split("_")[1]
    assert model.head.projection.compute_dtype == "float32"  # the head casts features up
    p32, l32 = _head_loss(reference, head)
    p16, l16 = _head_loss(model, head)
    assert p16.dtype == tf.float32 and l16.dtype == tf.float32
    assert np.isfinite(float(l16))
    np.testing.assert_allclose(float(l16), float(l32), rtol=_RTOL[policy])


def _prob_unet():
    return tfp_seg.models.ProbabilisticUNet(
        _C,
        latent_dim=2,
        backbone=tfp_seg.models.UNet(base_filters=8, depth=2),
        encoder_filters=[8, 16],
        fcomb_filters=8,
    )


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_prob_unet_elbo_matches_float32(policy):
    reference = _prob_unet()
    reference.build((None, 16, 16, 1))
    with distribute.dtype_policy_scope(policy):
        model = _prob_unet()
    model.build((None, 16, 16, 1))
    model.set_weights(reference.get_weights())
    t32 = reference.elbo_terms(_AMP_X, _AMP_Y, seed=4)
    t16 = model.elbo_terms(_AMP_X, _AMP_Y, seed=4)
    for key in ("loss", "reconstruction", "kl"):
        assert t16[key].dtype == tf.float32 and np.isfinite(float(t16[key])), key
        np.testing.assert_allclose(float(t16[key]), float(t32[key]), rtol=_RTOL[policy], atol=1e-3)


@pytest.mark.parametrize("make", ["segmenter", "prob_unet"])
def test_mixed_float16_training_step_is_finite(make):
    """Training under mixed_float16: Keras wraps the optimiser in a LossScaleOptimizer.

    The Prob U-Net's ELBO is summed over pixels (~300 nats here), so with the initial loss
    scale 2**15 its float16 gradients overflow: dynamic loss scaling skips those steps and
    halves the scale (6 skipped steps here, down to 2**9) before the first update.
    """
    with distribute.dtype_policy_scope("mixed_float16"):
        model = _segmenter("low_rank") if make == "segmenter" else _prob_unet()
    if make == "segmenter":
        model.compile(optimizer="adam", loss=model.head.default_loss(num_samples=4))
    else:
        model.compile(optimizer="adam")
    assert type(model.optimizer).__name__ == "LossScaleOptimizer"
    model.build((None, 16, 16, 1))
    before = [w.copy() for w in model.get_weights()]
    epochs = 1 if make == "segmenter" else 3
    history = model.fit(_AMP_X, _AMP_Y, batch_size=1, epochs=epochs, verbose=0).history
    assert np.all(np.isfinite(history["loss"]))
    after = model.get_weights()
    assert any(not np.array_equal(a, b) for a, b in zip(after, before, strict=True))
    assert all(np.all(np.isfinite(w)) for w in after)


# --- fault tolerance: tfp-seg train --resume after SIGKILL ---------------------------------------
_CLI = (
    "import sys, tensorflow as tf; tf.config.experimental.enable_op_determinism(); "
    "from tfp_seg.cli import main; sys.exit(main(sys.argv[1:]))"
)
_RESUME_ARGS = [
    "train",
    "--name",
    "run",
    "--resume",
    *tiny_train_args(
        head="deterministic",
        epochs=6,
        num_images=100,
        batch_size=8,
        base_filters=8,
        eval_samples=2,
        rank=None,
        num_samples=None,
        strategy="default",
    ),
]


def _train_proc(out: Path, log: Path):
    return subprocess.Popen(
        [sys.executable, "-c", _CLI, *_RESUME_ARGS, "--output-dir", str(out)],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        env=_env(),
        cwd=str(REPO),
    )


def _metadata_epoch(run: Path):
    try:
        return json.loads((run / "backup" / "training_metadata.json").read_text())["epoch"]
    except (OSError, ValueError, KeyError):
        return None


@pytest.mark.slow
def test_resume_after_sigkill_matches_an_uninterrupted_run(tmp_path):
    """Kill `tfp-seg train --resume` with SIGKILL inside an epoch; rerun; compare.

    Deterministic head (no Monte Carlo noise), `enable_op_determinism`, and `--resume`'s data
    feed (one seeded, repeated stream; the resumed run skips the completed epochs' batches):
    the resumed run must equal the uninterrupted one to float32 round-off (rtol 1e-5; in
    practice bit-identical: history, weights and report).
    """
    procs = []
    try:
        reference = _train_proc(tmp_path / "ref", tmp_path / "ref.log")
        procs.append(reference)
        victim = _train_proc(tmp_path / "kill", tmp_path / "kill1.log")
        procs.append(victim)
        run = tmp_path / "kill" / "run"
        deadline = time.time() + 400
        seen = {}
        while time.time() < deadline and victim.poll() is None:
            epoch = _metadata_epoch(run)
            if epoch is not None and epoch not in seen:
                seen[epoch] = time.time()
            if 2 in seen and 1 in seen:
                # Halfway through the third epoch (epochs take about equally long).
                if time.time() >= seen[2] + 0.5 * (seen[2] - seen[1]):
                    break
            time.sleep(0.05)
        assert victim.poll() is None, "the run finished before it could be interrupted"
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=60)
        assert victim.returncode == -signal.SIGKILL
        killed_at = _metadata_epoch(run)
        assert killed_at is not None and 2 <= killed_at < 6, killed_at
        assert not (run / "history.json").exists()

        resumed = _train_proc(tmp_path / "kill", tmp_path / "kill2.log")
        procs.append(resumed)
        assert resumed.wait(timeout=400) == 0, (tmp_path / "kill2.log").read_text()[-3000:]
        assert reference.wait(timeout=400) == 0, (tmp_path / "ref.log").read_text()[-3000:]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    log = (tmp_path / "kill2.log").read_text()
    assert f"{killed_at}/6 epochs done" in log, log[-3000:]

    ref_run = tmp_path / "ref" / "run"
    hist = json.loads((run / "history.json").read_text())
    ref_hist = json.loads((ref_run / "history.json").read_text())
    assert len(hist["loss"]) == len(ref_hist["loss"]) == 6  # no lost or repeated epochs
    for key in ref_hist:
        np.testing.assert_allclose(hist[key], ref_hist[key], rtol=1e-5, err_msg=key)
    a = keras.models.load_model(run / "model.keras")
    b = keras.models.load_model(ref_run / "model.keras")
    worst = 0.0
    for wa, wb in zip(a.get_weights(), b.get_weights(), strict=True):
        np.testing.assert_allclose(wa, wb, rtol=1e-5, atol=1e-6)
        worst = max(worst, float(np.abs(wa - wb).max()))
    print(f"killed after epoch {killed_at}; max |weight difference| {worst:.3g}")
    report = json.loads((run / "report.json").read_text())
    ref_report = json.loads((ref_run / "report.json").read_text())
    np.testing.assert_allclose(report["ged"], ref_report["ged"], rtol=1e-5)
    assert not (run / "backup").exists()  # removed once the model is saved
