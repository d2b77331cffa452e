"""The serving graphs: `ServingModule` (the `tf.Module` with the four SavedModel signatures),
chunked seeded sampling, and the uncertainty maps of logit samples."""

from __future__ import annotations

import json
from typing import Dict

import tensorflow as tf

from tfp_seg import _seeds, uncertainty
from tfp_seg import distributions as dists
from tfp_seg.export import _common, adapters

__all__ = ["ServingModule", "uncertainty_maps"]


def uncertainty_maps(logit_samples: tf.Tensor) -> Dict[str, tf.Tensor]:
    """Uncertainty maps `[B, *S]` (nats) from logit samples `[N, B, *S, C]`.

    ```none
    p_n = softmax(eta_n),  p = mean_n p_n
    predictive_entropy = H[p] = -sum_c p log p
    expected_entropy   = mean_n H[p_n]
    mutual_information = H[p] - mean_n H[p_n]          (>= 0; clipped at 0)
    variance           = sum_c var_n(p_n)               (unbiased over n, 0 when N = 1)
    ```
    The one implementation is `tfp_seg.uncertainty.uncertainty_maps_from_logits`.
    """
    return uncertainty.uncertainty_maps_from_logits(logit_samples)


def _resolve_seed(seed: tf.Tensor) -> tf.Tensor:
    """int64 `[2]` seed from a `[]` (draw a fresh one, `tfp_seg._seeds.draw_seed`) or `[2]`
    input (used as given: seeded requests are reproducible)."""
    seed = tf.cast(tf.reshape(seed, [-1]), tf.int64)
    size = tf.size(seed)
    check = tf.debugging.Assert(
        tf.logical_or(tf.equal(size, 0), tf.equal(size, 2)),
        ["`seed` must have shape [2] (reproducible) or [0] (fresh randomness); got size", size],
    )
    with tf.control_dependencies([check]):
        seed = tf.cond(
            tf.equal(size, 2),
            lambda: seed,
            lambda: tf.cast(_seeds.draw_seed(), tf.int64),
        )
    return tf.reshape(seed, [2])


def _chunked_samples(
    adapter, state, num_samples, seed, chunk: int, max_num_samples: int, for_mean: bool = False
):
    """`[num_samples, B, *S, C]` for a tensor `num_samples`, in chunks of `chunk` samples.

    Independent draws (`adapter.sample_logits`), or with `for_mean` the draws for a Monte
    Carlo mean (`adapter.sample_logits_for_mean`: antithetic pairs for the SSN head).
    """
    num_samples = tf.cast(num_samples, tf.int32)
    checks = [
        tf.debugging.assert_positive(num_samples, message="`num_samples` must be >= 1"),
        tf.debugging.assert_less_equal(
            num_samples,
            tf.constant(max_num_samples, tf.int32),
            message=f"`num_samples` must be <= max_num_samples={max_num_samples}",
        ),
    ]
    with tf.control_dependencies(checks):
        num_chunks = (num_samples + chunk - 1) // chunk
    seed = _resolve_seed(seed)

    def body(i, array):
        chunk_seed = tf.cond(
            tf.equal(i, 0),
            lambda: seed,
            lambda: _seeds.fold_seed(seed, i, dtype=tf.int64),  # int64: see fold_seed
        )
        samples = adapter.sample_chunk(state, chunk, chunk_seed, i * chunk, for_mean=for_mean)
        return i + 1, array.write(i, tf.cast(samples, tf.float32))

    array = tf.TensorArray(tf.float32, size=num_chunks, infer_shape=False)
    _, array = tf.while_loop(lambda i, _: i < num_chunks, body, (tf.constant(0), array))
    return array.concat()[:num_samples]


def _signature(body, input_signature, roi_mask: bool, defaults=None):
    """`tf.function` of `body(inputs, *sampling)` with the signature's inputs: `images`, with
    `roi_mask` also `roi_mask` (`inputs` is then `{"images", "roi_mask"}`), and with
    `defaults` (`(num_samples, seed)` tensors) the sampling inputs, with those defaults."""
    shape = input_signature[0].shape  # the images' spec: checked at run time (graph_inputs)
    if defaults is not None:
        default_n, default_seed = defaults
        if roi_mask:

            def fn(images, roi_mask, num_samples=default_n, seed=default_seed):
                return body(_common.graph_inputs(images, roi_mask, shape), num_samples, seed)

        else:

            def fn(images, num_samples=default_n, seed=default_seed):
                return body(_common.graph_inputs(images, shape=shape), num_samples, seed)

    elif roi_mask:

        def fn(images, roi_mask):
            return body(_common.graph_inputs(images, roi_mask, shape))

    else:

        def fn(images):
            return body(_common.graph_inputs(images, shape=shape))

    fn.__name__ = body.__name__
    # No AutoGraph: the graphs use explicit tf.while_loop / tf.cond, and converting user
    # models' Python helpers (generators, numpy) would only warn or fail.
    return tf.function(fn, input_signature=input_signature, autograph=False)


