"""Export: a SavedModel for TF Serving and an ONNX graph, both parity-checked.

Both exporters take a Keras model and a path. They read the model through an
`ExportAdapter`, the small contract an exporter needs from a probabilistic segmenter:

```none
state   = adapter.prepare(images)                 # the network, run once per request
params  = adapter.params(state)                   # {name: tensor}: packed params, loc, ...
mean    = adapter.mean_logits(state)              # [B, H, W, C], deterministic
samples = adapter.sample_logits(state, N, seed)   # [N, B, H, W, C], export-safe ops
```

`as_adapter(model)` builds it for a model with a distribution head (`params = model(x)`,
`model.head.sample_logits(params, N, seed=)`: `ProbabilisticSegmenter` with any head) or for
a model that samples itself in graph-safe ops (`model.sample_logits_tensor(x, N, seed=)`, or
`_sample_logits_tensor` as `ProbabilisticUNet` has, or a `sample_logits` annotated
`-> tf.Tensor`). Anything else can be exported by passing `ExportAdapter.from_functions(...)`
in place of the model.

#### SavedModel signatures (`saved_model`)

```none
serving_default(images, num_samples?, seed?) -> probabilities [B,H,W,C] f32, labels [B,H,W] i32
sample(images, num_samples?, seed?)          -> labels [N,B,H,W] i32, logits [N,B,H,W,C] f32
uncertainty(images, num_samples?, seed?)     -> predictive_entropy, expected_entropy,
                                                mutual_information, variance  [B,H,W] f32
params(images)                               -> params [B,H,W,P] f32, mean_logits [B,H,W,C],
                                                (loc, cov_factor, cov_diag), head_config string
images: float32 [B, H, W, channels]; num_samples: int32 scalar (default: export num_samples);
seed: int64 [2] for reproducible samples, or [] (the default) for fresh randomness.
```

Sampling uses the head's export-safe `sample_logits` with a stateless seed: the given one, or
one drawn with `tf.random.uniform` per request when none is given. Samples are drawn in chunks
of the export-time `num_samples` (chunk `i > 0` uses `stateless_fold_in(seed, i)`), so a seeded
request with `num_samples` equal to the export value reproduces
`head.sample_logits(params, num_samples, seed=seed)` exactly.

#### ONNX graph (`onnx`)

One graph, input `images`, dynamic batch, `num_samples` fixed at export; sampling with
`tf.random.uniform` (ONNX `RandomUniformLike`): outputs the `params` signature's tensors (no
string), `probabilities`, `labels`, `logit_samples [N,B,H,W,C]`, `label_samples [N,B,H,W]` and
the uncertainty maps. The head config is in the model's `metadata_props["tfp_seg"]`.

Both exporters reload what they wrote and raise `ExportParityError` when the deterministic
outputs differ from the Keras model's by more than `atol`, before anything reaches `path`:
the SavedModel through `tf.saved_model.load` and through the TF1 session loader TF Serving
uses, the ONNX graph in onnxruntime (tf2onnx can log an error and still produce a graph).

#### Examples

```python
from tfp_seg import export

export.saved_model(model, "savedmodels/ssn/1", num_samples=16)   # ==> "savedmodels/ssn/1"
export.onnx(model, "ssn.onnx", num_samples=16)                    # ==> "ssn.onnx"
loaded = tf.saved_model.load("savedmodels/ssn/1")
loaded.sample(images, num_samples=tf.constant(8), seed=tf.constant([1, 2], tf.int64))
# ==> {"labels": [8, B, H, W] int32, "logits": [8, B, H, W, C] float32}
```
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from typing import Callable, Dict, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

from tfp_seg import distributions as dists

__all__ = [
    "ExportAdapter",
    "ExportError",
    "ExportParityError",
    "ServingModule",
    "SIGNATURES",
    "as_adapter",
    "onnx",
    "saved_model",
    "uncertainty_maps",
]

SIGNATURES = ("serving_default", "sample", "uncertainty", "params")
_INT64_MAX = np.iinfo(np.int64).max


class ExportError(RuntimeError):
    """The model could not be exported (conversion failed or produced an unusable file)."""


class ExportParityError(ExportError):
    """The exported artefact does not reproduce the Keras model's outputs within tolerance."""


