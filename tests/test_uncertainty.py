import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from scipy.special import softmax

import tfp_seg
from tfp_seg import calibration, uncertainty
from tfp_seg.calibration import TemperatureScaling, scale_class_covariance, with_temperature
from tfp_seg.layers import CategoricalLogits, HeteroscedasticLogits, LowRankLogits
from tfp_seg.models import ProbabilisticSegmenter, UNet, wrappers
from tfp_seg.models.wrappers import DeepEnsemble, MCDropout
from tfp_seg.uncertainty import expected_entropy, mutual_information, predictive_entropy


def _prob_samples(shape, seed=0, concentration=0.5):
    """Dirichlet probability samples (some entries exactly 0 to exercise 0 log 0)."""
    rng = np.random.default_rng(seed)
    p = rng.dirichlet([concentration] * shape[-1], size=shape[:-1])
    p[0, ..., 0, :] = np.eye(shape[-1])[0]  # one-hot rows
    return p.astype("float32")


def _entropy_ref(p):
    out = 0.0
    for v in p:
        if v > 0:
            out -= v * np.log(v)
    return out


# --- decomposition -----------------------------------------------------------------------------
def test_entropies_match_numpy_loops():
    p = _prob_samples((5, 2, 3, 4, 3)).astype("float64")
    n, b, h, w, _ = p.shape
    total = np.zeros((b, h, w))
    aleatoric = np.zeros((b, h, w))
    for i in np.ndindex(b, h, w):
        total[i] = _entropy_ref(p[(slice(None),) + i].mean(0))
        aleatoric[i] = np.mean([_entropy_ref(p[(k,) + i]) for k in range(n)])
    np.testing.assert_allclose(predictive_entropy(p), total, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(expected_entropy(p), aleatoric, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(mutual_information(p), total - aleatoric, atol=1e-12)
    maps = uncertainty.uncertainty_maps(p)
    np.testing.assert_allclose(maps["mutual_information"], total - aleatoric, atol=1e-12)
    assert predictive_entropy(p).shape == (b, h, w)
    # float32 in, float32 out
    assert predictive_entropy(p.astype("float32")).dtype == np.float32


MAP_KEYS = {"predictive_entropy", "expected_entropy", "mutual_information", "variance"}


def test_uncertainty_maps_from_probabilities_and_from_logits_agree():
    """One implementation: the numpy maps of probability samples and the (export) tensor maps
    of logit samples have the same keys and values; `variance` is sum_c var_n(p_n)."""
    z = np.random.default_rng(3).normal(scale=3.0, size=(6, 2, 4, 5, 3)).astype("float32")
    p = softmax(z.astype("float64"), -1)
    maps = uncertainty.uncertainty_maps(p)
    graph = uncertainty.uncertainty_maps_from_logits(tf.constant(z))
    assert set(maps) == set(graph) == MAP_KEYS
    for key in MAP_KEYS:
        assert maps[key].shape == graph[key].shape == (2, 4, 5)
        np.testing.assert_allclose(graph[key].numpy(), maps[key], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(maps["variance"], p.var(axis=0, ddof=1).sum(-1), rtol=1e-10)
    np.testing.assert_allclose(maps["predictive_entropy"], predictive_entropy(p), rtol=1e-12)
    one = uncertainty.uncertainty_maps(p[:1])
    np.testing.assert_array_equal(one["variance"], 0.0)
    np.testing.assert_allclose(one["mutual_information"], 0.0, atol=1e-12)
    per_image = uncertainty.uncertainty_maps(p.astype("float32"), per_image=True)
    assert set(per_image) == MAP_KEYS
    assert all(v.shape == (2,) and v.dtype == np.float32 for v in per_image.values())


def test_mutual_information_zero_for_identical_samples_and_nonnegative():
    one = _prob_samples((1, 2, 4, 4, 3), seed=1)
    same = np.repeat(one, 6, axis=0)
    np.testing.assert_allclose(mutual_information(same), 0.0, atol=1e-6)
    np.testing.assert_allclose(predictive_entropy(same), expected_entropy(same), atol=1e-6)
    spread = _prob_samples((6, 2, 4, 4, 3), seed=2)
    mi = mutual_information(spread)
    assert np.all(mi >= 0)
    assert mi.mean() > 0.05  # disagreeing samples carry epistemic uncertainty
    # bounded by log C and by the total entropy
    assert np.all(mi <= predictive_entropy(spread) + 1e-6)
    assert np.all(predictive_entropy(spread) <= np.log(3) + 1e-6)


def test_per_image_averages_over_height_and_width():
    p = _prob_samples((4, 3, 5, 6, 2), seed=3)
    for fn in (predictive_entropy, expected_entropy, mutual_information):
        np.testing.assert_allclose(fn(p, per_image=True), fn(p).mean(axis=(1, 2)), rtol=1e-6)
        assert fn(p, per_image=True).shape == (3,)
    # without a batch axis: [N, H, W, C] -> [H, W] maps, scalar per image
    assert predictive_entropy(p[:, 0]).shape == (5, 6)
    assert predictive_entropy(p[:, 0], per_image=True).shape == ()


def test_decomposition_accepts_model_probability_samples():
    logits = tf.random.stateless_normal([6, 2, 4, 4, 3], seed=[1, 2])
    probs = tf.nn.softmax(logits)  # a tf.Tensor works too
    assert predictive_entropy(probs).shape == (2, 4, 4)


@pytest.mark.parametrize(
    "arg, kwargs, match",
    [
        (np.ones((3,), "float32"), {}, "prob_samples"),
        (np.full((2, 4, 3), 2.0, "float32"), {}, "softmax outputs, not logits"),
        (np.full((2, 4, 3), 0.2, "float32"), {}, "sum to 1"),
        (np.full((2, 4, 2), 0.5, "float32"), {"per_image": True}, "per_image"),
        (np.ones((2, 4, 1), "int32"), {}, "float"),
        (np.full((2, 4, 2), np.nan, "float32"), {}, "NaN"),
    ],
)
def test_decomposition_validates_input(arg, kwargs, match):
    with pytest.raises(ValueError, match=match):
        predictive_entropy(arg, **kwargs)


# --- temperature scaling -----------------------------------------------------------------------
def _ece(probs, labels, num_bins=10):
    """Reference ECE: equal-width confidence bins, |accuracy - confidence| weighted by counts."""
    conf = probs.max(-1)
    correct = probs.argmax(-1) == labels
    edges = np.linspace(0, 1, num_bins + 1)
    total = 0.0
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        sel = (conf > lo) & (conf <= hi)
        if sel.any():
            total += sel.mean() * abs(correct[sel].mean() - conf[sel].mean())
    return total


def _overconfident(n=20000, c=5, t_true=2.0, seed=0):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, c)) * 1.5
    p = softmax(z, axis=-1)
    labels = (p.cumsum(-1) > rng.uniform(size=(n, 1))).argmax(-1)
    return (z * t_true).astype("float32"), labels


def test_temperature_scaling_recovers_known_temperature_and_lowers_ece():
    logits, labels = _overconfident(t_true=2.0)
    ts = TemperatureScaling().fit(logits, labels)
    assert ts.fitted
    assert abs(ts.temperature - 2.0) / 2.0 < 0.05, ts.temperature
    assert ts.nll_after < ts.nll_before
    ece_before = _ece(softmax(logits, -1), labels)
    ece_after = _ece(ts.predict_proba(logits), labels)
    assert ece_before > 0.05 and ece_after < ece_before / 3, (ece_before, ece_after)
    # [B, H, W, C] layout and an ignore label give the same fit
    img_logits = logits.reshape(20, 10, 100, 5)
    img_labels = labels.reshape(20, 10, 100).copy()
    t_img = TemperatureScaling().fit(img_logits, img_labels).temperature
    np.testing.assert_allclose(t_img, ts.temperature, rtol=1e-4)
    img_labels[0] = 255
    t_ign = TemperatureScaling().fit(img_logits, img_labels, ignore_label=255).temperature
    assert abs(t_ign - 2.0) / 2.0 < 0.05
    # an under-confident model gets T < 1
    t_under = TemperatureScaling().fit(logits / 4.0, labels).temperature
    assert abs(t_under - 0.5) / 0.5 < 0.05


def test_temperature_scaling_call_and_repr():
    ts = TemperatureScaling()
    assert ts.temperature == 1.0 and not ts.fitted
    ts._temperature = 2.0
    x = np.array([[2.0, 4.0]], "float32")
    np.testing.assert_allclose(ts(x), [[1.0, 2.0]])
    out = ts(tf.constant(x))
    assert isinstance(out, tf.Tensor)
    np.testing.assert_allclose(out.numpy(), [[1.0, 2.0]])
    assert "2" in repr(ts)


def test_temperature_scaling_on_mc_samples_and_head_params():
    logits, labels = _overconfident(n=6000, t_true=2.0, seed=1)
    # S identical samples: the MC fit equals the plain fit
    t_plain = TemperatureScaling().fit(logits, labels).temperature
    t_mc = TemperatureScaling().fit_samples(np.stack([logits] * 3), labels).temperature
    np.testing.assert_allclose(t_mc, t_plain, rtol=1e-4)
    # scale_params: samples of the scaled params = original samples / T (same noise)
    head = LowRankLogits(3, rank=2, antithetic=False)
    rng = np.random.default_rng(0)
    params = rng.normal(size=(1, 2, 2, head.params_size)).astype("float32")
    z = rng.normal(size=(4, 1, 2)).astype("float32")
    eps = rng.normal(size=(4, 1, 2, 2, 3)).astype("float32")
    ts = TemperatureScaling()
    ts._temperature = 1.5
    scaled = ts.scale_params(params, head)
    np.testing.assert_allclose(
        head.sample_logits(scaled, 4, noise=(z, eps)).numpy(),
        head.sample_logits(params, 4, noise=(z, eps)).numpy() / 1.5,
        rtol=1e-4,
        atol=1e-4,
    )
    cat = CategoricalLogits(3)
    np.testing.assert_allclose(ts.scale_params(params[..., :3], cat).numpy(), params[..., :3] / 1.5)


def test_temperature_scaling_validates():
    logits, labels = _overconfident(n=100)
    with pytest.raises(ValueError, match="`labels`"):
        TemperatureScaling().fit(logits, labels[:50])
    with pytest.raises(ValueError, match="`labels`"):
        TemperatureScaling().fit(logits, labels + 10)
    with pytest.raises(ValueError, match="`logits`"):
        TemperatureScaling().fit(logits[0], labels[0])
    with pytest.raises(ValueError, match="`bounds`"):
        TemperatureScaling(bounds=(2.0, 1.0))
    with pytest.raises(ValueError, match="`labels`"):
        TemperatureScaling().fit(logits, np.full(100, 255), ignore_label=255)


# --- SSN sample control ------------------------------------------------------------------------
def _low_rank_params(head, shape=(1, 2, 2), seed=0):
    rng = np.random.default_rng(seed)
    c, r = head.num_classes, head.rank
    loc = rng.normal(size=shape + (c,))
    raw = rng.uniform(-1, 1, size=shape + (c,))  # D ~ 0.4..2.7 >> epsilon
    factor = rng.normal(size=shape + (c * r,))
    return np.concatenate([loc, raw, factor], -1).astype("float32")


def _dense_cov(head, params):
    return head.distribution(params).covariance().numpy()[0]


def test_scale_class_covariance_scales_only_that_class_blocks():
    head = LowRankLogits(3, rank=2)
    params = _low_rank_params(head)
    cov = _dense_cov(head, params)
    s = 2.5
    new = scale_class_covariance(params, head, {1: s})
    cov_new = _dense_cov(head, new)
    cls = np.arange(cov.shape[0]) % 3  # flattened [H, W, C]: class of each index
    is1 = cls == 1
    np.testing.assert_allclose(cov_new[np.ix_(is1, is1)], s**2 * cov[np.ix_(is1, is1)], rtol=1e-4)
    np.testing.assert_allclose(cov_new[np.ix_(is1, ~is1)], s * cov[np.ix_(is1, ~is1)], rtol=1e-4)
    np.testing.assert_allclose(
        cov_new[np.ix_(~is1, ~is1)], cov[np.ix_(~is1, ~is1)], rtol=1e-4, atol=1e-6
    )
    np.testing.assert_array_equal(head.mean_logits(new).numpy(), params[..., :3])
    # general form: Sigma' = S Sigma S with a vector of scales
    scales = np.array([0.5, 1.0, 3.0])
    cov_vec = _dense_cov(head, scale_class_covariance(params, head, scales))
    np.testing.assert_allclose(cov_vec, np.outer(scales[cls], scales[cls]) * cov, rtol=1e-4)
    # and the test can fail: the new covariance is not the old one
    assert np.abs(cov_new - cov).max() > 0.1


def test_scale_class_covariance_for_heteroscedastic_low_rank_head():
    head = HeteroscedasticLogits(3, low_rank_classes=2)
    params = _low_rank_params(head)
    scales = np.array([1.0, 2.0, 0.5])
    before = head.distribution(params).distribution.covariance().numpy()
    after = head.distribution(scale_class_covariance(params, head, scales))
    after = after.distribution.covariance().numpy()
    np.testing.assert_allclose(after, np.outer(scales, scales) * before, rtol=1e-4)


def test_class_scale_moves_mean_sampled_area_monotonically():
    """Class-1 area grows with its scale where class 1 is not the mean's argmax.

    Common random numbers (the same seed for every scale); each step's mean increase must
    exceed 4 standard errors of the paired per-sample differences (N = 64 samples).
    """
    head = LowRankLogits(3, rank=4, antithetic=False)
    rng = np.random.default_rng(0)
    shape = (4, 16, 16)
    loc = np.zeros(shape + (3,))
    loc[..., 0] = 1.0
    loc[:, 4:8, 4:8, 1] = 2.0  # a confident class-1 square
    raw = np.full(shape + (3,), np.log(0.5))
    factor = rng.normal(size=shape + (12,)) * 0.15
    params = np.concatenate([loc, raw, factor], -1).astype("float32")
    areas = []
    for s in (0.25, 0.5, 1.0, 2.0, 4.0):
        samples = head.sample_logits(scale_class_covariance(params, head, {1: s}), 64, seed=0)
        areas.append((np.argmax(samples.numpy(), -1) == 1).mean(axis=(1, 2, 3)))
    areas = np.array(areas)  # [scales, N]
    diffs = np.diff(areas, axis=0)
    se = diffs.std(axis=1, ddof=1) / np.sqrt(diffs.shape[1])
    assert np.all(diffs.mean(1) > 4 * se), (areas.mean(1), se)


def test_with_temperature_scales_whole_covariance():
    head = LowRankLogits(3, rank=2)
    params = _low_rank_params(head, seed=1)
    cov = _dense_cov(head, params)
    for t in (0.5, 3.0):
        new = with_temperature(params, head, t)
        np.testing.assert_allclose(_dense_cov(head, new), t * cov, rtol=1e-4, atol=1e-6)
        np.testing.assert_array_equal(head.mean_logits(new).numpy(), params[..., :3])
    # heteroscedastic, diagonal: variance * t
    het = HeteroscedasticLogits(3)
    p = _low_rank_params(het)
    var = het.distribution(with_temperature(p, het, 2.0)).variance().numpy()
    np.testing.assert_allclose(var, 2.0 * np.exp(p[..., 3:]), rtol=1e-5)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda p, h: scale_class_covariance(p, h, [1.0, 2.0]), "class_scales"),
        (lambda p, h: scale_class_covariance(p, h, [1.0, -1.0, 1.0]), "class_scales"),
        (lambda p, h: scale_class_covariance(p, h, {5: 2.0}), "class_scales"),
        (lambda p, h: scale_class_covariance(p, h, "big"), "class_scales"),
        (lambda p, h: with_temperature(p, h, 0.0), "`t`"),
        (lambda p, h: with_temperature(p, h, float("inf")), "`t`"),
        (lambda p, h: with_temperature(p, h, "hot"), "`t`"),
        (lambda p, h: with_temperature(p[..., :5], h, 1.0), "`params`"),
        (lambda p, h: with_temperature(p[..., :3], CategoricalLogits(3), 1.0), "`head`"),
    ],
)
def test_sample_control_validates(call, match):
    head = LowRankLogits(3, rank=2)
    with pytest.raises(ValueError, match=match):
        call(_low_rank_params(head), head)


