"""`ProbabilisticSegmenter` with a region of interest as a second input (`roi_mask`)."""

import keras
import numpy as np
import pytest

from tfp_seg.layers import CategoricalLogits, LowRankLogits
from tfp_seg.models import ProbabilisticSegmenter, UNet

B, H, W, C = 2, 8, 8, 3


def _model(head=None):
    keras.utils.set_random_seed(0)
    return ProbabilisticSegmenter(UNet(base_filters=4, depth=1), head or LowRankLogits(C, rank=2))


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(B, H, W, 1)).astype("float32")
    mask = np.zeros((B, H, W), "float32")
    mask[:, 2:6, 2:6] = 1.0
    return images, mask


def test_the_mask_reaches_the_head():
    model = _model()
    images, mask = _inputs()
    params = model({"images": images, "roi_mask": mask}).numpy()
    features = model.backbone(images)
    np.testing.assert_allclose(params, model.head(features, roi_mask=mask).numpy(), atol=1e-6)
    np.testing.assert_allclose(
        model({"images": images, "roi_mask": mask[..., None]}).numpy(), params, atol=1e-6
    )
    # without the mask the parameters differ outside the region only
    plain = model(images).numpy()
    inside = mask.astype(bool)
    np.testing.assert_allclose(plain[inside], params[inside], atol=1e-6)
    assert np.abs(plain[~inside] - params[~inside]).max() > 1e-3


def test_samples_outside_the_region_follow_the_mean():
    model = _model()
    images, mask = _inputs()
    x = {"images": images, "roi_mask": mask}
    samples = model.sample_logits(x, num_samples=6, seed=1, batch_size=1)
    mean = model.head.mean_logits(model(x)).numpy()
    outside = ~mask.astype(bool)
    # outside: the factor is zero and the variance 1e-5-ish: samples equal the mean closely
    np.testing.assert_allclose(
        samples[:, outside], np.broadcast_to(mean[outside], samples[:, outside].shape), atol=0.05
    )
    assert samples[:, mask.astype(bool)].std(axis=0).mean() > 0.1
    labels = model.sample(x, num_samples=4, seed=2)
    assert labels.shape == (4, B, H, W)
    assert model.predict_proba(x, num_samples=4, seed=3).shape == (B, H, W, C)


def test_fit_and_save_with_the_mask(tmp_path):
    model = _model()
    images, mask = _inputs()
    labels = np.random.default_rng(1).integers(0, C, size=(B, H, W)).astype("int32")
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="auto")
    history = model.fit({"images": images, "roi_mask": mask}, labels, epochs=2, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.models.load_model(path, safe_mode=True)
    x = {"images": images, "roi_mask": mask}
    np.testing.assert_allclose(loaded(x).numpy(), model(x).numpy(), atol=1e-5)


def test_bad_inputs_name_the_key_and_shape():
    model = _model()
    images, mask = _inputs()
    with pytest.raises(ValueError, match="key 'images'"):
        model({"image": images})
    with pytest.raises(ValueError, match="got keys"):
        model.sample({"images": images, "mask": mask}, 2)
    with pytest.raises(ValueError, match=r"roi_mask.*matching the images"):
        model.sample({"images": images, "roi_mask": mask[:, :4]}, 2)
    with pytest.raises(ValueError, match="does not take an `roi_mask`"):
        _model(CategoricalLogits(C))({"images": images, "roi_mask": mask})
