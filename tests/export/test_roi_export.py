"""Export with a region of interest: `saved_model(..., roi_mask=True)` / `onnx(..., roi_mask=True)`.

Every signature (and the ONNX graph) takes `roi_mask` float32 `[B, H, W]` next to `images` and
passes it to the head, as `model({"images": x, "roi_mask": m})` does. Checked here:
deterministic outputs equal the Keras model's with the mask within 1e-4 (and differ from
those without it); seeded SavedModel samples equal `head.sample_logits(model(inputs), ...)`.
Outside the region the factor is zero and the diagonal the head's epsilon (std ~3.2e-3), so
every exported sample there is within 7 standard deviations (`sqrt(cov_diag)`) of the mean
logits (a chance of 2.6e-12 per logit, < 2e-6 over the <= 6e5 logits of a test), and the
sample variance there, pooled over the independent logits, is epsilon within 5 standard
errors. Inside, each logit's sample variance is `diag + sum_r P^2` within 6 standard errors
`sigma^2 sqrt(2 / (n - 1))` (chi-square tails: a chance < 6e-4 over the ~400 logits at
n = 64, < 2e-5 at n = 512). SavedModel requests are seeded (fixed outcomes); ONNX samples are
fresh per run. Models whose head takes no region are refused with an `ExportError`, and
exports without the option keep the images-only signatures.
"""

from __future__ import annotations

import json
import os

import keras
import numpy as np
import onnx
import onnxruntime
import pytest
import tensorflow as tf
import tf2onnx  # noqa: F401  (a test dependency: the [test] extra installs it)

from tfp_seg import export
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
VAR_SIGMA = 6.0  # per-logit sample variances: one bound for a family of ~400 logits
OUTSIDE_SIGMA = 7.0  # |sample - mean| outside the region: one bound for up to 6e5 logits
H = W = 16
C = 3
EXPORT_N = 8
SEED = [3, 14]
SAMPLED = ("serving_default", "sample", "uncertainty")


def _images(batch, seed=0, h=H, w=W):
    return np.random.default_rng(seed).normal(size=(batch, h, w, 1)).astype("float32")