# --- MC dropout and ensembles ------------------------------------------------------------------
def _segmenter(dropout=0.0, head=None, norm="batch"):
    # Batch norm on purpose: MCDropout must keep it in inference mode while dropping out.
    model = ProbabilisticSegmenter(
        UNet(base_filters=4, depth=1, dropout=dropout, norm=norm), head or CategoricalLogits(3)
    )
    model.build((None, 16, 16, 1))
    return model


def _images(b=2, seed=0):
    return np.random.default_rng(seed).normal(size=(b, 16, 16, 1)).astype("float32")


def test_mc_dropout_samples_differ_with_dropout_and_keep_batchnorm_in_inference():
    x = _images()
    mc = MCDropout(_segmenter(dropout=0.5), num_samples=4)
    s = mc.sample_logits(x)
    assert s.shape == (4, 2, 16, 16, 3)
    assert np.abs(s[0] - s[1]).max() > 1e-3
    # seeded: reproducible, and distinct masks across passes
    a, b = mc.sample_logits(x, 3, seed=1), mc.sample_logits(x, 3, seed=1)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a[0] - a[1]).max() > 1e-3
    # the dropout layers are restored afterwards: plain inference is deterministic
    assert all("call" not in layer.__dict__ for layer in mc.dropout_layers)
    np.testing.assert_array_equal(mc.model(x).numpy(), mc.model(x).numpy())
    # sampling interface
    assert mc.sample(x, 3).shape == (3, 2, 16, 16)
    probs = mc.predict_proba(x, 3)
    assert probs.shape == (2, 16, 16, 3)
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
    assert mc.probability_samples(x, 3).shape == (3, 2, 16, 16, 3)