# ============================================================================================
# Adapter: what the exporters need from a model
# ============================================================================================
class ExportAdapter:
    """The export contract of a probabilistic segmentation model.

    Subclasses (or `ExportAdapter.from_functions`) provide `prepare`, `params`, `mean_logits`
    and `sample_logits` in graph-safe TensorFlow ops; `sample_logits` must accept a Python int
    `num_samples` and a `seed` that is None (stateful `tf.random` ops) or an int64 `[2]`
    tensor (stateless, reproducible). `trackable` is the object that owns the variables (the
    Keras model); it is stored on the exported module.

    Args:
      trackable: the Keras model (or any `tf.Module`) holding the weights.
      num_classes: C.
      config: JSON-serialisable description written into the export (`head_config`).
      image_shape: default `(H, W, channels)` of the inputs (entries may be None), if known.
    """

    def __init__(
        self,
        trackable,
        num_classes: int,
        config: Optional[dict] = None,
        image_shape: Optional[Sequence[Optional[int]]] = None,
    ):
        self.trackable = trackable
        self.num_classes = int(num_classes)
        self.config = dict(config or {})
        self.image_shape = None if image_shape is None else tuple(image_shape)

    def prepare(self, images):
        """Run the network once: any nested structure of tensors (the sampling state)."""
        raise NotImplementedError

    def params(self, state) -> Dict[str, tf.Tensor]:
        """Named deterministic distribution parameters (float tensors with batch axis 0)."""
        raise NotImplementedError

    def mean_logits(self, state) -> tf.Tensor:
        """Mean (or deterministic) logits `[B, H, W, C]`."""
        raise NotImplementedError

    def sample_logits(self, state, num_samples: int, seed=None) -> tf.Tensor:
        """Logit samples `[num_samples, B, H, W, C]` in export-safe ops."""
        raise NotImplementedError

    def logit_variance(self, state) -> Optional[tf.Tensor]:
        """Analytic per-logit variance `[B, H, W, C]`, or None when unknown (used by checks)."""
        return None

    @classmethod
    def from_functions(
        cls,
        trackable,
        num_classes: int,
        sample_logits: Callable,
        mean_logits: Callable,
        params: Optional[Callable] = None,
        config: Optional[dict] = None,
        image_shape: Optional[Sequence[Optional[int]]] = None,
        logit_variance: Optional[Callable] = None,
    ) -> "ExportAdapter":
        """An adapter from plain functions of the images.

        Args:
          trackable: the Keras model (or `tf.Module`) that owns the functions' variables.
          num_classes: C.
          sample_logits: `(images, num_samples: int, seed) -> [N, B, H, W, C]`; `seed` is None
            or an int64 `[2]` tensor.
          mean_logits: `images -> [B, H, W, C]`.
          params: `images -> {name: tensor}` (default: `{"mean_logits": mean_logits}`).
          config: JSON-serialisable description (the `head_config` output).
          image_shape: `(H, W, channels)` if the trackable cannot tell.
          logit_variance: `images -> [B, H, W, C]` analytic variance (optional; lets `onnx`
            detect sampling noise frozen into constants).
        """
        adapter = _FunctionAdapter(
            trackable, num_classes, sample_logits, mean_logits, params, config, image_shape
        )
        adapter._variance_fn = logit_variance
        return adapter


class _HeadAdapter(ExportAdapter):
    """`params = model(x)`; the head turns params into samples and mean logits."""

    def __init__(self, model, image_shape=None):
        import keras

        head = model.head
        config = {
            "format": "tfp_seg.export/1",
            "model": type(model).__name__,
            "head": json.loads(json.dumps(keras.saving.serialize_keras_object(head), default=str)),
            "num_classes": int(head.num_classes),
            "params_size": int(head.params_size),
        }
        if hasattr(head, "covariance_parts"):
            config["params_outputs"] = {
                "loc": "mean logits [B, H, W, C]",
                "cov_factor": "covariance factor [B, H, W, C, R] (see head class for its layout)",
                "cov_diag": "covariance diagonal (variances) [B, H, W, C]",
            }
        super().__init__(model, head.num_classes, config, image_shape or _model_image_shape(model))
        self.model = model
        self.head = head

    def prepare(self, images):
        return self.model(images, training=False)

    def params(self, state):
        out = {"params": tf.identity(state), "mean_logits": self.head.mean_logits(state)}
        if hasattr(self.head, "covariance_parts"):
            loc, factor, diag = self.head.covariance_parts(state)
            out.update(loc=loc, cov_factor=factor, cov_diag=diag)
        return out

    def mean_logits(self, state):
        return self.head.mean_logits(state)

    def sample_logits(self, state, num_samples, seed=None):
        return self.head.sample_logits(state, num_samples, seed=seed)

    def logit_variance(self, state):
        if hasattr(self.head, "covariance_parts"):
            _, factor, diag = self.head.covariance_parts(state)
            return diag + tf.reduce_sum(tf.square(factor), axis=-1)
        try:
            return tf.convert_to_tensor(self.head.distribution(state).variance())
        except (NotImplementedError, ValueError, TypeError):
            return None