def _masks(batch, h=H, w=W):
    """Image b: a square region shifted by b pixels (so that the masks differ per image)."""
    mask = np.zeros((batch, h, w), "float32")
    for b in range(batch):
        mask[b, h // 4 + b : 3 * h // 4 + b, w // 4 : 3 * w // 4] = 1.0
    return mask


def _lowrank_model(backbone=None, seed=1):
    keras.utils.set_random_seed(seed)
    model = ProbabilisticSegmenter(
        backbone or UNet(base_filters=4, depth=1), LowRankLogits(C, rank=2)
    )
    model.build((None, H, W, 1))
    return model


def _conv_backbone():
    # No resizing layers: traces with dynamic H/W (the U-Net's bilinear upsampling does not).
    return keras.Sequential([keras.layers.Conv2D(4, 3, padding="same", activation="relu")])


@pytest.fixture(scope="module")
def roi_export(tmp_path_factory):
    """(model, loaded SavedModel, its version dir, ONNX path) of an SSN export with roi."""
    model = _lowrank_model()
    base = tmp_path_factory.mktemp("roi") / "savedmodels" / "ssn_roi"
    version_dir = export.saved_model(model, str(base), num_samples=EXPORT_N, roi_mask=True)
    path = export.onnx(model, str(base.parent / "ssn_roi.onnx"), EXPORT_N, roi_mask=True)
    return model, tf.saved_model.load(version_dir), version_dir, path


def _outside_inside(samples, mean, cov_factor, cov_diag, mask):
    """Samples `[N, B, H, W, C]` against the head's parameters with region `mask [B, H, W]`."""
    samples = np.asarray(samples, np.float64)
    mean, diag = np.asarray(mean, np.float64), np.asarray(cov_diag, np.float64)
    factor = np.asarray(cov_factor, np.float64)
    outside, inside = mask == 0, mask == 1
    n = samples.shape[0]
    # Outside: factor 0, variance = epsilon (+ exp(-30)): the samples are the mean logits.
    np.testing.assert_array_equal(factor[outside], 0.0)
    scale = np.sqrt(diag[outside].max())
    assert scale < 5e-3, scale  # epsilon = 1e-5: std ~3.2e-3
    deviation = np.abs(samples[:, outside] - mean[outside])
    assert deviation.max() <= OUTSIDE_SIGMA * scale, deviation.max() / scale
    # ... and not frozen: their variance is epsilon's (pooled over the independent logits).
    var_hat = samples[:, outside].var(axis=0, ddof=1)
    pooled_se = diag[outside].mean() * np.sqrt(2.0 / (n - 1)) / np.sqrt(var_hat.size)
    assert abs(var_hat.mean() - diag[outside].mean()) <= K_SIGMA * pooled_se
    # Inside: the low-rank normal, per-logit variance diag + sum_r P^2.
    variance = diag[inside] + np.sum(factor[inside] ** 2, axis=-1)
    assert variance.min() > 100 * diag[outside].max()  # the region is where the noise is
    np.testing.assert_array_less(
        np.abs(samples[:, inside].var(axis=0, ddof=1) - variance),
        VAR_SIGMA * variance * np.sqrt(2.0 / (n - 1)),
    )


# --------------------------------------------------------------------------------------------
# SavedModel
# --------------------------------------------------------------------------------------------
def test_every_signature_takes_the_mask(roi_export):
    _, loaded, version_dir, _ = roi_export
    for name in export.SIGNATURES:
        specs = loaded.signatures[name].structured_input_signature[1]
        expected = {"images", "roi_mask"} | ({"num_samples", "seed"} if name in SAMPLED else set())
        assert set(specs) == expected, name
        assert specs["roi_mask"].dtype == tf.float32
        assert specs["roi_mask"].shape.as_list() == [None, H, W]
    with open(os.path.join(version_dir, "assets.extra", "tfp_seg.json")) as f:
        assert json.load(f)["inputs"] == ["images", "roi_mask"]


def test_saved_model_params_equal_the_keras_model_with_the_mask(roi_export):
    model, loaded, _, _ = roi_export
    x, mask = _images(3, seed=5), _masks(3)  # a batch size and masks the export never saw
    inputs = {"images": x, "roi_mask": mask}
    params = model(inputs, training=False)
    out = loaded.params(tf.constant(x), tf.constant(mask))
    np.testing.assert_allclose(out["params"], params, atol=ATOL)
    np.testing.assert_allclose(out["mean_logits"], model.head.mean_logits(params), atol=ATOL)
    for name, value in zip(
        ("loc", "cov_factor", "cov_diag"), model.head.covariance_parts(params), strict=True
    ):
        np.testing.assert_allclose(out[name], value, atol=ATOL, err_msg=name)
    outside = mask == 0
    np.testing.assert_array_equal(out["cov_factor"].numpy()[outside], 0.0)
    np.testing.assert_allclose(out["cov_diag"].numpy()[outside], model.head.epsilon, rtol=1e-4)
    # The mask is used: without it the parameters outside the region differ.
    plain = np.asarray(model(x, training=False))
    assert np.abs(out["params"].numpy()[outside] - plain[outside]).max() > 1e-2


def test_saved_model_seeded_samples_equal_the_keras_models(roi_export):
    model, loaded, _, _ = roi_export
    x, mask = tf.constant(_images(2, seed=6)), tf.constant(_masks(2))
    seed = tf.constant(SEED, tf.int64)
    params = model({"images": x, "roi_mask": mask}, training=False)
    expected = model.head.sample_logits(params, EXPORT_N, seed=seed, antithetic=False)
    got = loaded.sample(x, mask, num_samples=tf.constant(EXPORT_N), seed=seed)
    np.testing.assert_allclose(got["logits"], expected, atol=ATOL)
    np.testing.assert_array_equal(got["labels"], tf.argmax(expected, -1, output_type=tf.int32))
    averaged = model.head.sample_logits(params, EXPORT_N, seed=seed)  # antithetic default
    probs = tf.reduce_mean(tf.nn.softmax(averaged, -1), 0)
    np.testing.assert_allclose(
        loaded.serving_default(x, mask, seed=seed)["probabilities"], probs, atol=ATOL
    )
    maps = loaded.uncertainty(x, mask, seed=seed)
    for key, value in export.uncertainty_maps(expected).items():
        np.testing.assert_allclose(maps[key], value, atol=ATOL, err_msg=key)


def test_saved_model_samples_outside_the_region_are_the_mean(roi_export):
    model, loaded, _, _ = roi_export
    x, mask = _images(2, seed=7), _masks(2)
    out = loaded.params(tf.constant(x), tf.constant(mask))
    seed = tf.constant(SEED, tf.int64)
    samples = loaded.sample(
        tf.constant(x), tf.constant(mask), num_samples=tf.constant(64 * EXPORT_N), seed=seed
    )["logits"]
    _outside_inside(samples, out["mean_logits"], out["cov_factor"], out["cov_diag"], mask)


def test_saved_model_rejects_a_mask_of_another_shape(roi_export):
    _, loaded, _, _ = roi_export
    x = tf.constant(_images(2))
    with pytest.raises(tf.errors.InvalidArgumentError, match="roi_mask"):
        loaded.params(x, tf.constant(_masks(1)))  # would otherwise broadcast over the batch
    with pytest.raises(tf.errors.InvalidArgumentError, match="roi_mask"):
        loaded.sample(x, tf.constant(_masks(3)))


def _rest_predict(version_dir, body):
    """Answer a TF Serving REST `:predict` body (columnar `"inputs"`) as the server does:
    the JSON lists become tensors of the SignatureDef's dtypes, omitted inputs take the
    SignatureDef's defaults, and the SavedModel runs in a TF1 session (TF Serving's loader)."""
    body = json.loads(json.dumps(body))  # through the wire format
    graph = tf.Graph()
    with graph.as_default(), tf.compat.v1.Session(graph=graph) as session:
        meta_graph = tf.compat.v1.saved_model.loader.load(session, ["serve"], version_dir)
        signature_def = meta_graph.signature_def[body.get("signature_name", "serving_default")]
        unknown = set(body["inputs"]) - set(signature_def.inputs)
        assert not unknown, unknown
        feeds = {}
        for alias, info in signature_def.inputs.items():
            if alias in body["inputs"]:
                dtype = tf.dtypes.as_dtype(info.dtype).as_numpy_dtype
                feeds[info.name] = np.asarray(body["inputs"][alias], dtype=dtype)
            elif alias in signature_def.defaults:
                feeds[info.name] = tf.make_ndarray(signature_def.defaults[alias])
            else:  # TF Serving's message for a missing input without a default
                raise ValueError(f"{alias} not found in request and no default value provided")
        names = sorted(signature_def.outputs)
        values = session.run([signature_def.outputs[n].name for n in names], feeds)
    # JSON outputs: nested lists, strings (the `head_config` scalar) as text.
    outputs = {
        n: v.decode() if isinstance(v, bytes) else np.asarray(v).tolist()
        for n, v in zip(names, values, strict=True)
    }
    return json.loads(json.dumps({"outputs": outputs}))


def test_rest_serving_default_with_images_and_mask(roi_export):
    model, _, version_dir, _ = roi_export
    x, mask = _images(2, seed=8), _masks(2)
    body = {"inputs": {"images": x.tolist(), "roi_mask": mask.tolist()}}  # as in the README
    response = _rest_predict(version_dir, body)
    probs = np.asarray(response["outputs"]["probabilities"])
    assert probs.shape == (2, H, W, C)
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
    assert np.asarray(response["outputs"]["labels"]).shape == (2, H, W)
    # A seeded request is the Keras model's estimate with the mask.
    body = {
        "signature_name": "serving_default",
        "inputs": {"images": x.tolist(), "roi_mask": mask.tolist(), "seed": SEED},
    }
    probs = np.asarray(_rest_predict(version_dir, body)["outputs"]["probabilities"])
    params = model({"images": x, "roi_mask": mask}, training=False)
    averaged = model.head.sample_logits(params, EXPORT_N, seed=tf.constant(SEED, tf.int64))
    np.testing.assert_allclose(probs, tf.reduce_mean(tf.nn.softmax(averaged, -1), 0), atol=ATOL)
    body = {"signature_name": "params", "inputs": {"images": x.tolist(), "roi_mask": mask.tolist()}}
    np.testing.assert_allclose(
        _rest_predict(version_dir, body)["outputs"]["params"], params, atol=ATOL
    )
    with pytest.raises(ValueError, match="roi_mask not found"):  # the mask has no default
        _rest_predict(version_dir, {"inputs": {"images": x.tolist()}})


# --------------------------------------------------------------------------------------------
# ONNX
# --------------------------------------------------------------------------------------------
def _session(path):
    return onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])


