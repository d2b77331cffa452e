"""Export of volume models (`spatial_dims=3`): SavedModel and ONNX through the 2D code path.

Tiny 3D models (8x8x8 voxels, 2 channels, 3 classes, `UNet(base_filters=4, depth=1,
spatial_dims=3)`) with every head (SSN low-rank, heteroscedastic, deterministic, mixture),
MC dropout, a deep ensemble and the Probabilistic U-Net are exported in both formats, reloaded,
and compared with the Keras model signature by signature: deterministic outputs within 1e-4
(a batch size the export never saw), seeded SavedModel samples equal the head's own seeded
draws, and every spatial output has the volume's axes (`[B, D, H, W, ...]`). Sampled outputs
are checked against the head's analytic moments with `atol = k * sigma / sqrt(n)` (k = 5, the
largest per-logit sigma: one bound for a family of 3072 logits), including the variance of each
volume's logit sum, `||P^T 1||^2 + sum(D)`, which only a sampler of the low-rank cross-voxel
covariance matches. Inputs of the wrong rank fail in the exported graphs with an error that
names the shape, and the exporters' own arguments get a `ValueError` naming the argument.
"""

from __future__ import annotations

import json
import os

import keras
import numpy as np
import onnxruntime
import pytest
import tensorflow as tf
import tf2onnx  # noqa: F401  (a test dependency: the [test] extra installs it)

from tfp_seg import export, protocols
from tfp_seg.layers import (
    CategoricalLogits,
    HeteroscedasticLogits,
    LowRankLogits,
    MixtureLowRankLogits,
)
from tfp_seg.models import ProbabilisticSegmenter, ProbabilisticUNet, UNet
from tfp_seg.uncertainty import DeepEnsemble, MCDropout

ATOL = 1e-4
K_SIGMA = 5.0
D = H = W = 8
CH = 2
C = 3
SHAPE = (D, H, W, CH)
EXPORT_N = 4
SEED = [3, 14]
MAPS = ("predictive_entropy", "expected_entropy", "mutual_information", "variance")
MIXTURE_NAMES = ("mixture_logits", "component_loc", "component_cov_factor", "component_cov_diag")


def _volumes(batch, seed=0, size=(D, H, W)):
    return np.random.default_rng(seed).normal(size=(batch, *size, CH)).astype("float32")


def _masks(batch):
    """Volume b: a box shifted by b voxels along D (so that the masks differ per volume)."""
    mask = np.zeros((batch, D, H, W), "float32")
    for b in range(batch):
        mask[b, D // 4 + b : 3 * D // 4 + b, H // 4 : 3 * H // 4, W // 4 : 3 * W // 4] = 1.0
    return mask


def _segmenter(head, seed, dropout=0.0, unet=True):
    """The head on `UNet(base_filters=4, depth=1, spatial_dims=3)`, or (`unet=False`, cheap
    ensemble members) on one 3x3x3 convolution."""
    keras.utils.set_random_seed(seed)
    if unet:
        backbone = UNet(base_filters=4, depth=1, dropout=dropout, spatial_dims=3)
    else:
        backbone = keras.Sequential([keras.layers.Conv3D(4, 3, padding="same", activation="relu")])
    model = ProbabilisticSegmenter(backbone, head)
    model.build((None, *SHAPE))
    return model


def _low_rank():
    return _segmenter(LowRankLogits(C, rank=2, spatial_dims=3), seed=1)


def _heteroscedastic():
    model = _segmenter(HeteroscedasticLogits(C, low_rank_classes=2, spatial_dims=3), seed=3)
    # Its bias starts at a tiny variance; lift it so that the moment test has signal.
    kernel, bias = model.head.projection.get_weights()
    bias[C : 2 * C] = -1.0
    model.head.projection.set_weights([kernel, bias])
    return model


def _categorical():
    return _segmenter(CategoricalLogits(C, spatial_dims=3), seed=2)


def _mixture():
    return _segmenter(MixtureLowRankLogits(C, num_components=2, rank=2, spatial_dims=3), seed=5)


HEADS = {
    "low_rank": _low_rank,
    "heteroscedastic": _heteroscedastic,
    "categorical": _categorical,
    "mixture": _mixture,
}
_EXPORTS: dict = {}


def _export(name, tmp_path_factory):
    """(model, loaded SavedModel, its version dir, ONNX path), once per head."""
    if name not in _EXPORTS:
        model = HEADS[name]()
        base = tmp_path_factory.mktemp("export3d") / "savedmodels" / name
        version_dir = export.saved_model(model, str(base), num_samples=EXPORT_N)
        path = export.onnx(model, str(base.parent / f"{name}.onnx"), EXPORT_N)
        _EXPORTS[name] = (model, tf.saved_model.load(version_dir), version_dir, path)
    return _EXPORTS[name]


@pytest.fixture(scope="module", params=sorted(HEADS))
def exported(request, tmp_path_factory):
    return (request.param, *_export(request.param, tmp_path_factory))


def _softmax(logits):
    """Softmax over the last axis in numpy (oneDNN's softmax takes at most 5 dimensions)."""
    logits = np.asarray(logits, np.float64)
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _session(path):
    return onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])