class _FunctionAdapter(ExportAdapter):
    def __init__(self, trackable, num_classes, sample_fn, mean_fn, params_fn, config, image_shape):
        super().__init__(
            trackable,
            num_classes,
            config or {"format": "tfp_seg.export/1", "model": type(trackable).__name__},
            image_shape or _model_image_shape(trackable),
        )
        self._sample_fn = sample_fn
        self._mean_fn = mean_fn
        self._params_fn = params_fn
        self._variance_fn = None

    def prepare(self, images):
        return images

    def params(self, state):
        if self._params_fn is None:
            return {"mean_logits": self._mean_fn(state)}
        out = self._params_fn(state)
        if not isinstance(out, dict):
            out = {"params": out}
        return dict(out)

    def mean_logits(self, state):
        return self._mean_fn(state)

    def sample_logits(self, state, num_samples, seed=None):
        return self._sample_fn(state, num_samples, seed)

    def logit_variance(self, state):
        return None if self._variance_fn is None else self._variance_fn(state)


def as_adapter(model, image_shape: Optional[Sequence[Optional[int]]] = None) -> ExportAdapter:
    """The `ExportAdapter` of `model` (returned unchanged if it already is one).

    Recognised, in order:
      1. a model with a `head` that is a `tfp_seg.layers.DistributionHead` and
         `model(x) -> params` (`ProbabilisticSegmenter`, any head);
      2. a model with `num_classes` that samples itself in graph-safe ops:
         `sample_logits_tensor(x, N, seed=None)` (or `_sample_logits_tensor`, as
         `ProbabilisticUNet`), or a `sample_logits` annotated `-> tf.Tensor`; its deterministic
         output is `mean_logits(x)` / `mean_logits_tensor(x)` if defined, else `model(x)`
         (the Prob U-Net's prior-mean logits). An optional `params_tensors(x) -> {name: t}`
         adds outputs to the `params` signature.
    """
    if isinstance(model, ExportAdapter):
        if image_shape is not None:
            model.image_shape = tuple(image_shape)
        return model
    from tfp_seg.layers.base import DistributionHead

    if isinstance(getattr(model, "head", None), DistributionHead):
        return _HeadAdapter(model, image_shape)
    num_classes = getattr(model, "num_classes", None)
    sample_fn = getattr(model, "sample_logits_tensor", None) or getattr(
        model, "_sample_logits_tensor", None
    )
    if sample_fn is None and _returns_tensors(getattr(model, "sample_logits", None)):
        sample_fn = model.sample_logits
    mean_fn = getattr(model, "mean_logits_tensor", None) or getattr(model, "mean_logits", None)
    if mean_fn is None and callable(model) and num_classes is not None:
        # `model(x)` is the deterministic read-out (the Prob U-Net's prior-mean logits).
        mean_fn = lambda x: model(x, training=False)
    if callable(sample_fn) and callable(mean_fn) and num_classes is not None:
        params_fn = getattr(model, "params_tensors", None)
        config = {
            "format": "tfp_seg.export/1",
            "model": type(model).__name__,
            "num_classes": int(num_classes),
        }
        try:
            import keras

            config["model_config"] = json.loads(
                json.dumps(keras.saving.serialize_keras_object(model), default=str)
            )
        except Exception:  # the config is informative only
            pass
        return _FunctionAdapter(
            model,
            num_classes,
            lambda x, n, seed: sample_fn(x, n, seed=seed),
            mean_fn,
            params_fn if callable(params_fn) else None,
            config,
            image_shape,
        )
    raise ValueError(
        f"Cannot export {type(model).__name__}: expected a model with a tfp_seg "
        "DistributionHead as `.head` (params = model(x)), or one with graph-safe "
        "`sample_logits_tensor(x, num_samples, seed=None)` / `sample_logits(...)`, "
        "`mean_logits(x)` and `num_classes`; or pass "
        "tfp_seg.export.ExportAdapter.from_functions(...)."
    )