def test_onnx_takes_the_mask_and_matches_keras(roi_export):
    model, _, _, path = roi_export
    session = _session(path)
    inputs = session.get_inputs()
    assert [i.name for i in inputs] == ["images", "roi_mask"]
    assert inputs[1].type == "tensor(float)" and inputs[1].shape[1:] == [H, W]
    meta = {p.key: p.value for p in onnx.load(path).metadata_props}
    assert json.loads(meta["tfp_seg"])["inputs"] == ["images", "roi_mask"]
    x, mask = _images(3, seed=9), _masks(3)
    names = [o.name for o in session.get_outputs()]
    out = dict(zip(names, session.run(None, {"images": x, "roi_mask": mask}), strict=True))
    params = model({"images": x, "roi_mask": mask}, training=False)
    np.testing.assert_allclose(out["params"], params, atol=ATOL)
    np.testing.assert_allclose(out["mean_logits"], model.head.mean_logits(params), atol=ATOL)
    _, factor, diag = model.head.covariance_parts(params)
    np.testing.assert_allclose(out["cov_factor"], factor, atol=ATOL)
    np.testing.assert_allclose(out["cov_diag"], diag, atol=ATOL)
    np.testing.assert_allclose(
        out["probabilities"], tf.reduce_mean(tf.nn.softmax(out["logit_samples"], -1), 0), atol=1e-5
    )
    with pytest.raises(Exception, match="Reshape"):  # a [1, H, W] mask does not broadcast
        session.run(None, {"images": x, "roi_mask": mask[:1]})


