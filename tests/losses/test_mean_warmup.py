"""The SSN loss's mean warm-up (`mean_warmup=True`, `tfp_seg.losses.MeanWarmup`)."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from scipy.special import logsumexp

from tfp_seg import losses
from tfp_seg.layers import LowRankLogits
from tfp_seg.models import ProbabilisticSegmenter, UNet


def test_switch_on_is_the_mean_cross_entropy_and_off_the_ssn_loss(rng):
    """On: the deterministic head's loss of the mean logits (label sets, ignored pixels, class
    weights). Off (the start): the SSN loss on the same seeded samples, to float precision."""
    head = LowRankLogits(3, rank=2)
    params = rng.normal(size=(2, 5, 4, head.params_size)).astype("float32")
    label_sets = rng.integers(0, 3, size=(2, 3, 5, 4))
    label_sets[0, 1, :2] = 255
    options = {"ignore_label": 255, "class_weights": [0.5, 1.0, 2.0], "num_samples": 4}
    warm = losses.StochasticSegmentationNLL(head, mean_warmup=True, **options)
    plain = losses.StochasticSegmentationNLL(head, **options)
    assert float(warm.mean_only.numpy()) == 0.0 and plain.mean_only is None
    values = []
    for loss in (warm, plain):
        keras.utils.set_random_seed(7)
        tf.random.set_seed(7)
        values.append(loss(label_sets, params).numpy())
    np.testing.assert_allclose(values[0], values[1], rtol=1e-6)
    warm.mean_only.assign(1.0)
    xent = losses.SegmentationCrossEntropy(
        num_classes=3, ignore_label=255, class_weights=[0.5, 1.0, 2.0]
    )(label_sets, params)
    np.testing.assert_allclose(warm(label_sets, params).numpy(), xent.numpy(), rtol=1e-6)
    assert abs(float(xent) - values[1]) > 1e-3  # the two branches differ on these params


def test_warmup_value_is_the_numpy_cross_entropy_and_reaches_only_the_mean(rng):
    head = LowRankLogits(3, rank=2)
    params = tf.Variable(rng.normal(size=(2, 3, 4, head.params_size)).astype("float32"))
    labels = rng.integers(0, 3, size=(2, 3, 4))
    loss_fn = losses.StochasticSegmentationNLL(head, num_samples=4, mean_warmup=True)
    loss_fn.mean_only.assign(1.0)
    with tf.GradientTape() as tape:
        loss = loss_fn(labels, params)
    mu = params.numpy()[..., :3].astype("float64")
    log_p = mu - logsumexp(mu, axis=-1, keepdims=True)
    ce = -np.take_along_axis(log_p, labels[..., None], -1).sum((1, 2, 3)) / 12
    np.testing.assert_allclose(loss.numpy(), ce.mean(), rtol=1e-5)
    grad = tape.gradient(loss, params).numpy()
    assert np.abs(grad[..., :3]).max() > 1e-3
    np.testing.assert_array_equal(grad[..., 3:], 0.0)  # factor and diagonal: no gradient


def test_warmup_loss_keeps_the_label_checks():
    head = LowRankLogits(3, rank=2)
    loss_fn = losses.StochasticSegmentationNLL(head, num_samples=4, mean_warmup=True)
    loss_fn.mean_only.assign(1.0)
    params = np.zeros((1, 2, 2, head.params_size), "float32")
    with pytest.raises(tf.errors.InvalidArgumentError, match="y_true"):
        loss_fn(np.full((1, 2, 2), 7), params)


def _tiny_model(seed=0):
    keras.utils.set_random_seed(seed)
    head = LowRankLogits(2, rank=3)
    model = ProbabilisticSegmenter(UNet(base_filters=4, depth=1), head)
    loss = head.default_loss(num_samples=4, mean_warmup=True)
    model.compile(keras.optimizers.Adam(1e-2), loss=loss)
    return model, head, loss


class _Recorder(keras.callbacks.Callback):
    def __init__(self, loss):
        super().__init__()
        self.loss, self.switch, self.kernels = loss, [], []

    def on_epoch_end(self, epoch, logs=None):
        self.switch.append(float(self.loss.mean_only.numpy()))
        self.kernels.append(self.model.head.projection.kernel.numpy().copy())


def _fit_with_warmup(rng, images, warmup, **fit):
    """A tiny SSN fitted with `MeanWarmup(warmup)`: (head, loss, recorder, starting kernel)."""
    x = rng.random((images, 16, 16, 1), dtype=np.float32)
    model, head, loss = _tiny_model()
    model.build(x.shape)
    start = model.head.projection.kernel.numpy().copy()
    recorder = _Recorder(loss)
    y = (x[..., 0] > 0.5).astype("int32")
    model.fit(x, y, verbose=0, callbacks=[losses.MeanWarmup(warmup), recorder], **fit)
    return head, loss, recorder, start


def test_fit_trains_only_the_mean_channels_in_the_warmup_epochs(rng):
    """Adam leaves weights with zero gradient in place: through the warm-up the projection's
    covariance columns keep their initial values while the mean's move; after it both move."""
    head, loss, recorder, start = _fit_with_warmup(rng, 8, 2, batch_size=4, epochs=4)
    assert recorder.switch == [1.0, 1.0, 0.0, 0.0]
    c = head.num_classes
    for epoch in (0, 1):
        np.testing.assert_array_equal(recorder.kernels[epoch][..., c:], start[..., c:])
        assert np.abs(recorder.kernels[epoch][..., :c] - start[..., :c]).max() > 1e-3
    assert np.abs(recorder.kernels[3][..., c:] - start[..., c:]).max() > 1e-4
    assert float(loss.mean_only.numpy()) == 0.0  # after fit: the SSN loss


