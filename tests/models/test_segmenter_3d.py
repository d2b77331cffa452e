"""The model level on volumes `[B, D, H, W, channels]`: `ProbabilisticSegmenter` with every head
on `UNet(spatial_dims=3)`, the region-of-interest input, MC dropout, deep and efficient
ensembles, and the clear errors of mismatched ranks (issue 17, the model level)."""

import keras
import numpy as np
import pytest

from tests.helpers import run_fit_step, run_model_saving_test
from tfp_seg import protocols
from tfp_seg.layers import (
    CategoricalLogits,
    HeteroscedasticLogits,
    LowRankLogits,
    MixtureLowRankLogits,
)
from tfp_seg.models import (
    DeepEnsemble,
    EnsembleSegmenter,
    MCDropout,
    ProbabilisticSegmenter,
    UNet,
    build_backbone,
    from_keras_cv,
    from_keras_hub,
)

B, D, H, W, C = 2, 8, 8, 8, 3
VOLUME = (D, H, W)

HEADS = {
    "low_rank": lambda dims=3: LowRankLogits(C, rank=2, spatial_dims=dims),
    "heteroscedastic": lambda dims=3: HeteroscedasticLogits(C, spatial_dims=dims),
    "categorical": lambda dims=3: CategoricalLogits(C, spatial_dims=dims),
    "mixture": lambda dims=3: MixtureLowRankLogits(C, num_components=2, rank=2, spatial_dims=dims),
}
ROI_HEADS = ("low_rank", "mixture")


def _volumes(seed=0, batch=B):
    return np.random.default_rng(seed).normal(size=(batch, *VOLUME, 1)).astype("float32")


def _labels(seed=1, batch=B):
    return np.random.default_rng(seed).integers(0, C, size=(batch, *VOLUME)).astype("int32")


def _roi_mask():
    mask = np.zeros((B, *VOLUME), "float32")
    mask[:, 2:6, 2:6, 2:6] = 1.0
    return mask


def _segmenter(name, depth=1, dropout=0.0, seed=0):
    keras.utils.set_random_seed(seed)
    return ProbabilisticSegmenter(
        UNet(base_filters=4, depth=depth, dropout=dropout, spatial_dims=3), HEADS[name]()
    )


# --- every head on a 3D U-Net -----------------------------------------------------------------
@pytest.mark.parametrize(
    "name, depth", [("categorical", 1), ("heteroscedastic", 2), ("low_rank", 2), ("mixture", 1)]
)
def test_fit_sample_and_save_on_volumes(name, depth, tmp_path):
    model = _segmenter(name, depth=depth)
    assert model.spatial_dims == 3
    x, y = _volumes(), _labels()
    run_fit_step(model, x, y, loss="auto")
    params = model(x)
    assert tuple(params.shape) == (B, *VOLUME, model.head.params_size)

    logits = model.sample_logits(x, num_samples=3, seed=1, batch_size=1)
    labels = model.sample(x, num_samples=3, seed=1)
    probs = model.predict_proba(x, num_samples=4, seed=2)
    assert logits.shape == (3, B, *VOLUME, C) and logits.dtype == np.float32
    assert labels.shape == (3, B, *VOLUME) and labels.dtype == np.int32
    assert labels.min() >= 0 and labels.max() < C
    assert probs.shape == (B, *VOLUME, C)
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
    assert model.probability_samples(x, num_samples=2, seed=3).shape == (2, B, *VOLUME, C)
    # seeded read-outs are reproducible
    np.testing.assert_array_equal(model.sample_logits(x, 3, seed=1, batch_size=1), logits)
    if name != "categorical":  # a distribution head draws different logits per sample
        assert np.abs(logits[0] - logits[1]).max() > 1e-4

    loaded = run_model_saving_test(model, x, tmp_path, atol=1e-5)
    np.testing.assert_allclose(
        loaded.sample_logits(x, num_samples=3, seed=1, batch_size=1), logits, atol=1e-4
    )