def _returns_tensors(fn) -> bool:
    """Whether a model's own `sample_logits` is graph-safe (not a numpy-returning helper)."""
    if not callable(fn):
        return False
    import inspect

    try:
        annotation = inspect.signature(fn).return_annotation
    except (TypeError, ValueError):
        return False
    return annotation in (tf.Tensor, "tf.Tensor")


def _model_image_shape(model) -> Optional[Tuple[Optional[int], ...]]:
    """`(H, W, channels)` the model was built for, if it can be read from it."""
    try:
        inputs = getattr(model, "inputs", None)
        if inputs:
            return tuple(inputs[0].shape[1:])
    except (AttributeError, ValueError):
        pass
    get_build_config = getattr(model, "get_build_config", None)
    if callable(get_build_config):
        build = get_build_config() or {}
        shape = build.get("input_shape")
        if shape is not None and len(shape) == 4:
            return tuple(shape[1:])
    return None


# ============================================================================================
# Graph pieces shared by the exporters
# ============================================================================================
def uncertainty_maps(logit_samples: tf.Tensor) -> Dict[str, tf.Tensor]:
    """Uncertainty maps `[B, H, W]` (nats) from logit samples `[N, B, H, W, C]`.

    ```none
    p_n = softmax(eta_n),  p = mean_n p_n
    predictive_entropy = H[p] = -sum_c p log p
    expected_entropy   = mean_n H[p_n]
    mutual_information = H[p] - mean_n H[p_n]          (>= 0; clipped at 0)
    variance           = sum_c var_n(p_n)               (unbiased over n, 0 when N = 1)
    ```
    """
    log_p = tf.nn.log_softmax(logit_samples, axis=-1)
    p = tf.exp(log_p)
    mean_p = tf.reduce_mean(p, axis=0)
    tiny = np.finfo(np.float32).tiny
    predictive = -tf.reduce_sum(mean_p * tf.math.log(tf.maximum(mean_p, tiny)), axis=-1)
    expected = tf.reduce_mean(-tf.reduce_sum(p * log_p, axis=-1), axis=0)
    n = tf.cast(tf.shape(p)[0], p.dtype)
    variance = tf.reduce_sum(tf.square(p - mean_p[tf.newaxis]), axis=[0, 4]) / tf.maximum(
        n - 1.0, 1.0
    )
    return {
        "predictive_entropy": predictive,
        "expected_entropy": expected,
        "mutual_information": tf.maximum(predictive - expected, 0.0),
        "variance": variance,
    }


def _resolve_seed(seed: tf.Tensor) -> tf.Tensor:
    """int64 `[2]` seed from a `[]` (draw a fresh one) or `[2]` input."""
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
            lambda: tf.random.uniform([2], 0, _INT64_MAX, dtype=tf.int64),
        )
    return tf.reshape(seed, [2])


def _chunked_samples(adapter, state, num_samples, seed, chunk: int, max_num_samples: int):
    """`[num_samples, B, H, W, C]` for a tensor `num_samples`, in chunks of `chunk` samples."""
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
            lambda: tf.random.experimental.stateless_fold_in(seed, tf.cast(i, tf.int64)),
        )
        samples = adapter.sample_logits(state, chunk, seed=chunk_seed)
        return i + 1, array.write(i, tf.cast(samples, tf.float32))

    array = tf.TensorArray(tf.float32, size=num_chunks, infer_shape=False)
    _, array = tf.while_loop(lambda i, _: i < num_chunks, body, (tf.constant(0), array))
    return array.concat()[:num_samples]


