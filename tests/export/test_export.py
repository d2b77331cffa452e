"""Export: SavedModel (TF Serving layout and signatures) and ONNX, with parity checks.

Deterministic outputs must match the Keras model within 1e-4; sampled outputs are checked
against the head's analytic moments with `atol = k * sigma / sqrt(n)` (k = 5, fixed seeds).
"""

from __future__ import annotations

import os
import subprocess
import sys

import keras
import numpy as np
import onnxruntime
import pytest
import tensorflow as tf
import tf2onnx  # noqa: F401  (a test dependency: the [test] extra installs it)
from tensorflow_serving.apis import predict_pb2

import tfp_seg
from tfp_seg import export
from tfp_seg.export import _common as export_common
from tfp_seg.layers import CategoricalLogits, HeteroscedasticLogits, LowRankLogits
from tfp_seg.models import (
    HierarchicalProbabilisticUNet,
    ProbabilisticSegmenter,
    ProbabilisticUNet,
    UNet,
)
from tfp_seg.uncertainty import DeepEnsemble, MCDropout

ATOL = 1e-4
K_SIGMA = 5.0
H = W = 16
NUM_CLASSES = 3
EXPORT_N = 8
SEED = [3, 14]


def _images(batch, seed=0, h=H, w=W):
    return np.random.default_rng(seed).normal(size=(batch, h, w, 1)).astype("float32")


def _lowrank_model():
    keras.utils.set_random_seed(1)
    model = ProbabilisticSegmenter(
        UNet(base_filters=4, depth=1), LowRankLogits(NUM_CLASSES, rank=2)
    )
    model.build((None, H, W, 1))
    return model


def _categorical_model():
    # A backbone without resizing layers traces with dynamic H/W (the U-Net's bilinear
    # UpSampling2D does not), so this model also covers the dynamic-spatial export.
    keras.utils.set_random_seed(2)
    backbone = keras.Sequential([keras.layers.Conv2D(4, 3, padding="same", activation="relu")])
    model = ProbabilisticSegmenter(backbone, CategoricalLogits(NUM_CLASSES))
    model.build((None, H, W, 1))
    return model


def _heteroscedastic_model():
    keras.utils.set_random_seed(3)
    model = ProbabilisticSegmenter(
        UNet(base_filters=4, depth=1), HeteroscedasticLogits(NUM_CLASSES, low_rank_classes=2)
    )
    model.build((None, H, W, 1))
    # Its bias starts at a tiny variance; lift it so that the moment test has signal.
    kernel, bias = model.head.projection.get_weights()
    bias[NUM_CLASSES : 2 * NUM_CLASSES] = -1.0
    model.head.projection.set_weights([kernel, bias])
    return model


MODELS = {
    "low_rank": _lowrank_model,
    "categorical": _categorical_model,
    "heteroscedastic": _heteroscedastic_model,
}


_EXPORTS = {}


def _export(name, tmp_path_factory):
    """(name, model, SavedModel version dir, loaded SavedModel, ONNX path), once per head."""
    if name not in _EXPORTS:
        model = MODELS[name]()
        base = tmp_path_factory.mktemp("export") / "savedmodels" / name
        version_dir = export.saved_model(model, str(base), num_samples=EXPORT_N)
        onnx_path = export.onnx(model, str(base.parent / f"{name}.onnx"), EXPORT_N)
        _EXPORTS[name] = (name, model, version_dir, tf.saved_model.load(version_dir), onnx_path)
    return _EXPORTS[name]