@pytest.mark.parametrize("name", ROI_HEADS)
def test_the_region_of_interest_of_a_volume(name, tmp_path):
    model = _segmenter(name)
    x, mask = _volumes(), _roi_mask()
    inputs = {"images": x, "roi_mask": mask}
    params = model(inputs).numpy()
    np.testing.assert_allclose(
        model({"images": x, "roi_mask": mask[..., None]}).numpy(), params, atol=1e-6
    )
    plain = model(x).numpy()
    inside = mask.astype(bool)
    np.testing.assert_allclose(plain[inside], params[inside], atol=1e-6)
    assert np.abs(plain[~inside] - params[~inside]).max() > 1e-3

    assert model.sample(inputs, num_samples=2, seed=1).shape == (2, B, *VOLUME)
    samples = model.sample_logits(inputs, num_samples=4, seed=1)
    assert samples.shape == (4, B, *VOLUME, C)
    if name == "low_rank":  # (a mixture's samples also vary with the component drawn)
        # outside the region the logits are independent with a tiny variance: they barely vary
        assert samples[:, ~inside].std(axis=0).max() < 0.05
        assert samples[:, inside].std(axis=0).mean() > 0.05
    assert model.predict_proba(inputs, num_samples=2, seed=2).shape == (B, *VOLUME, C)

    run_fit_step(model, inputs, _labels(), loss="auto")
    run_model_saving_test(model, inputs, tmp_path, atol=1e-5)


def test_a_volume_roi_mask_of_another_shape_is_rejected():
    model = _segmenter("low_rank")
    x, mask = _volumes(), _roi_mask()
    with pytest.raises(ValueError, match=r"roi_mask.*\[B, D, H, W\].*matching the images"):
        model.sample({"images": x, "roi_mask": mask[:, :4]}, 2)
    with pytest.raises(ValueError, match=r"`roi_mask` must have shape \[B, D, H, W\]"):
        model({"images": x, "roi_mask": mask[..., None, None]})


# --- ranks that do not match ------------------------------------------------------------------
@pytest.mark.parametrize("model_cls", [ProbabilisticSegmenter, EnsembleSegmenter])
def test_a_2d_head_on_a_3d_backbone_and_the_reverse(model_cls):
    ensemble = dict(ensemble="batch", ensemble_size=2) if model_cls is EnsembleSegmenter else {}
    with pytest.raises(ValueError, match=r"head LowRankLogits has spatial_dims=2 .*UNet has "):
        model_cls(UNet(base_filters=4, depth=1, spatial_dims=3, **ensemble), HEADS["low_rank"](2))
    with pytest.raises(ValueError, match="spatial_dims=3 .* backbone UNet has spatial_dims=2"):
        model_cls(UNet(base_filters=4, depth=1, **ensemble), HEADS["low_rank"](3))


def test_a_functional_backbone_states_its_rank():
    inputs = keras.Input((8, 8, 1))
    backbone = keras.Model(inputs, keras.layers.Conv2D(4, 3, padding="same")(inputs))
    with pytest.raises(ValueError, match="backbone Functional has spatial_dims=2"):
        ProbabilisticSegmenter(backbone, HEADS["categorical"](3))


def test_a_backbone_that_states_no_rank_is_checked_at_build():
    backbone = keras.Sequential([keras.layers.Conv2D(4, 3, padding="same")])
    model = ProbabilisticSegmenter(backbone, HEADS["categorical"](3))
    with pytest.raises(ValueError, match=r"`inputs` must have rank 5 \(\[B, D, H, W, channels\]"):
        model(np.zeros((1, 8, 8, 1), "float32"))


def test_volumes_for_a_2d_model_and_images_for_a_3d_model():
    flat = ProbabilisticSegmenter(UNet(base_filters=4, depth=1), HEADS["low_rank"](2))
    with pytest.raises(ValueError, match=r"`x` must have rank 4 .*spatial_dims=2.*got shape"):
        flat.sample(_volumes(), 2)
    with pytest.raises(ValueError, match=r"rank 4 .*3D inputs need a model with spatial_dims=3"):
        flat(_volumes())
    deep = _segmenter("low_rank")
    with pytest.raises(ValueError, match=r"`x` must have rank 5 \(\[B, D, H, W, channels\]"):
        deep.predict_proba(_volumes()[:, 0], 2)


@pytest.mark.parametrize("make", [from_keras_hub, from_keras_cv], ids=lambda f: f.__name__)
def test_keras_hub_and_keras_cv_backbones_are_2d_only(make):
    # the head is checked before the (optional) hub package is imported or a model is built
    with pytest.raises(ValueError, match=r"images \[B, H, W, channels\] only.*spatial_dims=3"):
        make("resnet_preset", HEADS["low_rank"](3))


def test_build_backbone_refuses_a_volume_shape():
    with pytest.raises(ValueError, match=r"is a volume \(D, H, W, C\).*UNet\(spatial_dims=3\)"):
        build_backbone("resnet_fpn", input_shape=(8, 8, 8, 1))


