"""Statistical training tests on the built-in ambiguous data (slow: ~1-2 minutes)."""

import keras
import numpy as np
import pytest

from tfp_seg.data import ambiguous_shapes
from tfp_seg.layers import CategoricalLogits, LowRankLogits
from tfp_seg.losses import mc_categorical_nll
from tfp_seg.models import ProbabilisticSegmenter, UNet


def _train(head, train, epochs, seed=0):
    keras.utils.set_random_seed(seed)
    model = ProbabilisticSegmenter(UNet(base_filters=8, depth=2), head)
    model.compile(optimizer=keras.optimizers.Adam(2e-3), loss="auto")
    history = model.fit(
        train.to_dataset(batch_size=8, annotation="random", seed=seed), epochs=epochs, verbose=0
    )
    return model, history.history["loss"]


@pytest.mark.slow
def test_ssn_beats_deterministic_on_held_out_joint_nll():
    """Paired per-image test on held-out data.

    The statistic is the per-image joint NLL `-log p(y | x)` (nats/pixel) of every held-out
    annotation, estimated with 64 samples (an upper bound for the SSN, exact for the
    deterministic head). We require the mean paired improvement to exceed 3 standard errors.
    """
    data = ambiguous_shapes(num_images=240, image_size=32, num_annotations=4, seed=3)
    train, _, test = data.split((0.8, 0.0, 0.2), seed=3)
    ssn, ssn_losses = _train(LowRankLogits(3, rank=10), train, epochs=15)
    det, det_losses = _train(CategoricalLogits(3), train, epochs=15)
    assert ssn_losses[-1] < 0.5 * ssn_losses[0], ssn_losses
    assert det_losses[-1] < 0.5 * det_losses[0], det_losses

    pixels = 32 * 32
    ssn_logits = ssn.sample_logits(test.images, 64, seed=0)
    det_logits = det.sample_logits(test.images, 1)
    per_image = []
    for k in range(test.annotations.shape[1]):
        labels = test.annotations[:, k]
        ssn_nll = mc_categorical_nll(labels, ssn_logits).numpy() / pixels
        det_nll = mc_categorical_nll(labels, det_logits).numpy() / pixels
        per_image.append(det_nll - ssn_nll)
    diff = np.mean(per_image, axis=0)  # paired improvement per image
    mean, se = diff.mean(), diff.std(ddof=1) / np.sqrt(len(diff))
    assert mean > 3 * se, (mean, se)