def _expected_params(model, inputs):
    """The `params` outputs the Keras model gives for `inputs`, by name."""
    params = model(inputs, training=False)
    head = model.head
    out = {"params": params, "mean_logits": head.mean_logits(params)}
    if isinstance(head, protocols.CovarianceHead):
        names = ("loc", "cov_factor", "cov_diag")
        out.update(zip(names, head.covariance_parts(params), strict=True))
    if isinstance(head, protocols.MixtureHead):
        out.update(zip(MIXTURE_NAMES, head.mixture_parts(params), strict=True))
    return {k: np.asarray(v) for k, v in out.items()}


def _assert_outputs(got, expected, what):
    for key, value in expected.items():
        assert np.shape(got[key]) == value.shape, (what, key)
        np.testing.assert_allclose(got[key], value, atol=ATOL, err_msg=f"{what} {key}")


# --------------------------------------------------------------------------------------------
# Every head: signatures, parity
# --------------------------------------------------------------------------------------------
def test_signatures_take_volumes(exported):
    name, model, loaded, version_dir, path = exported
    for signature in export.SIGNATURES:
        spec = loaded.signatures[signature].structured_input_signature[1]["images"]
        assert spec.shape.rank == 5 and spec.shape[0] is None and spec.shape[-1] == CH
    with open(os.path.join(version_dir, "assets.extra", "tfp_seg.json")) as f:
        meta = json.load(f)
    assert len(meta["image_shape"]) == 4 and meta["image_shape"][-1] == CH
    assert meta["head_config"]["head"]["config"]["spatial_dims"] == 3
    if name in ("low_rank", "mixture"):  # the outputs are described with the volume's axes
        assert all(
            "H, W" not in t or "D, H, W" in t
            for t in meta["head_config"]["params_outputs"].values()
        )
    (images,) = _session(path).get_inputs()
    assert images.name == "images" and len(images.shape) == 5 and images.shape[-1] == CH


def test_saved_model_params_equal_the_keras_models(exported):
    name, model, loaded, _, _ = exported
    x = _volumes(3, seed=5)  # a batch size the export never saw
    out = loaded.params(tf.constant(x))
    _assert_outputs(out, _expected_params(model, x), "SavedModel params")
    assert model.head.__class__.__name__ in tf.compat.as_str(out["head_config"].numpy())