def test_onnx_samples_outside_the_region_are_the_mean(roi_export):
    _, _, _, path = roi_export
    session = _session(path)
    x, mask = _images(2, seed=10), _masks(2)
    feeds = {"images": x, "roi_mask": mask}
    runs = [session.run(["logit_samples"], feeds)[0] for _ in range(64)]
    mean, factor, diag = session.run(["mean_logits", "cov_factor", "cov_diag"], feeds)
    _outside_inside(np.concatenate(runs), mean, factor, diag, mask)


# --------------------------------------------------------------------------------------------
# Other models that take a region, dynamic sizes
# --------------------------------------------------------------------------------------------
def test_dynamic_spatial_export_takes_masks_of_any_size(tmp_path):
    model = _lowrank_model(_conv_backbone(), seed=2)
    version_dir = export.saved_model(model, str(tmp_path / "dyn"), num_samples=4, roi_mask=True)
    loaded = tf.saved_model.load(version_dir)
    spec = loaded.signatures["params"].structured_input_signature[1]["roi_mask"]
    assert spec.shape.as_list() == [None, None, None]
    x, mask = _images(2, seed=11, h=8, w=12), _masks(2, h=8, w=12)
    out = loaded.params(tf.constant(x), tf.constant(mask))
    np.testing.assert_allclose(
        out["params"], model({"images": x, "roi_mask": mask}, training=False), atol=ATOL
    )