def test_mc_dropout_without_dropout_rate_is_deterministic_inference():
    x = _images()
    model = _segmenter(dropout=0.0)
    s = MCDropout(model, num_samples=3).sample_logits(x, batch_size=1)
    np.testing.assert_array_equal(s[0], s[1])
    # BatchNorm in inference mode: equal to model(x, training=False) (batch statistics of a
    # freshly built model would differ from its moving statistics)
    # (batch of 1 vs 2: float32 reduction order differs at the 1e-6 level)
    np.testing.assert_allclose(s[0], model(x, training=False).numpy(), atol=1e-5)
    assert np.abs(s[0] - model(x, training=True).numpy()).max() > 1e-3


def test_mc_dropout_with_plain_logits_model_and_distribution_head():
    inputs = keras.Input((16, 16, 1))
    h = keras.layers.Conv2D(4, 3, padding="same")(inputs)
    h = keras.layers.SpatialDropout2D(0.5)(h)
    logits = keras.layers.Conv2D(3, 1)(h)
    plain = keras.Model(inputs, logits)
    s = MCDropout(plain, 3).sample_logits(_images())
    assert s.shape == (3, 2, 16, 16, 3) and np.abs(s[0] - s[1]).max() > 1e-3
    # a distribution head: each pass also samples the head (or uses its mean logits)
    het = _segmenter(dropout=0.0, head=HeteroscedasticLogits(3))
    mean_only = MCDropout(het, 3, head_sampling=False).sample_logits(_images())
    np.testing.assert_array_equal(mean_only[0], mean_only[1])
    with pytest.raises(ValueError, match="no dropout layers"):
        MCDropout(keras.Sequential([keras.layers.Conv2D(3, 1)]))
    with pytest.raises(ValueError, match="num_samples"):
        MCDropout(_segmenter(0.1), num_samples=0)


