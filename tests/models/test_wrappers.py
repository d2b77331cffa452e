"""Tests for `tfp_seg.models.wrappers`: MCDropout and DeepEnsemble."""

import os

import keras
import numpy as np
import pytest
from scipy.special import softmax

from tfp_seg.layers import CategoricalLogits, HeteroscedasticLogits
from tfp_seg.models import ProbabilisticSegmenter, UNet
from tfp_seg.models.wrappers import DeepEnsemble, MCDropout


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