def test_saved_model_seeded_signatures_equal_the_heads_draws(exported):
    name, model, loaded, _, _ = exported
    x = tf.constant(_volumes(2, seed=6))
    seed = tf.constant(SEED, tf.int64)
    params = model(x, training=False)
    expected = model.head.sample_logits(params, EXPORT_N, seed=seed, antithetic=False)
    got = loaded.sample(x, num_samples=tf.constant(EXPORT_N), seed=seed)
    assert got["logits"].shape == (EXPORT_N, 2, D, H, W, C)
    assert got["labels"].shape == (EXPORT_N, 2, D, H, W) and got["labels"].dtype == tf.int32
    np.testing.assert_allclose(got["logits"], expected, atol=ATOL)
    np.testing.assert_array_equal(got["labels"], tf.argmax(expected, -1, output_type=tf.int32))
    # `serving_default`: the mean softmax of the head's draws for Monte Carlo means (SSN:
    # antithetic pairs), `head.mean_sampling`.
    n, antithetic = model.head.mean_sampling(EXPORT_N)
    averaged = model.head.sample_logits(params, n, seed=seed, antithetic=antithetic)
    probs = _softmax(averaged).mean(0)
    default = loaded.serving_default(x, seed=seed)  # num_samples from its default
    assert default["labels"].shape == (2, D, H, W)
    np.testing.assert_allclose(default["probabilities"], probs, atol=ATOL)
    np.testing.assert_array_equal(default["labels"], np.argmax(probs, -1))
    maps = loaded.uncertainty(x, seed=seed)
    for key, value in export.uncertainty_maps(expected).items():
        assert maps[key].shape == (2, D, H, W)
        np.testing.assert_allclose(maps[key], value, atol=ATOL, err_msg=key)
    if name != "categorical":  # more than one chunk: reproducible, and fresh across chunks
        n = tf.constant(2 * EXPORT_N + 1)
        a = loaded.sample(x, num_samples=n, seed=seed)["logits"].numpy()
        np.testing.assert_array_equal(a, loaded.sample(x, num_samples=n, seed=seed)["logits"])
        np.testing.assert_array_equal(a[:EXPORT_N], got["logits"])
        assert np.abs(a[EXPORT_N : 2 * EXPORT_N] - a[:EXPORT_N]).max() > 1e-3


def test_volumes_of_other_sizes(tmp_path_factory):
    """The 3D U-Net traces with unknown sizes (its trilinear upsampling is gather-based), so
    the exports take any D, H, W divisible by 2**depth, as Keras does."""
    model, loaded, _, path = _export("low_rank", tmp_path_factory)
    spec = loaded.signatures["sample"].structured_input_signature[1]["images"]
    assert spec.shape.as_list() == [None, None, None, None, CH]
    x = _volumes(1, seed=9, size=(4, 8, 6))
    expected = _expected_params(model, x)
    _assert_outputs(loaded.params(tf.constant(x)), expected, "SavedModel params (4x8x6)")
    session = _session(path)
    names = [o.name for o in session.get_outputs()]
    out = dict(zip(names, session.run(None, {"images": x}), strict=True))
    _assert_outputs(out, expected, "ONNX (4x8x6)")
    assert out["logit_samples"].shape == (EXPORT_N, 1, 4, 8, 6, C)


def test_onnx_outputs_equal_the_keras_models(exported):
    name, model, _, _, path = exported
    session = _session(path)
    x = _volumes(3, seed=7)
    names = [o.name for o in session.get_outputs()]
    out = dict(zip(names, session.run(None, {"images": x}), strict=True))
    _assert_outputs(out, _expected_params(model, x), "ONNX")
    assert out["logit_samples"].shape == (EXPORT_N, 3, D, H, W, C)
    assert out["label_samples"].shape == (EXPORT_N, 3, D, H, W)
    assert out["labels"].shape == (3, D, H, W)
    np.testing.assert_allclose(
        out["probabilities"], _softmax(out["logit_samples"]).mean(0), atol=1e-5
    )
    np.testing.assert_array_equal(out["labels"], np.argmax(out["probabilities"], -1))
    for key, value in export.uncertainty_maps(tf.constant(out["logit_samples"])).items():
        assert out[key].shape == (3, D, H, W)
        np.testing.assert_allclose(out[key], value, atol=ATOL, err_msg=key)
    (again,) = session.run(["logit_samples"], {"images": x})
    if name == "categorical":  # a point mass: every sample is the mean
        np.testing.assert_allclose(
            again, np.broadcast_to(out["mean_logits"], again.shape), atol=ATOL
        )
    else:  # fresh noise per run
        assert np.abs(again - out["logit_samples"]).max() > 1e-3