def test_a_mixture_head_exports_with_the_mask(tmp_path):
    keras.utils.set_random_seed(5)
    model = ProbabilisticSegmenter(
        UNet(base_filters=4, depth=1), MixtureLowRankLogits(C, num_components=2, rank=2)
    )
    model.build((None, H, W, 1))
    x, mask = _images(2, seed=12), _masks(2)
    inputs = {"images": x, "roi_mask": mask}
    version_dir = export.saved_model(model, str(tmp_path / "mix"), num_samples=4, roi_mask=True)
    loaded = tf.saved_model.load(version_dir)
    out = loaded.params(tf.constant(x), tf.constant(mask))
    params = model(inputs, training=False)
    np.testing.assert_allclose(out["params"], params, atol=ATOL)
    outside = mask == 0
    factor = np.moveaxis(out["component_cov_factor"].numpy(), 1, 0)  # [K, B, H, W, C, R]
    np.testing.assert_array_equal(factor[:, outside], 0.0)
    seed = tf.constant(SEED, tf.int64)
    expected = model.head.sample_logits(params, 4, seed=seed, antithetic=False)
    got = loaded.sample(tf.constant(x), tf.constant(mask), seed=seed)["logits"]
    np.testing.assert_allclose(got, expected, atol=ATOL)
    path = export.onnx(model, str(tmp_path / "mix.onnx"), 4, roi_mask=True)
    names = [o.name for o in _session(path).get_outputs()]
    onnx_out = dict(zip(names, _session(path).run(None, inputs), strict=True))
    np.testing.assert_allclose(onnx_out["params"], params, atol=ATOL)


def test_a_deep_ensemble_passes_the_mask_to_every_member(tmp_path):
    members = [_lowrank_model(_conv_backbone(), seed=20 + i) for i in range(2)]
    ensemble = DeepEnsemble(members)
    x, mask = _images(2, seed=13), _masks(2)
    inputs = {"images": x, "roi_mask": mask}
    version_dir = export.saved_model(ensemble, str(tmp_path / "ens"), num_samples=4, roi_mask=True)
    loaded = tf.saved_model.load(version_dir)
    out = loaded.params(tf.constant(x), tf.constant(mask))
    expected = np.concatenate([m(inputs, training=False) for m in members], axis=-1)
    np.testing.assert_allclose(out["params"], expected, atol=ATOL)
    seed = tf.constant(SEED, tf.int64)
    samples = loaded.sample(
        tf.constant(x), tf.constant(mask), num_samples=tf.constant(128), seed=seed
    )["logits"].numpy()
    for j, member in enumerate(members):  # samples j, j + 2, ...: member j's head draws
        parts = member.head.covariance_parts(member(inputs, training=False))
        _outside_inside(samples[j::2], *parts, mask)