def test_deep_ensemble_members_differ_and_sample_by_member():
    x = _images()
    ensemble = DeepEnsemble.from_factory(lambda: _segmenter(), num_members=3)
    assert len(ensemble) == 3 and ensemble.num_samples == 3
    outs = [m(x, training=False).numpy() for m in ensemble.members]
    assert np.abs(outs[0] - outs[1]).max() > 1e-3 and np.abs(outs[1] - outs[2]).max() > 1e-3
    s = ensemble.sample_logits(x, 5)
    assert s.shape == (5, 2, 16, 16, 3)
    for n in range(5):  # sample n comes from member n mod 3
        np.testing.assert_allclose(s[n], outs[n % 3], atol=1e-6)
    probs = ensemble.predict_proba(x)
    np.testing.assert_allclose(probs, softmax(np.stack(outs), -1).mean(0), atol=1e-6)


def test_deep_ensemble_fit_save_load_round_trip(tmp_path):
    x = _images()
    ensemble = DeepEnsemble.from_factory(lambda: _segmenter(), num_members=2)
    ensemble.compile(optimizer=keras.optimizers.Adam(1e-2))
    assert ensemble.members[0].optimizer is not ensemble.members[1].optimizer
    before = [m(x).numpy() for m in ensemble.members]
    y = np.random.default_rng(0).integers(0, 3, size=(2, 16, 16))
    histories = ensemble.fit(x, y, epochs=1, batch_size=2, verbose=0)
    assert len(histories) == 2
    for member, old in zip(ensemble.members, before, strict=True):
        assert np.abs(member(x).numpy() - old).max() > 0, "a member was not trained"

    folder = ensemble.save(tmp_path / "ensemble")
    assert sorted(os.listdir(folder)) == ["ensemble.json", "member_00.keras", "member_01.keras"]
    loaded = DeepEnsemble.load(folder)
    assert len(loaded) == 2 and loaded.num_samples == 2
    np.testing.assert_allclose(loaded.predict_proba(x), ensemble.predict_proba(x), atol=1e-5)
    with pytest.raises(ValueError, match="`folder`"):
        DeepEnsemble.load(tmp_path)