# --------------------------------------------------------------------------------------------
# Sampled outputs vs analytic moments
# --------------------------------------------------------------------------------------------
def _analytic(model, x):
    """Per-logit mean and variance `[B, D, H, W, C]` and the variance of each volume's logit
    sum `[B]`: `||P^T 1||^2 + sum(D)` (SSN: one factor over the whole volume) or
    `sum_voxels ||V_v^T 1||^2 + sum(D)` (heteroscedastic: a factor per voxel)."""
    params = model(x, training=False)
    head = model.head
    _, factor, diag = (np.asarray(t, np.float64) for t in head.covariance_parts(params))
    variance = diag + np.sum(factor**2, -1)
    if isinstance(head, LowRankLogits):
        cross = np.square(factor.sum(axis=(1, 2, 3, 4))).sum(-1)
    else:
        cross = np.square(factor.sum(axis=4)).sum(axis=(1, 2, 3, 4))
    return np.asarray(head.mean_logits(params)), variance, cross + diag.sum(axis=(1, 2, 3, 4))


def _assert_moments(samples, model, x):
    samples = np.asarray(samples, np.float64)
    mean, variance, total = _analytic(model, x)
    n = samples.shape[0]
    np.testing.assert_allclose(
        samples.mean(0), mean, atol=K_SIGMA * np.sqrt(variance.max() / n) + 1e-5
    )
    # Var of a sample variance of normals: 2 sigma^4 / (n - 1).
    np.testing.assert_allclose(
        samples.var(0, ddof=1),
        variance,
        atol=K_SIGMA * variance.max() * np.sqrt(2.0 / (n - 1)) + 1e-5,
    )
    sums = samples.sum(axis=(2, 3, 4, 5))
    np.testing.assert_allclose(
        sums.var(0, ddof=1), total, rtol=K_SIGMA * np.sqrt(2.0 / (n - 1)), atol=1e-4
    )