# ============================================================================================
# SavedModel
# ============================================================================================
class ServingModule(tf.Module):
    """A `tf.Module` holding the Keras model and the four serving signatures.

    Args:
      adapter: an `ExportAdapter` (see `as_adapter`).
      image_spec: `tf.TensorSpec([None, H, W, channels], tf.float32)`.
      num_samples: default sample count of the sampled signatures (and the sampling chunk).
      max_num_samples: requests asking for more samples fail (protects the server's memory).
    """

    def __init__(
        self,
        adapter: ExportAdapter,
        image_spec: tf.TensorSpec,
        num_samples: int = 16,
        max_num_samples: int = 1024,
    ):
        super().__init__(name="tfp_seg_serving")
        self._adapter = adapter
        self._chunk = int(num_samples)
        self._max = int(max_num_samples)
        self._head_config = json.dumps(adapter.config, sort_keys=True)
        self._spatial = tuple(image_spec.shape[1:3])
        images = tf.TensorSpec(image_spec.shape, tf.float32, name="images")
        n_spec = tf.TensorSpec([], tf.int32, name="num_samples")
        seed_spec = tf.TensorSpec([None], tf.int64, name="seed")
        default_n = tf.constant(self._chunk, tf.int32)
        default_seed = tf.constant([], tf.int64)

        def serving_default(images, num_samples=default_n, seed=default_seed):
            samples = self._samples(images, num_samples, seed)
            probabilities = dists.mean_softmax(samples)
            return {
                "probabilities": probabilities,
                "labels": dists.argmax_classes(probabilities),
            }

        def sample(images, num_samples=default_n, seed=default_seed):
            samples = self._samples(images, num_samples, seed)
            return {
                "labels": dists.argmax_classes(samples),
                "logits": samples,
            }

        def uncertainty(images, num_samples=default_n, seed=default_seed):
            return uncertainty_maps(self._samples(images, num_samples, seed))

        def params(images):
            state = adapter.prepare(images)
            out = {k: tf.cast(v, tf.float32) for k, v in adapter.params(state).items()}
            out["head_config"] = tf.constant(self._head_config)
            return out

        # No AutoGraph: the graphs use explicit tf.while_loop / tf.cond, and converting user
        # models' Python helpers (generators, numpy) would only warn or fail.
        sampled = dict(input_signature=[images, n_spec, seed_spec], autograph=False)
        self.serving_default = tf.function(serving_default, **sampled)
        self.sample = tf.function(sample, **sampled)
        self.uncertainty = tf.function(uncertainty, **sampled)
        self.params = tf.function(params, input_signature=[images], autograph=False)
        for name in SIGNATURES:  # trace now: weights created lazily exist before tracking
            getattr(self, name).get_concrete_function()
        # Track the weights as plain tf.Variables, as keras' ExportArchive does. Tracking the
        # Keras model (or its Keras variables) instead writes a SavedModel that loads in TF2
        # but whose variables a TF1 session loader - TF Serving's - cannot find.
        self.model_variables = [_tf_variable(v) for v in _variables_of(adapter.trackable)]

    def _samples(self, images, num_samples, seed):
        state = self._adapter.prepare(images)
        samples = _chunked_samples(self._adapter, state, num_samples, seed, self._chunk, self._max)
        h, w = self._spatial
        return tf.ensure_shape(samples, [None, None, h, w, self._adapter.num_classes])

    def signatures(self) -> dict:
        return {name: getattr(self, name) for name in SIGNATURES}