def test_mc_dropout_passes_the_mask_to_the_network(tmp_path):
    """MC dropout over an SSN segmenter: the dropout-off params with the mask; the samples
    (fresh dropout masks, one head draw each) have the per-logit mean of Keras' MCDropout
    given the same inputs, within k * sqrt(s1^2 / n1 + s2^2 / n2)."""
    keras.utils.set_random_seed(6)
    model = ProbabilisticSegmenter(
        UNet(base_filters=4, depth=1, dropout=0.3), LowRankLogits(C, rank=2)
    )
    model.build((None, H, W, 1))
    mc = MCDropout(model, num_samples=EXPORT_N)
    x, mask = _images(2, seed=14), _masks(2)
    inputs = {"images": x, "roi_mask": mask}
    version_dir = export.saved_model(mc, str(tmp_path / "mc"), num_samples=EXPORT_N, roi_mask=True)
    loaded = tf.saved_model.load(version_dir)
    out = loaded.params(tf.constant(x), tf.constant(mask))
    np.testing.assert_allclose(out["params"], model(inputs, training=False), atol=ATOL)
    n = 16 * EXPORT_N
    seed = tf.constant(SEED, tf.int64)
    samples = loaded.sample(
        tf.constant(x), tf.constant(mask), num_samples=tf.constant(n), seed=seed
    )["logits"].numpy()
    again = loaded.sample(tf.constant(x), tf.constant(mask), num_samples=tf.constant(n), seed=seed)
    np.testing.assert_array_equal(samples, again["logits"])
    reference = np.asarray(mc.sample_logits(inputs, n, seed=0), np.float64)
    tolerance = K_SIGMA * np.sqrt(samples.var(0) / n + reference.var(0) / n) + 1e-5
    assert np.all(np.abs(samples.mean(0) - reference.mean(0)) <= tolerance)
    # The spread inside and outside the region is Keras' (outside: dropout only, the head's
    # noise there being epsilon's; an export without the mask would add the head's variance).
    for region in (mask == 1, mask == 0):
        ratio = samples.var(0)[region].sum() / reference.var(0)[region].sum()
        assert 0.7 < ratio < 1.4, ratio


# --------------------------------------------------------------------------------------------
# Refusals, and exports without the option
# --------------------------------------------------------------------------------------------
def _categorical_model():
    keras.utils.set_random_seed(2)
    model = ProbabilisticSegmenter(_conv_backbone(), CategoricalLogits(C))
    model.build((None, H, W, 1))
    return model


def _heteroscedastic_model():
    keras.utils.set_random_seed(3)
    model = ProbabilisticSegmenter(_conv_backbone(), HeteroscedasticLogits(C))
    model.build((None, H, W, 1))
    return model


class _IgnoresTheMask(LowRankLogits):
    """An SSN head that accepts `roi_mask` and drops it."""

    def call(self, features, roi_mask=None):
        return super().call(features)


def _mc_dropout_categorical():
    keras.utils.set_random_seed(9)
    model = ProbabilisticSegmenter(UNet(base_filters=4, depth=1, dropout=0.2), CategoricalLogits(C))
    model.build((None, H, W, 1))
    return MCDropout(model)


@pytest.mark.parametrize(
    "make, match",
    [
        (_categorical_model, "head CategoricalLogits does not take a region of interest"),
        (_heteroscedastic_model, "head HeteroscedasticLogits does not take a region of interest"),
        (_mc_dropout_categorical, "MC dropout.*CategoricalLogits does not take a region"),
        (
            lambda: DeepEnsemble([_lowrank_model(_conv_backbone()), _categorical_model()]),
            r"DeepEnsemble \(member 1\).*CategoricalLogits does not take",
        ),
    ],
    ids=["categorical", "heteroscedastic", "mc_dropout", "ensemble"],
)
def test_models_whose_head_takes_no_region_are_refused(make, match, tmp_path):
    model = make()
    with pytest.raises(export.ExportError, match=match):
        export.saved_model(model, str(tmp_path / "m" / "1"), num_samples=2, roi_mask=True)
    with pytest.raises(export.ExportError, match=match):
        export.onnx(model, str(tmp_path / "m.onnx"), num_samples=2, roi_mask=True)
    assert not (tmp_path / "m").exists() and not (tmp_path / "m.onnx").exists()


