"""Shared test helpers: every public layer goes through the same checks (STYLE.md)."""

from __future__ import annotations

import os
import tempfile

import keras
import numpy as np
import tensorflow as tf


def run_layer_test(
    layer_cls,
    init_kwargs: dict,
    input_shape: tuple,
    expected_output_shape: tuple,
    loss=None,
    target=None,
    atol: float = 1e-6,
):
    """Serialisation, symbolic + eager call, one fit step, `.keras` and SavedModel round trips.

    Returns the fitted model so callers can make further checks.
    """
    # Config round trip.
    layer = layer_cls(**init_kwargs)
    config = layer.get_config()
    clone = layer_cls.from_config(config)
    assert clone.get_config() == config, "get_config/from_config is not a fixed point"
    revived = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert type(revived) is layer_cls
    assert revived.get_config() == config

    # Symbolic call.
    inputs = keras.Input(shape=input_shape[1:], batch_size=None)
    symbolic = layer_cls(**init_kwargs)(inputs)
    assert tuple(symbolic.shape[1:]) == tuple(expected_output_shape[1:]), symbolic.shape

    # Eager call.
    x = np.random.default_rng(0).normal(size=input_shape).astype("float32")
    eager_layer = layer_cls(**init_kwargs)
    out = eager_layer(x)
    assert tuple(out.shape) == tuple(expected_output_shape)
    assert np.all(np.isfinite(np.asarray(out)))

    # One fit step inside a functional model (gradients must reach the layer's weights).
    outputs = layer_cls(**init_kwargs)(inputs)
    model = keras.Model(inputs, outputs)
    if loss is None:
        loss = "mse"
        target = np.zeros(expected_output_shape, "float32")
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss=loss)
    before = [w.numpy().copy() for w in model.trainable_weights]
    history = model.fit(x, target, epochs=1, batch_size=input_shape[0], verbose=0)
    assert np.isfinite(history.history["loss"][0])
    after = [w.numpy() for w in model.trainable_weights]
    moved = [np.abs(a - b).max() > 0 for a, b in zip(after, before, strict=True)]
    assert any(moved), "no weight moved"

    expected = np.asarray(model(x))
    with tempfile.TemporaryDirectory() as tmp:
        # .keras round trip.
        path = os.path.join(tmp, "model.keras")
        model.save(path)
        loaded = keras.models.load_model(path)
        np.testing.assert_allclose(np.asarray(loaded(x)), expected, atol=atol)
        # SavedModel round trip (the TF Serving artefact).
        export_dir = os.path.join(tmp, "export")
        model.export(export_dir, verbose=False)
        reloaded = tf.saved_model.load(export_dir)
        np.testing.assert_allclose(np.asarray(reloaded.serve(x)), expected, atol=atol)
    return model


class OrderRecorder(keras.Model):
    """Trains nothing; logs a fingerprint of each batch (images and labels, in order) as the
    metric `code` (tests of the order of batches across interruptions and replicas)."""

    def __init__(self):
        super().__init__()
        self.w = self.add_weight(shape=(), initializer="zeros")

    def call(self, x):
        return x * self.w

    def train_step(self, data):
        x, y = data
        code = tf.reduce_sum(x * tf.random.stateless_uniform(tf.shape(x), [1, 2]))
        labels = tf.cast(y, "float32")
        code += tf.reduce_sum(labels * tf.random.stateless_uniform(tf.shape(y), [3, 4]))
        return {"code": code}


class RecordBatches(keras.callbacks.Callback):
    """Collects `OrderRecorder`'s `code` of every batch: `epochs[epoch] = [code, ...]`."""

    def __init__(self):
        super().__init__()
        self.epochs = {}

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch
        self.epochs[epoch] = []

    def on_train_batch_end(self, batch, logs=None):
        self.epochs[self.epoch].append(float(logs["code"]))