# --- wrappers and ensembles -------------------------------------------------------------------
def test_mc_dropout_on_volumes(tmp_path):
    model = _segmenter("heteroscedastic", dropout=0.3)
    x = _volumes()
    mc = MCDropout(model, num_samples=3)
    assert mc.input_spatial_dims == 3
    logits = mc.sample_logits(x, seed=4)
    assert logits.shape == (3, B, *VOLUME, C)
    np.testing.assert_array_equal(mc.sample_logits(x, seed=4), logits)
    assert np.abs(logits[0] - logits[1]).max() > 1e-4  # the dropout masks differ per pass
    assert mc.sample(x, seed=5).shape == (3, B, *VOLUME)
    assert mc.predict_proba(x, seed=6).shape == (B, *VOLUME, C)
    without_head = MCDropout(model, num_samples=2, head_sampling=False)
    assert without_head.probability_samples(x, seed=1).shape == (2, B, *VOLUME, C)
    with pytest.raises(ValueError, match=r"`x` must have rank 5"):
        mc.sample(x[:, 0])
    # the wrapped model saves and loads; MC dropout on the loaded one draws the same passes
    loaded = run_model_saving_test(model, x, tmp_path, atol=1e-5)
    np.testing.assert_allclose(
        MCDropout(loaded, num_samples=3).sample_logits(x, seed=4), logits, atol=1e-4
    )


def test_deep_ensemble_on_volumes(tmp_path):
    members = [_segmenter("low_rank", seed=s) for s in (0, 1)]
    ensemble = DeepEnsemble(members, num_samples=4)
    ensemble.compile(optimizer=keras.optimizers.SGD(0.01), loss="auto")
    ensemble.fit(_volumes(), _labels(), epochs=1, verbose=0)
    x = _volumes(3)
    logits = ensemble.sample_logits(x, seed=2)
    assert logits.shape == (4, B, *VOLUME, C)
    assert ensemble.sample(x, seed=2).shape == (4, B, *VOLUME)
    assert ensemble.predict_proba(x, seed=2).shape == (B, *VOLUME, C)
    ensemble.save(tmp_path / "ensemble")
    loaded = DeepEnsemble.load(tmp_path / "ensemble")
    np.testing.assert_allclose(loaded.sample_logits(x, seed=2), logits, atol=1e-4)
    with pytest.raises(ValueError, match=r"same spatial rank; got spatial_dims \[3, 2\]"):
        DeepEnsemble(
            [_segmenter("low_rank"), ProbabilisticSegmenter(UNet(4, 1), HEADS["low_rank"](2))]
        )


@pytest.mark.parametrize("kind", ["batch", "packed"])
def test_an_efficient_ensemble_on_volumes(kind, tmp_path):
    m = 2
    keras.utils.set_random_seed(0)
    model = EnsembleSegmenter(
        UNet(base_filters=4, depth=1, ensemble=kind, ensemble_size=m, spatial_dims=3),
        HEADS["low_rank"](),
    )
    x, y = _volumes(), _labels()
    run_fit_step(model, x, y, loss="auto")
    p = model.member_head.params_size
    assert tuple(model(x).shape) == (m * B, *VOLUME, p)
    assert tuple(model.member_params(x).shape) == (m, B, *VOLUME, p)
    exported = model.params_tensors(x)
    assert tuple(exported["member_params"].shape) == (B, m, *VOLUME, p)
    assert tuple(exported["mean_logits"].shape) == (B, *VOLUME, C)
    logits = model.sample_logits(x, num_samples=4, seed=1)
    assert logits.shape == (4, B, *VOLUME, C)
    assert model.sample(x, num_samples=2, seed=1).shape == (2, B, *VOLUME)
    assert model.predict_proba(x, num_samples=2, seed=1).shape == (B, *VOLUME, C)
    loaded = run_model_saving_test(model, x, tmp_path, atol=1e-5)
    np.testing.assert_allclose(loaded.sample_logits(x, 4, seed=1), logits, atol=1e-4)


def test_models_are_samplers_of_their_rank():
    model = _segmenter("categorical")
    assert isinstance(model, protocols.Sampler)
    assert isinstance(model.head, protocols.Head) and model.head.spatial_dims == 3
    assert model.input_spatial_dims == 3
    assert DeepEnsemble([model]).input_spatial_dims == 3