def test_self_sampling_models_are_refused(tmp_path):
    keras.utils.set_random_seed(4)
    model = ProbabilisticUNet(
        num_classes=C,
        latent_dim=2,
        backbone=UNet(base_filters=4, depth=1),
        encoder_filters=(4, 8),
        encoder_convs_per_block=1,
        num_fcomb_convs=1,
    )
    model.build((None, H, W, 1))
    with pytest.raises(export.ExportError, match="ProbabilisticUNet.*takes no region of interest"):
        export.saved_model(model, str(tmp_path / "pu" / "1"), roi_mask=True)
    with pytest.raises(export.ExportError, match="takes no region of interest"):
        export.onnx(model, str(tmp_path / "pu.onnx"), roi_mask=True)
    assert not (tmp_path / "pu").exists() and not (tmp_path / "pu.onnx").exists()


def test_a_head_that_ignores_the_mask_is_refused(tmp_path):
    keras.utils.set_random_seed(8)
    model = ProbabilisticSegmenter(_conv_backbone(), _IgnoresTheMask(C, rank=2))
    model.build((None, H, W, 1))
    with pytest.raises(export.ExportError, match="_IgnoresTheMask ignores the `roi_mask`"):
        export.saved_model(model, str(tmp_path / "ign" / "1"), roi_mask=True)
    with pytest.raises(export.ExportError, match="ignores the `roi_mask`"):
        export.onnx(model, str(tmp_path / "ign.onnx"), roi_mask=True)


def test_check_roi_mask_arguments(tmp_path):
    model = _lowrank_model(_conv_backbone())
    with pytest.raises(ValueError, match="`check_roi_mask` needs `roi_mask=True`"):
        export.saved_model(model, str(tmp_path / "a" / "1"), check_roi_mask=_masks(2))
    with pytest.raises(ValueError, match=r"`check_roi_mask` must be \[B, H, W\]"):
        export.onnx(
            model,
            str(tmp_path / "a.onnx"),
            roi_mask=True,
            check_images=_images(2),
            check_roi_mask=_masks(3),
        )
    # A mask of the caller's own for the parity checks.
    export.saved_model(
        model,
        str(tmp_path / "b" / "1"),
        num_samples=2,
        roi_mask=True,
        check_images=_images(1),
        check_roi_mask=np.ones((1, H, W), "float32"),
    )


def test_exports_without_the_option_take_the_images_alone(tmp_path):
    model = _lowrank_model()
    version_dir = export.saved_model(model, str(tmp_path / "plain"), num_samples=2)
    loaded = tf.saved_model.load(version_dir)
    for name in export.SIGNATURES:
        specs = loaded.signatures[name].structured_input_signature[1]
        expected = {"images"} | ({"num_samples", "seed"} if name in SAMPLED else set())
        assert set(specs) == expected, name
    with open(os.path.join(version_dir, "assets.extra", "tfp_seg.json")) as f:
        assert json.load(f)["inputs"] == ["images"]
    path = export.onnx(model, str(tmp_path / "plain.onnx"), num_samples=2)
    assert [i.name for i in _session(path).get_inputs()] == ["images"]


def test_cli_export_with_the_mask_input(tiny_run, tmp_path, capsys):
    """`tfp-seg export RUN --roi-mask` (an SSN run): both formats take the mask."""
    from tfp_seg import cli

    target = tmp_path / "savedmodels" / "tiny_roi"
    args = ["export", str(tiny_run), "--roi-mask", "--num-samples", "2"]
    assert cli.main([*args, "--output", str(target)]) == 0
    loaded = tf.saved_model.load(str(target / "1"))
    specs = loaded.signatures["serving_default"].structured_input_signature[1]
    assert set(specs) == {"images", "roi_mask", "num_samples", "seed"}
    path = tmp_path / "tiny_roi.onnx"
    assert cli.main([*args, "--format", "onnx", "--output", str(path)]) == 0
    assert [i.name for i in _session(str(path)).get_inputs()] == ["images", "roi_mask"]
    assert "exported ONNX" in capsys.readouterr().out