def saved_model(
    model,
    export_dir: str,
    num_samples: int = 16,
    *,
    image_shape: Optional[Sequence[Optional[int]]] = None,
    dynamic_spatial: Optional[bool] = None,
    max_num_samples: int = 1024,
    overwrite: bool = False,
    check: bool = True,
    check_images=None,
    atol: float = 1e-4,
) -> str:
    """Export `model` as a SavedModel for TF Serving, `<base>/<version>/`, and check it.

    Args:
      model: a `ProbabilisticSegmenter` (any head), a model that samples itself, or an
        `ExportAdapter` (see `as_adapter`).
      export_dir: `"savedmodels/<name>/<version>"` (integer version, TF Serving's layout), or
        `"savedmodels/<name>"` to write the next free version (1 if none).
      num_samples: default N of the sampled signatures, and the sampling chunk: a seeded
        request for exactly N samples reproduces `head.sample_logits(params, N, seed=seed)`.
        Must be even for antithetic heads.
      image_shape: `(H, W, channels)`; default: the shape the model was built for.
      dynamic_spatial: export with dynamic H/W (True), the fixed `image_shape` (False), or try
        dynamic and fall back to fixed when the model cannot trace it (None).
      max_num_samples: requests for more samples fail with INVALID_ARGUMENT.
      overwrite: replace an existing version directory.
      check: reload the SavedModel and compare its `params` outputs and a seeded `sample`
        with the Keras model; beyond `atol` raise `ExportParityError` and leave no version
        directory behind.
      check_images: images `[B, H, W, channels]` for the check (default: 2 random images).

    Returns:
      The version directory written.
    """
    num_samples = _positive_int(num_samples, "num_samples")
    max_num_samples = _positive_int(max_num_samples, "max_num_samples")
    if max_num_samples < num_samples:
        raise ValueError(
            f"`max_num_samples` ({max_num_samples}) must be >= `num_samples` ({num_samples})."
        )
    adapter = as_adapter(model, image_shape)
    export_dir = _version_dir(export_dir)
    if os.path.exists(export_dir) and os.listdir(export_dir) and not overwrite:
        raise FileExistsError(
            f"{export_dir} exists and is not empty; pass overwrite=True or a new version."
        )

    spec = _image_spec(adapter, dynamic_spatial, num_samples)
    module = ServingModule(adapter, spec, num_samples, max_num_samples)
    parent = os.path.dirname(os.path.abspath(export_dir))
    os.makedirs(parent, exist_ok=True)
    # Write and check next to the target, then rename: TF Serving never sees a half-written
    # or unchecked version (it ignores non-integer folder names).
    tmp = tempfile.mkdtemp(prefix=".tmp-export-", dir=parent)
    try:
        tf.saved_model.save(module, tmp, signatures=module.signatures())
        extra = os.path.join(tmp, "assets.extra")
        os.makedirs(extra, exist_ok=True)
        with open(os.path.join(extra, "tfp_seg.json"), "w") as f:
            json.dump(
                {
                    "head_config": adapter.config,
                    "signatures": list(SIGNATURES),
                    "num_samples": num_samples,
                    "max_num_samples": max_num_samples,
                    "image_shape": [None if d is None else int(d) for d in spec.shape[1:]],
                },
                f,
                indent=2,
                sort_keys=True,
            )
        if check:
            images = _check_images(check_images, spec, adapter.image_shape)
            _check_saved_model(adapter, tmp, images, num_samples, atol)
        if os.path.exists(export_dir):
            shutil.rmtree(export_dir)
        os.replace(tmp, export_dir)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return export_dir


def _check_saved_model(adapter, export_dir, images, num_samples, atol):
    state = adapter.prepare(tf.constant(images))
    expected = {k: np.asarray(v) for k, v in adapter.params(state).items()}
    # TF Serving's path: a TF1 session loader feeding the SignatureDef's tensor names.
    graph = tf.Graph()
    with graph.as_default(), tf.compat.v1.Session(graph=graph) as session:
        logger = tf.get_logger()
        level = logger.level
        logger.setLevel("ERROR")  # the TF1 loader's deprecation notice is not for our users
        try:
            meta_graph = tf.compat.v1.saved_model.loader.load(session, ["serve"], export_dir)
        finally:
            logger.setLevel(level)
        signature_def = meta_graph.signature_def["params"]
        names = sorted(expected)
        try:
            values = session.run(
                [signature_def.outputs[name].name for name in names],
                {signature_def.inputs["images"].name: images},
            )
        except tf.errors.OpError as err:
            raise ExportError(
                f"The SavedModel does not run in a TF1 session (TF Serving's loader): {err}"
            ) from err
    for name, value in zip(names, values, strict=True):
        _assert_close(f"SavedModel (session) params/{name}", value, expected[name], atol)
    loaded = tf.saved_model.load(export_dir)
    got = loaded.signatures["params"](images=tf.constant(images))
    for name, value in expected.items():
        _assert_close(f"SavedModel params/{name}", np.asarray(got[name]), value, atol)
    seed = tf.constant([1234, 5678], tf.int64)
    reference = np.asarray(adapter.sample_logits(state, num_samples, seed=seed))
    sampled = loaded.signatures["sample"](
        images=tf.constant(images), num_samples=tf.constant(num_samples), seed=seed
    )
    _assert_close(
        "SavedModel sample/logits (seeded)", np.asarray(sampled["logits"]), reference, atol
    )