def test_a_later_fit_past_the_warmup_trains_the_covariance(rng):
    """The switch follows the epoch index (as a resumed run sees it): from `initial_epoch` at
    or after the warm-up, the SSN loss trains every channel from the first step."""
    head, _, recorder, start = _fit_with_warmup(rng, 4, 2, epochs=3, initial_epoch=2)
    assert recorder.switch == [0.0]
    c = head.num_classes
    assert np.abs(recorder.kernels[0][..., c:] - start[..., c:]).max() > 1e-4


def test_mean_warmup_needs_the_switch_and_checks_its_arguments(rng):
    head = LowRankLogits(2, rank=3)
    model = ProbabilisticSegmenter(UNet(base_filters=4, depth=1), head)
    model.compile("adam", loss=head.default_loss(num_samples=4))
    x = rng.random((2, 8, 8, 1), dtype=np.float32)
    with pytest.raises(ValueError, match="MeanWarmup needs a model compiled with a loss built"):
        model.fit(x, np.zeros((2, 8, 8), "int32"), verbose=0, callbacks=[losses.MeanWarmup(1)])
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="`epochs` must be an int >= 0"):
            losses.MeanWarmup(bad)
    for bad in (1, "yes", None):
        with pytest.raises(ValueError, match="`mean_warmup` must be a bool"):
            losses.StochasticSegmentationNLL(head, mean_warmup=bad)


def test_mean_warmup_serializes_and_earlier_configs_load_without_it():
    head = LowRankLogits(2, rank=3)
    plain = losses.StochasticSegmentationNLL(head, num_samples=4)
    config = keras.losses.serialize(plain)
    assert config["config"].pop("mean_warmup") is False
    earlier = keras.losses.deserialize(config)  # a config written before the argument
    assert earlier.mean_warmup is False and earlier.mean_only is None
    warm = losses.StochasticSegmentationNLL(head, num_samples=4, mean_warmup=True)
    restored = keras.losses.deserialize(keras.losses.serialize(warm))
    assert restored.mean_warmup is True and float(restored.mean_only.numpy()) == 0.0