class ServingModule(tf.Module):
    """A `tf.Module` holding the Keras model and the four serving signatures.

    Rank-generic over the spatial shape `S`: `(H, W)` for images, `(D, H, W)` for volumes
    (read from `image_spec`); every spatial output has the images' `S` (`labels [B, *S]`,
    `logits [N, B, *S, C]`, ...).

    Args:
      adapter: an `ExportAdapter` (see `as_adapter`).
      image_spec: `tf.TensorSpec([None, *S, channels], tf.float32)`.
      num_samples: default sample count of the sampled signatures (and the sampling chunk).
      max_num_samples: requests asking for more samples fail (protects the server's memory).
      roi_mask: every signature takes a second input `roi_mask` float32 `[B, *S]` (the
        region of interest, 1 inside), passed to the model with the images
        (`adapter.prepare({"images": ..., "roi_mask": ...})`).
    """

    def __init__(
        self,
        adapter: adapters.ExportAdapter,
        image_spec: tf.TensorSpec,
        num_samples: int = 16,
        max_num_samples: int = 1024,
        roi_mask: bool = False,
    ):
        super().__init__(name="tfp_seg_serving")
        self._adapter = adapter
        self._chunk = int(num_samples)
        self._max = int(max_num_samples)
        self._head_config = json.dumps(adapter.config, sort_keys=True)
        self._spatial = tuple(image_spec.shape[1:-1])
        inputs = [tf.TensorSpec(image_spec.shape, tf.float32, name="images")]
        if roi_mask:
            inputs.append(_common.roi_mask_spec(image_spec))
        n_spec = tf.TensorSpec([], tf.int32, name="num_samples")
        seed_spec = tf.TensorSpec([None], tf.int64, name="seed")
        defaults = (tf.constant(self._chunk, tf.int32), tf.constant([], tf.int64))

        def serving_default(inputs, num_samples, seed):
            # A Monte Carlo mean: antithetic pairs where the head uses them for its means.
            samples = self._samples(inputs, num_samples, seed, for_mean=True)
            probabilities = dists.mean_softmax(samples)
            return {
                "probabilities": probabilities,
                "labels": dists.argmax_classes(probabilities),
            }

        def sample(inputs, num_samples, seed):
            samples = self._samples(inputs, num_samples, seed)  # independent draws
            return {
                "labels": dists.argmax_classes(samples),
                "logits": samples,
            }

        def uncertainty(inputs, num_samples, seed):
            # Independent draws: `variance` is the unbiased sample variance only for those.
            return uncertainty_maps(self._samples(inputs, num_samples, seed))

        def params(inputs):
            state = adapter.prepare(inputs)
            out = {k: tf.cast(v, tf.float32) for k, v in adapter.params(state).items()}
            out["head_config"] = tf.constant(self._head_config)
            return out

        sampled = [*inputs, n_spec, seed_spec]
        self.serving_default = _signature(serving_default, sampled, roi_mask, defaults)
        self.sample = _signature(sample, sampled, roi_mask, defaults)
        self.uncertainty = _signature(uncertainty, sampled, roi_mask, defaults)
        self.params = _signature(params, inputs, roi_mask)
        for name in _common.SIGNATURES:  # trace now: weights created lazily exist before tracking
            getattr(self, name).get_concrete_function()
        # Track the weights as plain tf.Variables, as keras' ExportArchive does. Tracking the
        # Keras model (or its Keras variables) instead writes a SavedModel that loads in TF2
        # but whose variables a TF1 session loader - TF Serving's - cannot find.
        self.model_variables = [_common.tf_variable(v) for v in adapter.variables()]

    def _samples(self, inputs, num_samples, seed, for_mean=False):
        state = self._adapter.prepare(inputs)
        samples = _chunked_samples(
            self._adapter, state, num_samples, seed, self._chunk, self._max, for_mean
        )
        return tf.ensure_shape(samples, [None, None, *self._spatial, self._adapter.num_classes])

    def signatures(self) -> dict:
        """`{name: tf.function}` of the exported signatures (`SIGNATURES`)."""
        return {name: getattr(self, name) for name in _common.SIGNATURES}