# ============================================================================================
# ONNX
# ============================================================================================
def onnx(
    model,
    path: str,
    num_samples: int = 16,
    opset: int = 17,
    *,
    image_shape: Optional[Sequence[Optional[int]]] = None,
    dynamic_spatial: Optional[bool] = None,
    check_images=None,
    atol: float = 1e-4,
) -> str:
    """Export `model` to ONNX with tf2onnx and check it in onnxruntime.

    The graph takes `images` float32 `[B, H, W, channels]` (dynamic B) and returns the
    deterministic parameters (`params`, `mean_logits`, and `loc`, `cov_factor`, `cov_diag` for
    heads with a covariance), `num_samples` logit samples (Box-Muller on ONNX
    `RandomUniformLike`; `logit_samples [N, B, H, W, C]`, `label_samples [N, B, H, W]` int32),
    their mean `probabilities [B, H, W, C]`, `labels [B, H, W]` int32 and the uncertainty maps
    (`predictive_entropy`, `expected_entropy`, `mutual_information`, `variance`, `[B, H, W]`).

    The converted graph is loaded and run in onnxruntime before it is written: its
    deterministic outputs must match the Keras model within `atol`, and its samples must vary
    between runs where the Keras model's do, or `ExportParityError` is raised and nothing is
    written.

    Args:
      model: see `saved_model`.
      path: the `.onnx` file to write.
      num_samples: N, fixed in the graph.
      opset: ONNX opset.
      image_shape, dynamic_spatial, check_images, atol: see `saved_model`.

    Returns:
      `path`.
    """
    try:
        import onnx as onnx_lib
        import onnxruntime
        import tf2onnx
    except ImportError as err:
        raise ImportError(
            f"ONNX export needs tf2onnx, onnx and onnxruntime ({err}); install them with "
            "`pip install tfp_seg[onnx]`."
        ) from err
    num_samples = _positive_int(num_samples, "num_samples")
    adapter = as_adapter(model, image_shape)
    spec = _image_spec(adapter, dynamic_spatial, num_samples)
    images_spec = tf.TensorSpec(spec.shape, tf.float32, name="images")

    @tf.function(input_signature=[images_spec], autograph=False)
    def graph(images):
        state = adapter.prepare(images)
        out = {k: tf.cast(v, tf.float32) for k, v in adapter.params(state).items()}
        out["mean_logits"] = tf.cast(adapter.mean_logits(state), tf.float32)
        samples = tf.cast(adapter.sample_logits(state, num_samples, seed=None), tf.float32)
        probabilities = dists.mean_softmax(samples)
        out.update(
            logit_samples=samples,
            label_samples=dists.argmax_classes(samples),
            probabilities=probabilities,
            labels=dists.argmax_classes(probabilities),
        )
        out.update(uncertainty_maps(samples))
        return out

    path = os.fspath(path)
    try:
        model_proto, _ = tf2onnx.convert.from_function(
            graph, input_signature=[images_spec], opset=opset
        )
    except Exception as err:  # tf2onnx raises many types
        raise ExportError(
            f"tf2onnx could not convert {type(adapter.trackable).__name__}: {err}"
        ) from err
    meta = model_proto.metadata_props.add()
    meta.key = "tfp_seg"
    meta.value = json.dumps(
        {"head_config": adapter.config, "num_samples": num_samples}, sort_keys=True
    )
    # Check the graph before writing it: a file at `path` has passed the parity checks.
    serialized = model_proto.SerializeToString()
    try:
        onnx_lib.checker.check_model(model_proto)
        session = onnxruntime.InferenceSession(serialized, providers=["CPUExecutionProvider"])
    except Exception as err:
        raise ExportError(
            f"tf2onnx produced a graph that does not load in onnxruntime (not written to "
            f"{path}): {err}"
        ) from err
    images = _check_images(check_images, spec, adapter.image_shape)
    _check_onnx(adapter, session, images, atol, path, num_samples)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "wb") as f:
        f.write(serialized)
    return path


def _check_onnx(adapter, session, images, atol, path, num_samples):
    names = [o.name for o in session.get_outputs()]
    try:
        first = dict(zip(names, session.run(None, {"images": images}), strict=True))
        (second,) = session.run(["logit_samples"], {"images": images})
    except Exception as err:
        raise ExportError(f"The ONNX graph for {path} fails to run in onnxruntime: {err}") from err
    state = adapter.prepare(tf.constant(images))
    expected = {k: np.asarray(v) for k, v in adapter.params(state).items()}
    expected["mean_logits"] = np.asarray(adapter.mean_logits(state))
    for name, value in expected.items():
        _assert_close(f"ONNX {name}", first[name], value, atol)
    if _is_stochastic(adapter, state, num_samples):
        if np.array_equal(first["logit_samples"], second):
            raise ExportParityError(
                f"{path}: logit samples are identical across runs although the Keras model's "
                "are not: the sampling noise was frozen into a constant (sample with "
                "tf.random ops, not keras.random.normal)."
            )