def test_deep_ensemble_with_distribution_heads_and_validation():
    members = [_segmenter(head=HeteroscedasticLogits(3)) for _ in range(2)]
    ensemble = DeepEnsemble(members, num_samples=4)
    s = ensemble.sample_logits(_images(), seed=0)
    assert s.shape == (4, 2, 16, 16, 3)
    np.testing.assert_array_equal(s, ensemble.sample_logits(_images(), seed=0))
    with pytest.raises(ValueError, match="`members`"):
        DeepEnsemble([])
    with pytest.raises(ValueError, match="distinct"):
        DeepEnsemble([members[0], members[0]])
    with pytest.raises(ValueError, match="num_members"):
        DeepEnsemble.from_factory(lambda: members[0], 0)
    with pytest.raises(ValueError, match="not compiled"):
        DeepEnsemble([_segmenter()]).fit(_images(), np.zeros((2, 16, 16), "int32"), verbose=0)


def test_public_names():
    assert tfp_seg.uncertainty is uncertainty
    assert "uncertainty" in tfp_seg.__all__
    for name in (
        "predictive_entropy",
        "expected_entropy",
        "mutual_information",
        "MCDropout",
        "DeepEnsemble",
        "TemperatureScaling",
        "scale_class_covariance",
        "with_temperature",
    ):
        assert name in uncertainty.__all__ and hasattr(uncertainty, name)


def test_moved_names_are_lazy_compatibility_aliases():
    """`tfp_seg.uncertainty.MCDropout` etc. still work, resolved on use: the module itself
    imports neither the models nor calibration (it is a leaf below them)."""
    import ast
    import inspect

    moved = {
        "MCDropout": wrappers,
        "DeepEnsemble": wrappers,
        "TemperatureScaling": calibration,
        "scale_class_covariance": calibration,
        "with_temperature": calibration,
    }
    for name, home in moved.items():
        assert getattr(uncertainty, name) is getattr(home, name)
        assert name in dir(uncertainty)
    namespace = {}
    exec("from tfp_seg.uncertainty import *", namespace)
    assert all(namespace[name] is getattr(home, name) for name, home in moved.items())
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        uncertainty.nope  # noqa: B018
    imported = set()
    for node in ast.walk(ast.parse(inspect.getsource(uncertainty))):
        if isinstance(node, ast.ImportFrom):
            imported.add(node.module)
        elif isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
    assert not {m for m in imported if m and m.startswith("tfp_seg")}, imported