@pytest.fixture(scope="module", params=sorted(MODELS))
def exported(request, tmp_path_factory):
    return _export(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def low_rank_export(tmp_path_factory):
    """For the head-independent checks."""
    return _export("low_rank", tmp_path_factory)


def _analytic(model, images):
    params = model(images, training=False)
    head = model.head
    mean = np.asarray(head.mean_logits(params))
    if hasattr(head, "covariance_parts"):
        _, factor, diag = head.covariance_parts(params)
        variance = np.asarray(diag + tf.reduce_sum(tf.square(factor), -1))
        # Variance of the sum over each image's logits: ||P^T 1||^2 + sum(D) for the SSN
        # (covariance across pixels), sum_hw ||V_hw^T 1||^2 + sum(D) for per-pixel factors.
        if isinstance(head, LowRankLogits):
            cross = np.square(np.asarray(tf.reduce_sum(factor, axis=[1, 2, 3]))).sum(-1)
        else:
            cross = np.square(np.asarray(tf.reduce_sum(factor, axis=3))).sum((1, 2, 3))
        total = cross + np.asarray(tf.reduce_sum(diag, axis=[1, 2, 3]))
    else:
        variance = np.zeros_like(mean)
        total = np.zeros(mean.shape[0])
    return mean, variance, total


def _assert_moments(samples, model, images, antithetic):
    """Sample mean / variance (per logit and of each image's logit sum) vs the analytic ones."""
    samples = np.asarray(samples, np.float64)
    mean, variance, total = _analytic(model, images)
    n = samples.shape[0]
    n_eff = n // 2 if antithetic else n  # mirrored pairs carry n/2 independent deviations
    np.testing.assert_allclose(
        samples.mean(0), mean, atol=K_SIGMA * np.sqrt(variance.max() / n_eff) + 1e-5
    )
    # Var of a sample variance of normals: 2 sigma^4 / (n - 1).
    np.testing.assert_allclose(
        samples.var(0, ddof=1),
        variance,
        atol=K_SIGMA * variance.max() * np.sqrt(2.0 / (n_eff - 1)) + 1e-5,
    )
    sums = samples.sum(axis=(2, 3, 4))
    np.testing.assert_allclose(
        sums.var(0, ddof=1), total, rtol=K_SIGMA * np.sqrt(2.0 / (n_eff - 1)), atol=1e-4
    )


# --------------------------------------------------------------------------------------------
# SavedModel
# --------------------------------------------------------------------------------------------
def test_saved_model_layout_and_signatures(exported):
    name, model, version_dir, loaded, _ = exported
    assert os.path.basename(version_dir) == "1"
    assert os.path.isfile(os.path.join(version_dir, "saved_model.pb"))
    assert os.path.isfile(os.path.join(version_dir, "assets.extra", "tfp_seg.json"))
    assert set(export.SIGNATURES) <= set(loaded.signatures)
    images = loaded.signatures["sample"].structured_input_signature[1]
    assert set(images) == {"images", "num_samples", "seed"}
    assert images["images"].shape[0] is None  # dynamic batch
    if name == "categorical":
        assert images["images"].shape[1:3] == [None, None]  # dynamic H/W where the model allows
    else:
        assert images["images"].shape[1:] == [H, W, 1]


def test_saved_model_cli_lists_signatures(low_rank_export):
    _, _, version_dir, _, _ = low_rank_export
    cli = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
    out = subprocess.run(
        [cli, "show", "--dir", version_dir, "--all"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    for signature in export.SIGNATURES:
        assert f"signature_def['{signature}']" in out
    for item in (
        "inputs['images']",
        "inputs['num_samples']",
        "inputs['seed']",
        "outputs['probabilities']",
        "outputs['labels']",
        "outputs['logits']",
        "outputs['mutual_information']",
        "outputs['head_config']",
    ):
        assert item in out, item


def test_saved_model_deterministic_parity(exported):
    _, model, _, loaded, _ = exported
    x = _images(3, seed=5)  # a batch size the export never saw
    params = model(x, training=False)
    out = loaded.signatures["params"](images=tf.constant(x))
    np.testing.assert_allclose(out["params"], params, atol=ATOL)
    np.testing.assert_allclose(out["mean_logits"], model.head.mean_logits(params), atol=ATOL)
    config = tf.compat.as_str(out["head_config"].numpy())
    assert type(model.head).__name__ in config


def test_saved_model_seeded_outputs_match_keras(exported):
    _, model, _, loaded, _ = exported
    x = tf.constant(_images(2, seed=6))
    seed = tf.constant(SEED, tf.int64)
    params = model(x, training=False)
    # `sample` and `uncertainty`: independent draws (what `model.sample` gives a user) ...
    expected = model.head.sample_logits(params, EXPORT_N, seed=seed, antithetic=False)
    got = loaded.sample(x, num_samples=tf.constant(EXPORT_N), seed=seed)
    np.testing.assert_allclose(got["logits"], expected, atol=ATOL)
    np.testing.assert_array_equal(got["labels"], tf.argmax(expected, -1, output_type=tf.int32))
    # ... `serving_default`'s mean probabilities: the head's default (antithetic for the SSN).
    averaged = model.head.sample_logits(params, EXPORT_N, seed=seed)
    probs = tf.reduce_mean(tf.nn.softmax(averaged, -1), 0)
    default = loaded.serving_default(x, seed=seed)  # num_samples from its default
    np.testing.assert_allclose(default["probabilities"], probs, atol=ATOL)
    np.testing.assert_array_equal(default["labels"], tf.argmax(probs, -1, output_type=tf.int32))
    maps = loaded.uncertainty(x, seed=seed)
    expected_maps = export.uncertainty_maps(expected)
    for key in ("predictive_entropy", "expected_entropy", "mutual_information", "variance"):
        assert maps[key].shape == (2, H, W)
        np.testing.assert_allclose(maps[key], expected_maps[key], atol=ATOL)


def test_saved_model_seeded_sample_is_reproducible(exported):
    name, _, _, loaded, _ = exported
    x = tf.constant(_images(2, seed=7))
    n = tf.constant(2 * EXPORT_N + 3)  # more than one sampling chunk, not a multiple
    seed = tf.constant(SEED, tf.int64)
    a = loaded.sample(x, num_samples=n, seed=seed)["logits"].numpy()
    b = loaded.sample(x, num_samples=n, seed=seed)["logits"].numpy()
    assert a.shape == (2 * EXPORT_N + 3, 2, H, W, NUM_CLASSES)
    np.testing.assert_array_equal(a, b)
    # The first chunk is the seeded draw of EXPORT_N samples.
    first = loaded.sample(x, num_samples=tf.constant(EXPORT_N), seed=seed)["logits"].numpy()
    np.testing.assert_array_equal(a[:EXPORT_N], first)
    if name != "categorical":
        other = loaded.sample(x, num_samples=n, seed=tf.constant([4, 14], tf.int64))["logits"]
        fresh = loaded.sample(x, num_samples=n)["logits"]  # no seed: fresh randomness
        assert np.abs(a - other.numpy()).max() > 1e-3
        assert np.abs(a - fresh.numpy()).max() > 1e-3
        assert np.abs(a[EXPORT_N : 2 * EXPORT_N] - a[:EXPORT_N]).max() > 1e-3


def test_saved_model_rejects_bad_requests(low_rank_export):
    _, _, _, loaded, _ = low_rank_export
    x = tf.constant(_images(1))
    with pytest.raises(tf.errors.InvalidArgumentError, match="seed"):
        loaded.sample(x, seed=tf.constant([1, 2, 3], tf.int64))
    with pytest.raises(tf.errors.InvalidArgumentError, match="num_samples"):
        loaded.sample(x, num_samples=tf.constant(0))
    with pytest.raises(tf.errors.InvalidArgumentError, match="max_num_samples"):
        loaded.sample(x, num_samples=tf.constant(10**6))


def test_saved_model_samples_match_analytic_moments(exported):
    name, model, _, loaded, _ = exported
    x = _images(2, seed=8)
    n = 512
    samples = loaded.sample(
        tf.constant(x), num_samples=tf.constant(n), seed=tf.constant(SEED, tf.int64)
    )["logits"]
    _assert_moments(samples, model, x, antithetic=False)  # independent draws, every head


def _assert_no_mirrored_pairs(samples, mean):
    """No two draws are an antithetic pair: for one, `s_i + s_j = 2 mu` up to float error."""
    deviations = np.asarray(samples, np.float64) - np.asarray(mean, np.float64)[np.newaxis]
    flat = deviations.reshape(deviations.shape[0], deviations.shape[1], -1)  # [N, B, HWC]
    norms = np.linalg.norm(flat, axis=-1)
    assert norms.min() > 1e-2  # the draws deviate from the mean
    for i in range(len(flat)):
        for j in range(i + 1, len(flat)):
            # ||d_i + d_j|| / sqrt(||d_i||^2 + ||d_j||^2): ~1e-7 for a mirrored pair, and
            # about 1 for independent draws.
            mirror = np.linalg.norm(flat[i] + flat[j], axis=-1)
            mirror /= np.sqrt(norms[i] ** 2 + norms[j] ** 2)
            assert mirror.min() > 0.1, (i, j, mirror.min())


def _assert_uncorrelated_draws(groups, mean):
    """Draws `k` and `k + N/2` of each group `[R, N, B, H, W, C]` (one request or run each)
    are uncorrelated across the R groups: correlation ~0 per logit, where antithetic pairs
    (the SSN head's default) give exactly -1."""
    deviations = np.asarray(groups, np.float64) - np.asarray(mean, np.float64)
    half = deviations.shape[1] // 2
    a = deviations[:, :half].reshape(len(deviations), -1)
    b = deviations[:, half : 2 * half].reshape(len(deviations), -1)
    a, b = a - a.mean(0), b - b.mean(0)
    correlation = (a * b).sum(0) / np.sqrt((a * a).sum(0) * (b * b).sum(0))
    # R = 64 groups: each correlation is ~N(0, 1/64); logits are correlated with each other
    # (the low-rank factor), so their mean is bounded by that spread, not by its 1/sqrt(HWC).
    assert abs(correlation.mean()) < 0.25, correlation.mean()
    assert np.quantile(correlation, 0.05) > -0.6


@pytest.mark.parametrize("name", ["low_rank", "heteroscedastic"])
def test_saved_model_samples_are_independent_draws(name, tmp_path_factory):
    """`sample` gives N independent draws (not N/2 draws and their mirror images) - across
    its chunks too - as `model.sample` does; a client asking for 16 samples gets 16."""
    _, model, _, loaded, _ = _export(name, tmp_path_factory)
    x = _images(2, seed=13)
    mean = model.head.mean_logits(model(x, training=False))
    groups = 64
    samples = loaded.sample(
        tf.constant(x), num_samples=tf.constant(groups * EXPORT_N), seed=tf.constant(SEED, tf.int64)
    )["logits"].numpy()
    _assert_no_mirrored_pairs(samples[: 2 * EXPORT_N], mean)  # within and across two chunks
    _assert_uncorrelated_draws(samples.reshape(groups, EXPORT_N, *samples.shape[1:]), mean)
    fresh = loaded.sample(tf.constant(x))["logits"].numpy()  # unseeded, default num_samples
    assert fresh.shape[0] == EXPORT_N
    _assert_no_mirrored_pairs(fresh, mean)


# --------------------------------------------------------------------------------------------
# TF Serving's Predict contract, without the server binary
# --------------------------------------------------------------------------------------------
class _PredictServer:
    """Answers `PredictRequest`s the way TF Serving's `RunPredict` does, without the binary.

    The SavedModel is loaded by the TF1 session loader (TF Serving's path, which must find
    every variable from the MetaGraph alone); the signature is looked up by
    `model_spec.signature_name` (default `serving_default`); unknown inputs are rejected,
    missing ones are taken from the SignatureDef's `defaults` (as `GetInputValues` does),
    TensorProtos are fed by tensor name and `output_filter` selects the outputs.
    """

    def __init__(self, version_dir):
        self.graph = tf.Graph()
        self.session = tf.compat.v1.Session(graph=self.graph)
        with self.graph.as_default():
            self.meta_graph = tf.compat.v1.saved_model.loader.load(
                self.session, ["serve"], version_dir
            )

    def predict(self, request):
        name = request.model_spec.signature_name or "serving_default"
        if name not in self.meta_graph.signature_def:
            raise KeyError(f'Serving signature key "{name}" not found.')
        signature_def = self.meta_graph.signature_def[name]
        extra = set(request.inputs) - set(signature_def.inputs)
        if extra:
            raise ValueError(f"input tensor alias not found in signature: {sorted(extra)}")
        feeds = {}
        for alias, info in signature_def.inputs.items():
            if alias in request.inputs:
                tensor = request.inputs[alias]
            elif alias in signature_def.defaults:
                tensor = signature_def.defaults[alias]
            else:
                raise ValueError(f"{alias} not found in request and no default value provided")
            assert tensor.dtype == info.dtype, (alias, tensor.dtype, info.dtype)
            feeds[info.name] = tf.make_ndarray(tensor)
        aliases = list(request.output_filter) or sorted(signature_def.outputs)
        values = self.session.run([signature_def.outputs[a].name for a in aliases], feeds)
        response = predict_pb2.PredictResponse()
        response.model_spec.CopyFrom(request.model_spec)
        response.model_spec.signature_name = name
        for alias, value in zip(aliases, values, strict=True):
            response.outputs[alias].CopyFrom(tf.make_tensor_proto(value))
        return response

    def close(self):
        self.session.close()


def test_predict_request_is_answered_by_the_signature(low_rank_export):
    _, model, version_dir, _, _ = low_rank_export
    x = _images(2, seed=9)
    server = _PredictServer(version_dir)

    request = predict_pb2.PredictRequest()
    request.model_spec.name = "low_rank"
    request.model_spec.signature_name = "sample"
    request.inputs["images"].CopyFrom(tf.make_tensor_proto(x))
    request.inputs["num_samples"].CopyFrom(tf.make_tensor_proto(5, dtype=tf.int32))
    request.inputs["seed"].CopyFrom(tf.make_tensor_proto(SEED, dtype=tf.int64))
    request.output_filter.append("labels")
    response = server.predict(  # through the wire format
        predict_pb2.PredictRequest.FromString(request.SerializeToString())
    )
    labels = tf.make_ndarray(response.outputs["labels"])
    assert list(response.outputs) == ["labels"]
    assert labels.shape == (5, 2, H, W) and labels.dtype == np.int32
    expected = model.head.sample_logits(
        model(x, training=False), EXPORT_N, seed=tf.constant(SEED, tf.int64), antithetic=False
    )[:5]
    np.testing.assert_array_equal(labels, tf.argmax(expected, -1, output_type=tf.int32))

    # The default signature with only the images: num_samples and seed come from defaults.
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "low_rank"
    request.inputs["images"].CopyFrom(tf.make_tensor_proto(x))
    response = server.predict(request)
    assert response.model_spec.signature_name == "serving_default"
    probs = tf.make_ndarray(response.outputs["probabilities"])
    assert probs.shape == (2, H, W, NUM_CLASSES)
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
    assert tf.make_ndarray(response.outputs["labels"]).shape == (2, H, W)

    request = predict_pb2.PredictRequest()
    request.model_spec.signature_name = "params"
    request.inputs["images"].CopyFrom(tf.make_tensor_proto(x))
    response = server.predict(request)
    np.testing.assert_allclose(
        tf.make_ndarray(response.outputs["params"]), model(x, training=False), atol=ATOL
    )
    assert (
        type(model.head).__name__
        in tf.make_ndarray(response.outputs["head_config"]).item().decode()
    )
    server.close()


# --------------------------------------------------------------------------------------------
# ONNX
# --------------------------------------------------------------------------------------------
def _onnx_session(path):
    return onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])


def test_onnx_deterministic_parity_dynamic_batch(exported):
    name, model, _, _, onnx_path = exported
    session = _onnx_session(onnx_path)
    assert session.get_inputs()[0].shape[0] not in (1, 2)  # symbolic batch
    x = _images(3, seed=10)
    names = [o.name for o in session.get_outputs()]
    out = dict(zip(names, session.run(None, {"images": x}), strict=True))
    params = model(x, training=False)
    np.testing.assert_allclose(out["params"], params, atol=ATOL)
    np.testing.assert_allclose(out["mean_logits"], model.head.mean_logits(params), atol=ATOL)
    assert out["logit_samples"].shape == (EXPORT_N, 3, H, W, NUM_CLASSES)
    assert out["label_samples"].shape == (EXPORT_N, 3, H, W)
    assert out["labels"].shape == (3, H, W)
    np.testing.assert_allclose(out["probabilities"].sum(-1), 1.0, atol=1e-5)
    maps = export.uncertainty_maps(tf.constant(out["logit_samples"]))
    for key, value in maps.items():
        np.testing.assert_allclose(out[key], value, atol=ATOL)
    if name == "categorical":
        np.testing.assert_allclose(
            out["logit_samples"],
            np.broadcast_to(out["mean_logits"], (EXPORT_N, 3, H, W, 3)),
            atol=ATOL,
        )


def test_onnx_samples_match_analytic_moments(exported):
    _, model, _, _, onnx_path = exported
    session = _onnx_session(onnx_path)
    x = _images(2, seed=11)
    runs = [session.run(["logit_samples"], {"images": x})[0] for _ in range(64)]
    _assert_moments(np.concatenate(runs), model, x, antithetic=False)  # independent draws


@pytest.mark.parametrize("name", ["low_rank", "heteroscedastic"])
def test_onnx_samples_are_independent_draws(name, tmp_path_factory):
    _, model, _, _, onnx_path = _export(name, tmp_path_factory)
    session = _onnx_session(onnx_path)
    x = _images(2, seed=13)
    mean = model.head.mean_logits(model(x, training=False))
    runs = [session.run(["logit_samples", "probabilities"], {"images": x}) for _ in range(64)]
    samples = np.stack([logits for logits, _ in runs])  # [64 runs, N, B, H, W, C]
    _assert_no_mirrored_pairs(samples[0], mean)
    _assert_uncorrelated_draws(samples, mean)
    # The averages of a run are those of its own (independent) logit samples.
    logits, probabilities = runs[0]
    np.testing.assert_allclose(
        probabilities, tf.reduce_mean(tf.nn.softmax(logits, -1), 0), atol=1e-5
    )


def test_onnx_metadata_holds_head_config(exported):
    _, model, _, _, onnx_path = exported
    _onnx_session(onnx_path)
    import onnx as onnx_lib

    meta = {p.key: p.value for p in onnx_lib.load(onnx_path).metadata_props}
    assert type(model.head).__name__ in meta["tfp_seg"]


# --------------------------------------------------------------------------------------------
# Adapters, errors, layout
# --------------------------------------------------------------------------------------------
class _SelfSampling(keras.Model):
    """A user's model that samples itself: it declares `tfp_seg.protocols.GraphSampler` (as
    the Probabilistic U-Net does), which is what makes it exportable."""

    num_classes = 2

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.conv = keras.layers.Conv2D(2, 1)

    def call(self, x):
        return self.conv(x)

    def mean_logits_tensor(self, images):
        return self(images)

    def sample_logits_tensor(self, images, num_samples, seed=None):  # graph-safe ops
        logits = self(images)
        shape = tf.concat([[num_samples], tf.shape(logits)], 0)
        noise = tfp_seg.distributions.standard_normal(shape, seed=seed)
        return logits[tf.newaxis] + 0.5 * noise


def test_export_of_a_self_sampling_model(tmp_path):
    model = _SelfSampling()
    assert isinstance(model, tfp_seg.protocols.GraphSampler)
    model.build((None, 8, 8, 1))
    x = _images(2, h=8, w=8)
    version_dir = export.saved_model(model, str(tmp_path / "m" / "7"), num_samples=4)
    assert version_dir.endswith(os.path.join("m", "7"))
    loaded = tf.saved_model.load(version_dir)
    out = loaded.params(tf.constant(x))
    np.testing.assert_allclose(out["mean_logits"], model(x), atol=ATOL)
    samples = loaded.sample(tf.constant(x), num_samples=tf.constant(6))["logits"]
    assert samples.shape == (6, 2, 8, 8, 2)
    path = export.onnx(model, str(tmp_path / "m.onnx"), num_samples=4)
    assert os.path.isfile(path)


def _prob_unet():
    keras.utils.set_random_seed(4)
    model = ProbabilisticUNet(
        num_classes=NUM_CLASSES,
        latent_dim=2,
        backbone=UNet(base_filters=4, depth=1),
        encoder_filters=(4, 8),
        encoder_convs_per_block=1,
        num_fcomb_convs=1,
    )
    model.build((None, H, W, 1))
    return model


def _hprob_unet():
    keras.utils.set_random_seed(4)
    model = HierarchicalProbabilisticUNet(
        num_classes=NUM_CLASSES,
        latent_dim=1,
        latent_levels=2,
        backbone=UNet(base_filters=4, depth=1),
        encoder_filters=(4, 8, 8),
        encoder_convs_per_block=1,
        num_fcomb_convs=1,
    )
    model.build((None, H, W, 1))
    return model


@pytest.mark.parametrize(
    "make, name",
    [(_prob_unet, "ProbabilisticUNet"), (_hprob_unet, "HierarchicalProbabilisticUNet")],
)
def test_saved_model_of_a_probabilistic_unet(tmp_path, make, name):
    """The Prob U-Nets sample themselves (prior latents through f_comb): the function adapter."""
    model = make()
    x = _images(2, seed=12)
    seed = tf.constant(SEED, tf.int64)
    version_dir = export.saved_model(model, str(tmp_path / "pu"), num_samples=EXPORT_N)
    loaded = tf.saved_model.load(version_dir)
    out = loaded.params(tf.constant(x))
    np.testing.assert_allclose(out["mean_logits"], model(x, training=False), atol=ATOL)
    assert f'"{name}"' in tf.compat.as_str(out["head_config"].numpy())
    expected = model.sample_logits(x, EXPORT_N, seed=seed)
    got = loaded.sample(tf.constant(x), seed=seed)["logits"]
    np.testing.assert_allclose(got, expected, atol=ATOL)
    n = 3 * EXPORT_N
    a = loaded.sample(tf.constant(x), num_samples=tf.constant(n), seed=seed)["logits"].numpy()
    assert a.shape == (n, 2, H, W, NUM_CLASSES) and np.abs(a - a[:1]).max() > 1e-4


@pytest.mark.parametrize("make", [_prob_unet, _hprob_unet])
def test_onnx_of_a_probabilistic_unet(tmp_path, make):
    model = make()
    x = _images(2, seed=12)
    path = export.onnx(model, str(tmp_path / "pu.onnx"), num_samples=EXPORT_N)
    session = _onnx_session(path)
    onnx_samples = np.concatenate(
        [session.run(["logit_samples"], {"images": x})[0] for _ in range(32)]
    )
    # No closed form: ONNX sample mean vs a Keras sample mean, k * sqrt(s1^2/n1 + s2^2/n2).
    keras_samples = model.sample_logits(x, len(onnx_samples), seed=tf.constant(SEED, tf.int64))
    tolerance = (
        K_SIGMA * np.sqrt((onnx_samples.var(0) + keras_samples.var(0)) / len(onnx_samples)) + 1e-5
    )
    assert np.all(np.abs(onnx_samples.mean(0) - keras_samples.mean(0)) <= tolerance)
    assert np.abs(onnx_samples - onnx_samples[:1]).max() > 1e-4  # fresh draws per sample


def _softmax(logits):
    return np.asarray(tf.nn.softmax(np.asarray(logits, np.float32), axis=-1), np.float64)


def _assert_same_mean(samples, reference):
    """Per-entry means of two sample sets `[n, ...]` agree within k * sqrt(s1^2/n1 + s2^2/n2)."""
    tolerance = K_SIGMA * np.sqrt(samples.var(0) / len(samples) + reference.var(0) / len(reference))
    assert np.all(np.abs(samples.mean(0) - reference.mean(0)) <= tolerance + 1e-5)


def test_mc_dropout_exports_dropout_on_in_its_samples(tmp_path):
    """An `MCDropout` sampler exports faithfully: fresh dropout masks per sample, the network
    with dropout off in the deterministic outputs; its samples are distributed as Keras'."""
    keras.utils.set_random_seed(5)
    model = ProbabilisticSegmenter(
        UNet(base_filters=4, depth=1, dropout=0.3), CategoricalLogits(NUM_CLASSES)
    )
    model.build((None, H, W, 1))
    mc = MCDropout(model, num_samples=EXPORT_N)
    x = _images(2, seed=14)
    version_dir = export.saved_model(mc, str(tmp_path / "mc"), num_samples=EXPORT_N)
    loaded = tf.saved_model.load(version_dir)
    out = loaded.params(tf.constant(x))
    np.testing.assert_allclose(out["mean_logits"], model(x, training=False), atol=ATOL)
    assert '"MCDropout"' in tf.compat.as_str(out["head_config"].numpy())
    n = 16 * EXPORT_N
    seed = tf.constant(SEED, tf.int64)
    samples = loaded.sample(tf.constant(x), num_samples=tf.constant(n), seed=seed)["logits"]
    samples = samples.numpy()
    again = loaded.sample(tf.constant(x), num_samples=tf.constant(n), seed=seed)["logits"]
    np.testing.assert_array_equal(samples, again)  # seeded: reproducible
    assert np.abs(samples - samples[:1]).max() > 1e-2  # ... and fresh masks in every sample
    probs, reference = _softmax(samples), mc.probability_samples(x, n, seed=0)
    _assert_same_mean(probs, reference)
    spread = probs.var(0).sum() / reference.var(0).sum()
    assert 0.7 < spread < 1.4, spread  # a plain (dropout-off) export has no spread at all
    path = export.onnx(mc, str(tmp_path / "mc.onnx"), num_samples=EXPORT_N)
    session = _onnx_session(path)
    runs = [session.run(["logit_samples"], {"images": x})[0] for _ in range(n // EXPORT_N)]
    onnx_probs = _softmax(np.concatenate(runs))
    _assert_same_mean(onnx_probs, reference)
    assert 0.7 < onnx_probs.var(0).sum() / reference.var(0).sum() < 1.4


def test_mc_dropout_with_an_unexportable_dropout_layer_is_an_export_error(tmp_path):
    keras.utils.set_random_seed(5)
    backbone = keras.Sequential(
        [keras.layers.Conv2D(4, 3, padding="same"), keras.layers.AlphaDropout(0.2)]
    )
    model = ProbabilisticSegmenter(backbone, CategoricalLogits(NUM_CLASSES))
    model.build((None, H, W, 1))
    with pytest.raises(export.ExportError, match="AlphaDropout"):
        export.saved_model(MCDropout(model), str(tmp_path / "alpha" / "1"))
    with pytest.raises(export.ExportError, match="AlphaDropout"):
        export.onnx(MCDropout(model), str(tmp_path / "alpha.onnx"))
    assert not (tmp_path / "alpha").exists() and not (tmp_path / "alpha.onnx").exists()


def _ensemble_member(seed, head):
    keras.utils.set_random_seed(seed)
    backbone = keras.Sequential([keras.layers.Conv2D(4, 3, padding="same", activation="relu")])
    member = ProbabilisticSegmenter(backbone, head)
    member.build((None, H, W, 1))
    return member


def test_deep_ensemble_exports_every_member(tmp_path):
    """Sample n from member n mod M, across the SavedModel's chunks (4 = chunk, M = 3)."""
    ensemble = DeepEnsemble(
        [_ensemble_member(10 + i, CategoricalLogits(NUM_CLASSES)) for i in range(3)]
    )
    x = _images(2, seed=15)
    version_dir = export.saved_model(ensemble, str(tmp_path / "ens"), num_samples=4)
    loaded = tf.saved_model.load(version_dir)
    out = loaded.params(tf.constant(x))
    member_logits = [m.head.mean_logits(m(x, training=False)) for m in ensemble.members]
    np.testing.assert_allclose(out["mean_logits"], np.mean(member_logits, axis=0), atol=ATOL)
    assert '"DeepEnsemble"' in tf.compat.as_str(out["head_config"].numpy())
    n = 11
    got = loaded.sample(tf.constant(x), num_samples=tf.constant(n))
    np.testing.assert_allclose(got["logits"], ensemble.sample_logits(x, n), atol=ATOL)
    np.testing.assert_array_equal(got["labels"], ensemble.sample(x, n))
    default = loaded.serving_default(tf.constant(x), num_samples=tf.constant(6))
    np.testing.assert_allclose(default["probabilities"], ensemble.predict_proba(x, 6), atol=ATOL)
    path = export.onnx(ensemble, str(tmp_path / "ens.onnx"), num_samples=4)
    names = [o.name for o in _onnx_session(path).get_outputs()]
    onnx_out = dict(zip(names, _onnx_session(path).run(None, {"images": x}), strict=True))
    np.testing.assert_allclose(onnx_out["logit_samples"], ensemble.sample_logits(x, 4), atol=ATOL)
    np.testing.assert_allclose(onnx_out["probabilities"], ensemble.predict_proba(x, 4), atol=ATOL)


def test_deep_ensemble_of_ssn_members_samples_each_members_head(tmp_path):
    ensemble = DeepEnsemble(
        [_ensemble_member(20 + i, LowRankLogits(NUM_CLASSES, rank=2)) for i in (0, 1)]
    )
    x = _images(2, seed=16)
    version_dir = export.saved_model(ensemble, str(tmp_path / "ssn_ens"), num_samples=4)
    loaded = tf.saved_model.load(version_dir)
    n = 64
    samples = loaded.sample(
        tf.constant(x), num_samples=tf.constant(n), seed=tf.constant(SEED, tf.int64)
    )["logits"].numpy()
    for j, member in enumerate(ensemble.members):  # samples j, j + 2, ...: member j's draws
        own = samples[j::2]
        _assert_moments(own, member, x, antithetic=False)
        _assert_no_mirrored_pairs(own[:8], member.head.mean_logits(member(x, training=False)))


class _DynamicSizeBug(keras.layers.Layer):
    """Traces with an unknown H, W into a bug of its own (not a need for a static size)."""

    def call(self, x):
        if x.shape[1] is None:
            raise _ModelBug("bug in the dynamic-size branch")
        return x


class _ModelBug(Exception):
    pass


def test_trace_errors_with_dynamic_sizes_are_not_swallowed(tmp_path):
    keras.utils.set_random_seed(7)
    backbone = keras.Sequential([keras.layers.Conv2D(4, 3, padding="same"), _DynamicSizeBug()])
    model = ProbabilisticSegmenter(backbone, CategoricalLogits(NUM_CLASSES))
    model.build((None, H, W, 1))
    with pytest.raises(_ModelBug, match="dynamic-size branch"):
        export.saved_model(model, str(tmp_path / "bug" / "1"), num_samples=2)
    with pytest.raises(_ModelBug, match="dynamic-size branch"):
        export.onnx(model, str(tmp_path / "bug.onnx"), num_samples=2)
    # A fixed size is still exported when asked for.
    version_dir = export.saved_model(
        model, str(tmp_path / "bug" / "1"), num_samples=2, dynamic_spatial=False
    )
    signature = tf.saved_model.load(version_dir).signatures["sample"]
    assert signature.structured_input_signature[1]["images"].shape[1:] == [H, W, 1]


def test_a_backbone_that_needs_a_static_size_exports_with_it():
    """SegFormer's MiT cannot trace with unknown H, W (a TypeError): the fixed size is used."""
    backbone = tfp_seg.models.build_backbone("segformer_mit_b0", input_shape=(64, 64, 1))
    model = ProbabilisticSegmenter(backbone, LowRankLogits(NUM_CLASSES, rank=2))
    model.build((None, 64, 64, 1))
    spec = export_common.image_spec(export.as_adapter(model), None, num_samples=2)
    assert spec.shape.as_list() == [None, 64, 64, 1]


@pytest.mark.parametrize("error", [ValueError, TypeError])
def test_genuine_trace_errors_surface_as_themselves(tmp_path, error):
    """A model error while tracing is the model's, whatever the H/W: not swallowed by the
    dynamic-size probe, and not reported as a tf2onnx conversion failure."""
    model = keras.Sequential([keras.layers.Conv2D(2, 1)])
    model.build((None, 8, 8, 1))

    def sample_logits(x, n, seed):
        raise error("genuine bug in sample_logits")

    adapter = export.ExportAdapter.from_functions(
        model, num_classes=2, sample_logits=sample_logits, mean_logits=model
    )
    with pytest.raises(error, match="genuine bug"):
        export.saved_model(adapter, str(tmp_path / "m" / "1"), num_samples=2)
    with pytest.raises(error, match="genuine bug") as info:
        export.onnx(adapter, str(tmp_path / "m.onnx"), num_samples=2)
    assert not isinstance(info.value, export.ExportError)
    assert not (tmp_path / "m.onnx").exists() and not (tmp_path / "m" / "1").exists()


def test_as_adapter_rejects_unknown_models():
    with pytest.raises(ValueError, match="DistributionHead"):
        export.as_adapter(keras.Sequential([keras.layers.Dense(2)]))


def _noisy_adapter():
    """Params differ between the eager (Keras) call and the exported graph: parity fails."""
    model = keras.Sequential([keras.layers.Conv2D(2, 1)])
    model.build((None, 8, 8, 1))
    return export.ExportAdapter.from_functions(
        model,
        num_classes=2,
        sample_logits=lambda x, n, seed: tf.repeat(model(x)[tf.newaxis], n, axis=0),
        mean_logits=model,
        params=lambda x: {"params": model(x) + tf.random.normal(tf.shape(model(x)))},
    )


def test_parity_failures_raise(tmp_path):
    with pytest.raises(export.ExportParityError, match="params"):
        export.saved_model(_noisy_adapter(), str(tmp_path / "noisy" / "1"), num_samples=2)
    assert os.listdir(tmp_path / "noisy") == []  # no servable version left behind


def test_onnx_detects_frozen_sampling_noise(tmp_path):
    model = keras.Sequential([keras.layers.Conv2D(2, 1)])
    model.build((None, 8, 8, 1))
    adapter = export.ExportAdapter.from_functions(
        model,
        num_classes=2,
        # keras.random.normal is converted by tf2onnx with its noise frozen into a constant.
        sample_logits=lambda x, n, seed: (
            model(x)[tf.newaxis] + keras.random.normal((n, 1, 8, 8, 2))
        ),
        mean_logits=model,
    )
    with pytest.raises(export.ExportParityError, match="frozen"):
        export.onnx(adapter, str(tmp_path / "frozen.onnx"), num_samples=2)


def test_parity_failures_raise_onnx(tmp_path):
    with pytest.raises(export.ExportParityError, match="params"):
        export.onnx(_noisy_adapter(), str(tmp_path / "noisy.onnx"), num_samples=2)
    assert not (tmp_path / "noisy.onnx").exists()


def test_onnx_without_tf2onnx_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tf2onnx", None)
    with pytest.raises(ImportError, match=r"tfp_seg\[onnx\]"):
        export.onnx(_lowrank_model(), str(tmp_path / "m.onnx"))


def test_version_directories(tmp_path):
    base = tmp_path / "savedmodels" / "ssn"
    (base / "1").mkdir(parents=True)
    (base / "1" / "saved_model.pb").write_bytes(b"")
    with pytest.raises(FileExistsError, match="overwrite"):
        export.saved_model(_lowrank_model(), str(base / "1"))
    version_dir = export.saved_model(_lowrank_model(), str(base), num_samples=2, check=False)
    assert version_dir == str(base / "2")
    with pytest.raises(ValueError, match="num_samples"):
        export.saved_model(_lowrank_model(), str(base / "3"), num_samples=0)