@pytest.mark.parametrize("name", ["low_rank", "heteroscedastic"])
def test_samples_match_analytic_moments(name, tmp_path_factory):
    model, loaded, _, path = _export(name, tmp_path_factory)
    x = _volumes(2, seed=8)
    n = 256
    seeded = loaded.sample(
        tf.constant(x), num_samples=tf.constant(n), seed=tf.constant(SEED, tf.int64)
    )["logits"]
    _assert_moments(seeded, model, x)
    session = _session(path)
    runs = [session.run(["logit_samples"], {"images": x})[0] for _ in range(n // EXPORT_N)]
    _assert_moments(np.concatenate(runs), model, x)


# --------------------------------------------------------------------------------------------
# Wrappers and self-sampling models
# --------------------------------------------------------------------------------------------


def _assert_same_mean(samples, reference):
    """Per-entry means of two sample sets `[n, ...]` agree within k * sqrt(s1^2/n1 + s2^2/n2)."""
    tolerance = K_SIGMA * np.sqrt(samples.var(0) / len(samples) + reference.var(0) / len(reference))
    assert np.all(np.abs(samples.mean(0) - reference.mean(0)) <= tolerance + 1e-5)


def test_mc_dropout_over_a_volume_model(tmp_path):
    """Dropout off in `params`, fresh masks per sample; the samples' mean softmax and spread
    are those of Keras' own MC dropout."""
    model = _segmenter(CategoricalLogits(C, spatial_dims=3), seed=9, dropout=0.3)
    mc = MCDropout(model, num_samples=EXPORT_N)
    x = _volumes(2, seed=14)
    loaded = tf.saved_model.load(export.saved_model(mc, str(tmp_path / "mc"), EXPORT_N))
    out = loaded.params(tf.constant(x))
    np.testing.assert_allclose(out["mean_logits"], model(x, training=False), atol=ATOL)
    n = 16 * EXPORT_N
    seed = tf.constant(SEED, tf.int64)
    samples = loaded.sample(tf.constant(x), num_samples=tf.constant(n), seed=seed)["logits"]
    assert samples.shape == (n, 2, D, H, W, C)
    again = loaded.sample(tf.constant(x), num_samples=tf.constant(n), seed=seed)["logits"]
    np.testing.assert_array_equal(samples, again)  # seeded: reproducible
    probs, reference = _softmax(samples), mc.probability_samples(x, n, seed=0)
    _assert_same_mean(probs, reference)
    assert 0.7 < probs.var(0).sum() / reference.var(0).sum() < 1.4
    session = _session(export.onnx(mc, str(tmp_path / "mc.onnx"), num_samples=EXPORT_N))
    runs = [session.run(["logit_samples"], {"images": x})[0] for _ in range(n // EXPORT_N)]
    onnx_probs = _softmax(np.concatenate(runs))
    _assert_same_mean(onnx_probs, reference)
    assert 0.7 < onnx_probs.var(0).sum() / reference.var(0).sum() < 1.4


def test_deep_ensemble_of_volume_models(tmp_path):
    """Sample n from member n mod M across the SavedModel's chunks (chunk 4, M = 2)."""
    members = [
        _segmenter(CategoricalLogits(C, spatial_dims=3), 10 + i, unet=False) for i in range(2)
    ]
    ensemble = DeepEnsemble(members)
    x = _volumes(2, seed=15)
    loaded = tf.saved_model.load(export.saved_model(ensemble, str(tmp_path / "ens"), EXPORT_N))
    member_logits = [m.head.mean_logits(m(x, training=False)) for m in members]
    out = loaded.params(tf.constant(x))
    np.testing.assert_allclose(out["mean_logits"], np.mean(member_logits, axis=0), atol=ATOL)
    n = 7
    got = loaded.sample(tf.constant(x), num_samples=tf.constant(n))
    np.testing.assert_allclose(got["logits"], ensemble.sample_logits(x, n), atol=ATOL)
    np.testing.assert_array_equal(got["labels"], ensemble.sample(x, n))
    default = loaded.serving_default(tf.constant(x), num_samples=tf.constant(6))
    np.testing.assert_allclose(default["probabilities"], ensemble.predict_proba(x, 6), atol=ATOL)
    session = _session(export.onnx(ensemble, str(tmp_path / "ens.onnx"), num_samples=EXPORT_N))
    names = [o.name for o in session.get_outputs()]
    onnx_out = dict(zip(names, session.run(None, {"images": x}), strict=True))
    np.testing.assert_allclose(
        onnx_out["logit_samples"], ensemble.sample_logits(x, EXPORT_N), atol=ATOL
    )
    np.testing.assert_allclose(
        onnx_out["probabilities"], ensemble.predict_proba(x, EXPORT_N), atol=ATOL
    )


def test_probabilistic_unet_over_volumes(tmp_path):
    keras.utils.set_random_seed(4)
    model = ProbabilisticUNet(
        num_classes=C,
        latent_dim=2,
        backbone=UNet(base_filters=4, depth=1, spatial_dims=3),
        encoder_filters=(4, 8),
        encoder_convs_per_block=1,
        num_fcomb_convs=1,
        spatial_dims=3,
    )
    model.build((None, *SHAPE))
    x = _volumes(2, seed=12)
    seed = tf.constant(SEED, tf.int64)
    loaded = tf.saved_model.load(export.saved_model(model, str(tmp_path / "pu"), EXPORT_N))
    out = loaded.params(tf.constant(x))
    np.testing.assert_allclose(out["mean_logits"], model(x, training=False), atol=ATOL)
    got = loaded.sample(tf.constant(x), seed=seed)["logits"]
    np.testing.assert_allclose(got, model.sample_logits(x, EXPORT_N, seed=seed), atol=ATOL)
    session = _session(export.onnx(model, str(tmp_path / "pu.onnx"), num_samples=EXPORT_N))
    names = [o.name for o in session.get_outputs()]
    onnx_out = dict(zip(names, session.run(None, {"images": x}), strict=True))
    np.testing.assert_allclose(onnx_out["mean_logits"], model(x, training=False), atol=ATOL)
    assert onnx_out["logit_samples"].shape == (EXPORT_N, 2, D, H, W, C)


# --------------------------------------------------------------------------------------------
# Region of interest
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def roi_export(tmp_path_factory):
    model = _low_rank()
    base = tmp_path_factory.mktemp("roi3d") / "savedmodels" / "ssn_roi"
    version_dir = export.saved_model(model, str(base), num_samples=EXPORT_N, roi_mask=True)
    path = export.onnx(model, str(base.parent / "ssn_roi.onnx"), EXPORT_N, roi_mask=True)
    return model, tf.saved_model.load(version_dir), path


def test_roi_mask_export_of_a_volume_model(roi_export):
    model, loaded, path = roi_export
    for name in export.SIGNATURES:
        specs = loaded.signatures[name].structured_input_signature[1]
        assert specs["roi_mask"].shape.rank == 4 and specs["roi_mask"].dtype == tf.float32
    x, mask = _volumes(3, seed=5), _masks(3)
    inputs = {"images": x, "roi_mask": mask}
    expected = _expected_params(model, inputs)
    out = loaded.params(tf.constant(x), tf.constant(mask))
    _assert_outputs(out, expected, "SavedModel params with roi_mask")
    outside = mask == 0
    np.testing.assert_array_equal(out["cov_factor"].numpy()[outside], 0.0)
    plain = np.asarray(model(x, training=False))  # the mask is used
    assert np.abs(out["params"].numpy()[outside] - plain[outside]).max() > 1e-2
    seed = tf.constant(SEED, tf.int64)
    params = model(inputs, training=False)
    reference = model.head.sample_logits(params, EXPORT_N, seed=seed, antithetic=False)
    got = loaded.sample(tf.constant(x), tf.constant(mask), seed=seed)["logits"]
    np.testing.assert_allclose(got, reference, atol=ATOL)
    session = _session(path)
    assert [i.name for i in session.get_inputs()] == ["images", "roi_mask"]
    assert len(session.get_inputs()[1].shape) == 4
    names = [o.name for o in session.get_outputs()]
    onnx_out = dict(zip(names, session.run(None, inputs), strict=True))
    _assert_outputs(onnx_out, expected, "ONNX with roi_mask")


def test_roi_mask_of_another_shape_is_rejected(roi_export):
    _, loaded, path = roi_export
    x = _volumes(2)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"roi_mask.*\[B, D, H, W\]"):
        loaded.params(tf.constant(x), tf.constant(_masks(1)))  # would broadcast over the batch
    with pytest.raises(Exception, match="Reshape"):  # tf2onnx drops the assertion
        _session(path).run(None, {"images": x, "roi_mask": _masks(1)})


def _roi_ensemble():
    members = [
        _segmenter(LowRankLogits(C, rank=2, spatial_dims=3), 20 + i, unet=False) for i in (0, 1)
    ]
    return DeepEnsemble(members), members


def _roi_mc_dropout():
    model = _segmenter(LowRankLogits(C, rank=2, spatial_dims=3), seed=6, dropout=0.3)
    return MCDropout(model, num_samples=EXPORT_N), [model]  # params: dropout off


def _roi_mixture():
    model = _mixture()
    return model, [model]


@pytest.mark.parametrize("make", [_roi_ensemble, _roi_mc_dropout, _roi_mixture])
def test_other_models_that_take_the_mask(make, tmp_path):
    """A deep ensemble (every member), MC dropout (the network) and the mixture head get the
    mask: the `params` signature equals the Keras outputs with it (and differs without)."""
    model, networks = make()  # the exported model, and the networks behind its params
    x, mask = _volumes(2, seed=13), _masks(2)
    version_dir = export.saved_model(model, str(tmp_path / "m"), EXPORT_N, roi_mask=True)
    loaded = tf.saved_model.load(version_dir)  # kept: its variables live as long as it does
    out = loaded.params(tf.constant(x), tf.constant(mask))["params"].numpy()
    inputs = {"images": x, "roi_mask": mask}
    expected = np.concatenate([m(inputs, training=False) for m in networks], axis=-1)
    np.testing.assert_allclose(out, expected, atol=ATOL)
    plain = np.concatenate([m(x, training=False) for m in networks], axis=-1)
    assert np.abs(out - plain).max() > 1e-2


# --------------------------------------------------------------------------------------------
# Bad inputs
# --------------------------------------------------------------------------------------------
def test_exported_graphs_reject_images_of_another_rank(tmp_path_factory):
    model, loaded, version_dir, path = _export("low_rank", tmp_path_factory)
    images_2d = np.zeros((2, H, W, CH), "float32")  # [B, H, W, channels]: an image, not a volume
    # A loaded signature does not check its inputs' shapes itself: the graph does.
    with pytest.raises(
        tf.errors.InvalidArgumentError,
        match=r"Shape of tensor images \[2,8,8,2\] is not compatible with expected shape "
        r"\[\?,\?,\?,\?,2\]",
    ):
        loaded.signatures["params"](images=tf.constant(images_2d))
    with pytest.raises(TypeError, match=r"Can not cast TensorSpec\(shape=\(2, 8, 8, 2\)"):
        loaded.params(tf.constant(images_2d))  # the tf.function: its input signature
    # TF Serving's path: the TF1 session loader feeding the SignatureDef's tensor.
    graph = tf.Graph()
    with graph.as_default(), tf.compat.v1.Session(graph=graph) as session:
        meta_graph = tf.compat.v1.saved_model.loader.load(session, ["serve"], version_dir)
        signature = meta_graph.signature_def["params"]
        with pytest.raises(ValueError, match=r"Cannot feed value of shape \(2, 8, 8, 2\)"):
            session.run(
                signature.outputs["params"].name, {signature.inputs["images"].name: images_2d}
            )
    with pytest.raises(Exception, match=r"Invalid rank for input: images Got: 4 Expected: 5"):
        _session(path).run(None, {"images": images_2d})


def test_export_arguments_of_the_wrong_rank_are_value_errors(tmp_path):
    model = _categorical()
    with pytest.raises(ValueError, match=r"`image_shape` \(8, 8, 2\).*spatial_dims=3"):
        export.saved_model(model, str(tmp_path / "a" / "1"), image_shape=(H, W, CH))
    with pytest.raises(ValueError, match=r"`check_images` must be \[B, D, H, W, channels\]"):
        export.onnx(model, str(tmp_path / "a.onnx"), check_images=np.zeros((2, H, W, CH)))
    with pytest.raises(ValueError, match=r"`check_images` must be .*channels=2"):
        export.saved_model(model, str(tmp_path / "b" / "1"), check_images=np.zeros((1, D, H, W, 1)))
    with pytest.raises(ValueError, match=r"`check_roi_mask` must be \[B, D, H, W\]"):
        export.saved_model(
            _low_rank(),
            str(tmp_path / "c" / "1"),
            roi_mask=True,
            check_images=_volumes(2),
            check_roi_mask=np.ones((2, H, W), "float32"),
        )
    keras.utils.set_random_seed(0)
    model_2d = ProbabilisticSegmenter(UNet(base_filters=4, depth=1), CategoricalLogits(C))
    model_2d.build((None, 16, 16, 1))
    with pytest.raises(ValueError, match=r"spatial_dims=2: pass image_shape=\(H, W, channels\)"):
        export.onnx(model_2d, str(tmp_path / "d.onnx"), image_shape=(8, 16, 16, 1))
    assert not any(p.exists() for p in tmp_path.glob("*")), list(tmp_path.glob("*"))
