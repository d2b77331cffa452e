"""Tests for `tfp_seg.metrics.streaming`: the streaming Keras metrics."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests.metrics._references import softmax
from tfp_seg import layers, metrics, models

# ================================================================================================
# Streaming Keras metrics
# ================================================================================================

C = 3


def _packed_batches(rng, from_logits, num_batches=3):
    """Three (labels [2,6,6], y_pred [2,6,6,C+2]) batches; extra channels are junk params."""
    batches = []
    for _ in range(num_batches):
        logits = 2.0 * rng.normal(size=(2, 6, 6, C)).astype(np.float32)
        head = logits if from_logits else softmax(logits).astype(np.float32)
        junk = rng.normal(size=(2, 6, 6, 2)).astype(np.float32) + 5.0
        labels = rng.integers(0, C, size=(2, 6, 6))
        labels[:, 0, :2] = 255
        batches.append((labels, np.concatenate([head, junk], axis=-1)))
    return batches


def _batch_reference(batches, from_logits):
    labels = np.concatenate([b[0] for b in batches])
    head = np.concatenate([b[1][..., :C] for b in batches])
    probs = softmax(head.astype(np.float64)) if from_logits else head
    return labels, probs


@pytest.mark.parametrize("from_logits", [False, True])
def test_streaming_metrics_match_batch_functions(from_logits):
    rng = np.random.default_rng(16)
    batches = _packed_batches(rng, from_logits)
    labels, probs = _batch_reference(batches, from_logits)
    pred = probs.argmax(-1)
    kw = {"from_logits": from_logits, "ignore_label": 255}
    streaming = {
        "miou": metrics.StreamingMeanIoU(C, **kw),
        "ece": metrics.StreamingECE(C, num_bins=15, **kw),
        "nll": metrics.StreamingNLL(C, **kw),
        "brier": metrics.StreamingBrier(C, **kw),
    }
    expected = {
        "miou": metrics.mean_iou(pred, labels, C, ignore_label=255),
        "ece": metrics.expected_calibration_error(probs, labels, 15, ignore_label=255),
        "nll": metrics.negative_log_likelihood(probs, labels, ignore_label=255),
        "brier": metrics.brier_score(probs, labels, ignore_label=255),
    }
    for y_true, y_pred in batches:
        for m in streaming.values():
            m.update_state(tf.constant(y_true), tf.constant(y_pred))
    tol = 1e-5 if from_logits else 1e-6
    for key, m in streaming.items():
        assert float(m.result()) == pytest.approx(expected[key], abs=tol), key
    np.testing.assert_array_equal(
        streaming["miou"].confusion_matrix(),
        metrics.confusion_matrix(pred, labels, C, ignore_label=255),
    )
    # a single batch differs from the concatenation, so accumulation is really tested
    first = metrics.brier_score(
        _batch_reference(batches[:1], from_logits)[1], batches[0][0], ignore_label=255
    )
    assert abs(first - expected["brier"]) > 1e-4
    for m in streaming.values():
        m.reset_state()
        assert float(m.result()) == 0.0


def test_streaming_sample_weight_and_label_channel():
    rng = np.random.default_rng(17)
    ((labels, y_pred),) = _packed_batches(rng, from_logits=False, num_batches=1)
    labels = np.where(labels == 255, 0, labels)
    weights = np.zeros((2, 6, 6), np.float32)
    weights[:, 3:] = 1.0
    m = metrics.StreamingNLL(C)
    m.update_state(labels[..., None], y_pred, sample_weight=weights)
    expected = metrics.negative_log_likelihood(y_pred[:, 3:, :, :C], labels[:, 3:])
    assert float(m.result()) == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize(
    "cls,kwargs",
    [
        (metrics.StreamingMeanIoU, {"ignore_label": 255, "from_logits": True}),
        (metrics.StreamingECE, {"num_bins": 7, "from_logits": True, "ignore_label": 4}),
        (metrics.StreamingNLL, {"from_logits": True, "eps": 1e-6}),
        (metrics.StreamingBrier, {"ignore_label": 0}),
    ],
)
def test_streaming_config_round_trip(cls, kwargs):
    m = cls(C, name="custom", **kwargs)
    config = m.get_config()
    assert config["num_classes"] == C and config["name"] == "custom"
    for key, value in kwargs.items():
        assert config[key] == value
    clone = cls.from_config(config)
    assert clone.get_config() == config
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(m))
    assert type(restored) is cls and restored.get_config() == config
    rng = np.random.default_rng(18)
    labels = rng.integers(1, C, size=(2, 4, 4))
    y_pred = rng.normal(size=(2, 4, 4, C + 1)).astype(np.float32)
    if not kwargs.get("from_logits", False):
        y_pred[..., :C] = softmax(y_pred[..., :C])
    m.update_state(labels, y_pred)
    restored.update_state(labels, y_pred)
    assert float(restored.result()) == pytest.approx(float(m.result()))


def test_streaming_metrics_in_compile_and_evaluate():
    rng = np.random.default_rng(19)
    x = rng.normal(size=(12, 6, 6, 2)).astype(np.float32)
    y = rng.integers(0, C, size=(12, 6, 6))
    model = keras.Sequential([keras.Input((6, 6, 2)), keras.layers.Conv2D(C + 2, 1)])
    model.compile(
        optimizer="sgd",
        loss=lambda y_true, y_pred: keras.ops.mean(keras.ops.square(y_pred)),
        metrics=[
            metrics.StreamingMeanIoU(C, from_logits=True),
            metrics.StreamingECE(C, from_logits=True),
            metrics.StreamingNLL(C, from_logits=True),
            metrics.StreamingBrier(C, from_logits=True),
        ],
    )
    model.fit(x, y, batch_size=4, epochs=1, verbose=0)
    logs = model.evaluate(x, y, batch_size=4, verbose=0, return_dict=True)
    probs = softmax(model.predict(x, batch_size=4, verbose=0)[..., :C].astype(np.float64))
    assert logs["mean_iou"] == pytest.approx(metrics.mean_iou(probs.argmax(-1), y, C), abs=1e-5)
    assert logs["ece"] == pytest.approx(metrics.expected_calibration_error(probs, y, 15), abs=1e-5)
    assert logs["nll"] == pytest.approx(metrics.negative_log_likelihood(probs, y), abs=1e-5)
    assert logs["brier"] == pytest.approx(metrics.brier_score(probs, y), abs=1e-5)


def _head_batches(rng, head, num_batches=3):
    """(labels [2,6,6], packed params) batches of `head` with large logit variances."""
    batches = []
    for _ in range(num_batches):
        loc = 2.0 * rng.normal(size=(2, 6, 6, C))
        raw_variance = rng.uniform(1.0, 3.0, size=(2, 6, 6, C))  # log sigma^2: sigma ~ 1.6-4.5
        extra = rng.normal(size=(2, 6, 6, head.params_size - 2 * C))  # low-rank factors
        params = np.concatenate([loc, raw_variance, extra], axis=-1).astype(np.float32)
        batches.append((rng.integers(0, C, size=(2, 6, 6)), params))
    return batches


def _reference_scores(probs, labels):
    return {
        "miou": metrics.mean_iou(probs.argmax(-1), labels, C),
        "ece": metrics.expected_calibration_error(probs, labels, 15),
        "nll": metrics.negative_log_likelihood(probs, labels),
        "brier": metrics.brier_score(probs, labels),
    }


def _streaming_set(**kwargs):
    return {
        "miou": metrics.StreamingMeanIoU(C, **kwargs),
        "ece": metrics.StreamingECE(C, num_bins=15, **kwargs),
        "nll": metrics.StreamingNLL(C, **kwargs),
        "brier": metrics.StreamingBrier(C, **kwargs),
    }


HEADS = {
    "heteroscedastic": lambda: layers.HeteroscedasticLogits(C),
    "ssn": lambda: layers.LowRankLogits(C, rank=2),
}


@pytest.mark.parametrize("head_name", sorted(HEADS))
def test_streaming_metrics_with_head_score_the_predictive_distribution(head_name):
    head = HEADS[head_name]()
    batches = _head_batches(np.random.default_rng(20), head)
    labels = np.concatenate([b[0] for b in batches])
    # predict_proba's estimator, batch by batch, with the metrics' (stateless) seed
    probs = np.concatenate(
        [head.mean_probabilities(b[1], num_samples=32, seed=7).numpy() for b in batches]
    ).astype(np.float64)
    mean_logit_probs = softmax(np.concatenate([b[1][..., :C] for b in batches]).astype(np.float64))
    expected = _reference_scores(probs, labels)
    of_mean_logits = _reference_scores(mean_logit_probs, labels)
    streaming = _streaming_set(head=head, num_samples=32, seed=7)
    for y_true, y_pred in batches:
        for m in streaming.values():
            m.update_state(tf.constant(y_true), tf.constant(y_pred))
    for key, m in streaming.items():
        assert float(m.result()) == pytest.approx(expected[key], abs=1e-5), key
    np.testing.assert_array_equal(
        streaming["miou"].confusion_matrix(), metrics.confusion_matrix(probs.argmax(-1), labels, C)
    )
    # ... which is clearly not softmax of the mean logits (the first C channels)
    for key in ("ece", "nll", "brier"):
        assert abs(expected[key] - of_mean_logits[key]) > 0.1, key
    assert np.mean(probs.argmax(-1) != mean_logit_probs.argmax(-1)) > 0.03

    # Fresh noise every batch (seed=None) and many samples: the predictive probabilities
    # within Monte Carlo error (|error of p| ~ 0.5 / sqrt(2000) ~ 0.01 per pixel) of a seeded
    # 4000-sample estimate (the 32-sample scores above are biased upwards by O(1/32), so they
    # are not the reference here), far from the mean-logit scores.
    many = np.concatenate(
        [head.mean_probabilities(b[1], num_samples=4000, seed=11).numpy() for b in batches]
    ).astype(np.float64)
    expected = _reference_scores(many, labels)
    nll = metrics.StreamingNLL(C, head=head, num_samples=2000)
    brier = metrics.StreamingBrier(C, head=head, num_samples=2000)
    for y_true, y_pred in batches:
        nll.update_state(y_true, y_pred)
        brier.update_state(y_true, y_pred)
    assert float(nll.result()) == pytest.approx(expected["nll"], abs=0.03)
    assert float(brier.result()) == pytest.approx(expected["brier"], abs=0.02)


def test_streaming_metrics_without_head_or_not_predictive_score_first_channels():
    head = HEADS["heteroscedastic"]()
    ((labels, params),) = _head_batches(np.random.default_rng(21), head, num_batches=1)
    probs = softmax(params[..., :C].astype(np.float64))
    for kwargs in ({}, {"predictive": False}):
        m = metrics.StreamingNLL(C, from_logits=True, **kwargs)
        m.update_state(labels, params)
        assert m.head is None
        assert float(m.result()) == pytest.approx(
            metrics.negative_log_likelihood(probs, labels), abs=1e-5
        )
    m = metrics.StreamingNLL(C, from_logits=True, predictive=False)
    assert metrics.bind_head([m], head) == [] and m.head is None
    with pytest.raises(ValueError, match="predictive=False"):
        metrics.StreamingNLL(C, head=head, predictive=False)
    with pytest.raises(ValueError, match="num_classes"):
        metrics.StreamingECE(2, head=head)
    with pytest.raises(ValueError, match="head"):
        metrics.StreamingECE(C, head="heteroscedastic")
    with pytest.raises(ValueError, match="seed"):
        metrics.StreamingBrier(C, head=head, seed=1.5)
    with pytest.raises(ValueError, match="packed parameters"):
        metrics.StreamingBrier(C, head=head).update_state(labels, params[..., :C])


def test_bind_head_walks_nested_metrics_and_keeps_a_weightless_copy():
    head = HEADS["ssn"]()
    head.build((None, 4, 4, 5))
    a, b = metrics.StreamingECE(C), metrics.StreamingBrier(C)
    given = metrics.StreamingNLL(C, head=layers.HeteroscedasticLogits(C))
    bound = metrics.bind_head({"out": [a, ("accuracy", b)], "other": given}, head)
    assert {id(m) for m in bound} == {id(a), id(b)}
    assert isinstance(given.head, layers.HeteroscedasticLogits)  # an own head is kept
    for m in (a, b):
        assert m.head is not head and not m.head.weights  # a copy, without the model's weights
        assert m.head.get_config() == head.get_config()


@pytest.mark.parametrize(
    "cls",
    [metrics.StreamingMeanIoU, metrics.StreamingECE, metrics.StreamingNLL, metrics.StreamingBrier],
)
def test_streaming_config_round_trip_with_head(cls):
    m = cls(C, head=HEADS["ssn"](), num_samples=6, seed=5, name="custom")
    config = m.get_config()
    assert config["num_samples"] == 6 and config["seed"] == 5 and config["predictive"] is True
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(m))
    assert type(restored) is cls and restored.get_config() == config
    assert isinstance(restored.head, layers.LowRankLogits) and restored.head.rank == 2
    batches = _head_batches(np.random.default_rng(22), m.head, num_batches=1)
    m.update_state(*batches[0])
    restored.update_state(*batches[0])
    assert float(restored.result()) == pytest.approx(float(m.result()), abs=1e-6)


def test_segmenter_compile_binds_head_and_round_trips(tmp_path):
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(23)
    x = rng.normal(size=(12, 8, 8, 1)).astype(np.float32)
    y = rng.integers(0, C, size=(12, 8, 8))
    model = models.ProbabilisticSegmenter(
        models.UNet(base_filters=4, depth=1), layers.HeteroscedasticLogits(C)
    )
    model.build((None, 8, 8, 1))
    bias = np.zeros(2 * C, np.float32)
    bias[0] = 2.0  # mean logits favour class 0: softmax ~0.8 ...
    bias[C:] = 2.5  # ... but log sigma^2 = 2.5 (sigma ~ 3.5) makes the predictive much flatter
    model.head.projection.bias.assign(bias)
    streaming = _streaming_set(from_logits=True, num_samples=8, seed=3)
    mean_logit_nll = metrics.StreamingNLL(
        C, from_logits=True, predictive=False, name="nll_of_mean_logits"
    )
    model.compile(optimizer="sgd", loss="auto", metrics=[*streaming.values(), mean_logit_nll])
    assert all(isinstance(m.head, layers.HeteroscedasticLogits) for m in streaming.values())
    assert mean_logit_nll.head is None

    logs = model.evaluate(x, y, batch_size=4, verbose=0, return_dict=True)
    # A seeded streaming metric draws with `seed` in every update (it cannot know the batch
    # index), while predict_proba(batch_size=4) folds the batch index into the seed: the
    # reference is therefore predict_proba batch by batch with the metric's seed.
    probs = np.concatenate(
        [model.predict_proba(x[i : i + 4], num_samples=8, seed=3) for i in range(0, 12, 4)]
    ).astype(np.float64)
    expected = _reference_scores(probs, y)
    names = {"miou": "mean_iou", "ece": "ece", "nll": "nll", "brier": "brier"}
    for key, name in names.items():
        assert logs[name] == pytest.approx(expected[key], abs=1e-5), key
    mean_logit_probs = softmax(model.predict(x, batch_size=4, verbose=0)[..., :C].astype(float))
    assert logs["nll_of_mean_logits"] == pytest.approx(
        metrics.negative_log_likelihood(mean_logit_probs, y), abs=1e-5
    )
    assert abs(logs["nll_of_mean_logits"] - logs["nll"]) > 0.1

    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path, safe_mode=True)
    loaded_logs = loaded.evaluate(x, y, batch_size=4, verbose=0, return_dict=True)
    for name in [*names.values(), "nll_of_mean_logits"]:
        assert loaded_logs[name] == pytest.approx(logs[name], abs=1e-5), name