def _is_stochastic(adapter, state, num_samples) -> bool:
    """Whether the model's logit samples vary (analytic variance, else two seeded draws)."""
    variance = adapter.logit_variance(state)
    if variance is not None:
        return float(np.max(np.asarray(variance))) > 1e-6
    draws = [
        np.asarray(adapter.sample_logits(state, num_samples, seed=tf.constant([0, s], tf.int64)))
        for s in (1, 2)
    ]
    return float(np.max(np.abs(draws[0] - draws[1]))) > 1e-6


# ============================================================================================
# helpers
# ============================================================================================
def _variables_of(trackable) -> list:
    variables = getattr(trackable, "variables", None)
    if variables is None:
        raise ValueError(
            f"Cannot find the weights of {type(trackable).__name__}: the adapter's `trackable` "
            "must be a Keras model/layer or a tf.Module (with `.variables`)."
        )
    return list(variables)


def _tf_variable(variable):
    """The `tf.Variable` behind a Keras 3 variable (itself for a `tf.Variable`)."""
    if isinstance(variable, tf.Variable):
        return variable
    value = getattr(variable, "value", None)
    if isinstance(value, tf.Variable):
        return value
    raise TypeError(f"Cannot export variable {variable!r}: no tf.Variable behind it.")


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"`{name}` must be a positive int; got {value!r}.")
    return int(value)


def _version_dir(export_dir: str) -> str:
    export_dir = os.fspath(export_dir).rstrip("/\\") or "."
    base, last = os.path.split(export_dir)
    if re.fullmatch(r"\d+", last):
        if not base:
            raise ValueError(
                f"`export_dir` must be '<base>/<version>' (TF Serving layout); got {export_dir!r}."
            )
        return export_dir
    versions = [
        int(d)
        for d in (os.listdir(export_dir) if os.path.isdir(export_dir) else [])
        if re.fullmatch(r"\d+", d)
    ]
    return os.path.join(export_dir, str(max(versions, default=0) + 1))


def _image_spec(adapter: ExportAdapter, dynamic_spatial, num_samples) -> tf.TensorSpec:
    shape = adapter.image_shape
    if shape is None or len(shape) != 3 or shape[-1] is None:
        raise ValueError(
            f"Cannot tell the input shape of {type(adapter.trackable).__name__} "
            f"(got {shape}); build the model or pass image_shape=(H, W, channels)."
        )
    fixed = tf.TensorSpec([None, *shape], tf.float32)
    dynamic = tf.TensorSpec([None, None, None, shape[-1]], tf.float32)
    if dynamic_spatial is False:
        if None in shape[:2]:
            raise ValueError(f"dynamic_spatial=False needs a fixed image_shape; got {shape}.")
        return fixed
    if dynamic_spatial is True or None in shape[:2]:
        return dynamic

    def trace(images):
        state = adapter.prepare(images)
        return adapter.mean_logits(state), adapter.sample_logits(state, num_samples, seed=None)

    try:
        tf.function(trace, autograph=False).get_concrete_function(dynamic)
        return dynamic
    except Exception:  # any trace failure means "not with dynamic H/W"
        return fixed


def _check_images(images, spec: tf.TensorSpec, known_shape=None) -> np.ndarray:
    if images is not None:
        images = np.asarray(images, dtype=np.float32)
        if images.ndim != 4:
            raise ValueError(
                f"`check_images` must be [B, H, W, channels]; got shape {images.shape}."
            )
        return images
    h, w, c = spec.shape[1:]
    if (h is None or w is None) and known_shape is not None:
        h, w = known_shape[0], known_shape[1]
    if h is None or w is None:
        h = w = 32  # dynamic H/W and no known size; pass `check_images` if 32 is invalid
    return np.random.default_rng(0).normal(size=(2, h, w, c)).astype(np.float32)


def _assert_close(what: str, got: np.ndarray, expected: np.ndarray, atol: float) -> None:
    got = np.asarray(got)
    if got.shape != expected.shape:
        raise ExportParityError(f"{what}: shape {got.shape} != Keras {expected.shape}.")
    diff = float(np.max(np.abs(got.astype(np.float64) - expected))) if got.size else 0.0
    if not diff <= atol:
        raise ExportParityError(f"{what}: max |exported - Keras| = {diff:.3g} > atol={atol}.")
