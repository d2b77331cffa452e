"""Export: a SavedModel for TF Serving and an ONNX graph, both parity-checked.

Both exporters take a Keras model and a path. They read the model through an
`ExportAdapter`, the small contract an exporter needs from a probabilistic segmenter:

```none
state   = adapter.prepare(images)                 # the network, run once per request
params  = adapter.params(state)                   # {name: tensor}: packed params, loc, ...
mean    = adapter.mean_logits(state)              # [B, H, W, C], deterministic
samples = adapter.sample_logits(state, N, seed)   # [N, B, H, W, C], independent draws
averaged = adapter.sample_logits_for_mean(state, N, seed)   # for Monte Carlo means only
```

`as_adapter(model)` builds it for a model with a distribution head (`params = model(x)`,
`model.head.sample_logits(params, N, seed=)`: `ProbabilisticSegmenter` with any head), for
the sampling baselines `tfp_seg.uncertainty.MCDropout` (dropout kept on in the sampled
signatures) and `tfp_seg.uncertainty.DeepEnsemble` (every member in one graph), or for a
model that samples itself in graph-safe ops (`model.sample_logits_tensor(x, N, seed=)`, or
`_sample_logits_tensor` as `ProbabilisticUNet` has, or a `sample_logits` annotated
`-> tf.Tensor`). Anything else can be exported by passing `ExportAdapter.from_functions(...)`
in place of the model.

Samples handed to a client (`sample`, `uncertainty`, ONNX `logit_samples`) are independent
draws, as `model.sample` gives. Antithetic pairs (`mu +/- deviation`, the SSN head's default)
are used only where they reduce the variance of an average: the `probabilities` of
`serving_default`.

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
`head.sample_logits(params, num_samples, seed=seed, antithetic=False)` exactly (`sample`,
`uncertainty`: independent draws), and `serving_default`'s probabilities are the mean softmax
of `head.sample_logits(params, num_samples, seed=seed)` with the head's own antithetic default
(SSN: mirrored pairs, a lower-variance mean; for an even `num_samples`).

#### ONNX graph (`onnx`)

One graph, input `images`, dynamic batch, `num_samples` fixed at export; sampling with
`tf.random.uniform` (ONNX `RandomUniformLike`): outputs the `params` signature's tensors (no
string), `probabilities`, `labels`, `logit_samples [N,B,H,W,C]`, `label_samples [N,B,H,W]` and
the uncertainty maps. All sampled outputs of one run come from the same N independent draws
(`probabilities` is the mean softmax of that run's `logit_samples`). The head config is in the
model's `metadata_props["tfp_seg"]`.

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
    tensor (stateless, reproducible), and return independent draws: they are what a client of
    the `sample` signature (or ONNX `logit_samples`) gets. `sample_logits_for_mean` may return
    correlated draws with the same marginals (antithetic pairs) for Monte Carlo means; by
    default it is `sample_logits`. `trackable` is the object that owns the variables (the
    Keras model); its variables (`variables()`) are stored on the exported module.

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
        """Independent logit samples `[num_samples, B, H, W, C]` in export-safe ops."""
        raise NotImplementedError

    def sample_logits_for_mean(self, state, num_samples: int, seed=None) -> tf.Tensor:
        """Logit samples `[num_samples, B, H, W, C]` whose softmax is averaged (the
        `probabilities` of `serving_default`): any draws with the right marginals, e.g.
        antithetic pairs. Default: `sample_logits`."""
        return self.sample_logits(state, num_samples, seed=seed)

    def sample_chunk(self, state, num_samples: int, seed, start, for_mean: bool = False):
        """Samples `start, ..., start + num_samples - 1` of one request (`start`: an int32
        scalar tensor), as the SavedModel signatures draw them chunk by chunk. The default
        ignores `start`; samplers whose draw depends on the sample's index (a deep ensemble
        draws sample `n` from member `n mod M`) override it, with `start = 0` equal to
        `sample_logits` / `sample_logits_for_mean`."""
        del start
        if for_mean:
            return self.sample_logits_for_mean(state, num_samples, seed=seed)
        return self.sample_logits(state, num_samples, seed=seed)

    def logit_variance(self, state) -> Optional[tf.Tensor]:
        """Analytic per-logit variance `[B, H, W, C]`, or None when unknown (used by checks)."""
        return None

    def variables(self) -> list:
        """The variables the exported graphs read (default: `trackable.variables`)."""
        return _variables_of(self.trackable)

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
          sample_logits: `(images, num_samples: int, seed) -> [N, B, H, W, C]`, independent
            draws; `seed` is None or an int64 `[2]` tensor.
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
        # Independent draws whatever the head's default (the SSN head's is antithetic pairs,
        # whose second half mirrors the first: N requested samples would be N/2 draws).
        return self.head.sample_logits(state, num_samples, seed=seed, antithetic=False)

    def sample_logits_for_mean(self, state, num_samples, seed=None):
        # The head's rule for Monte Carlo means (`head.mean_probabilities`): its antithetic
        # default when `num_samples` is even, independent draws otherwise.
        mean_sampling = getattr(self.head, "_mean_sampling", None)
        antithetic = False
        if callable(mean_sampling):
            num_samples, antithetic = mean_sampling(num_samples)
        return self.head.sample_logits(state, num_samples, seed=seed, antithetic=antithetic)

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


def _fold_seed(seed, salt: int):
    """A distinct stateless seed per salt (None stays None: stateful sampling)."""
    if seed is None:
        return None
    return tf.random.experimental.stateless_fold_in(tf.cast(seed, tf.int64), salt)


def _distribution_head(model):
    from tfp_seg.layers.base import DistributionHead

    head = getattr(model, "head", None)
    return head if isinstance(head, DistributionHead) else None


def _head_config(head) -> dict:
    import keras

    return {
        "head": json.loads(json.dumps(keras.saving.serialize_keras_object(head), default=str)),
        "num_classes": int(head.num_classes),
        "params_size": int(head.params_size),
    }


def _num_classes_of(model, what: str) -> int:
    """C of a model with a distribution head, or of one whose output is the logits."""
    head = _distribution_head(model)
    if head is not None:
        return int(head.num_classes)
    num_classes = getattr(model, "num_classes", None)
    if num_classes is None:
        try:
            num_classes = model.outputs[0].shape[-1]
        except (AttributeError, IndexError, TypeError, ValueError):
            num_classes = None
    if num_classes is None:
        raise ExportError(
            f"Cannot export {what}: its model {type(model).__name__} has no tfp_seg "
            "DistributionHead `.head` and no known number of output logits (`num_classes`)."
        )
    return int(num_classes)


def _logit_samples_of(model, output, num_samples: int, seed, head_sampling: bool):
    """`num_samples` logit maps `[N, B, H, W, C]` from one forward pass's output, as
    `tfp_seg.uncertainty` samples a member / pass: the head's independent draws, or its mean
    logits (the output itself for a model without a head) repeated."""
    head = _distribution_head(model)
    if head is not None:
        if head_sampling:
            return head.sample_logits(output, num_samples, seed=seed, antithetic=False)
        logits = head.mean_logits(output)
    else:
        logits = output
    logits = tf.cast(logits, tf.float32)
    return tf.repeat(logits[tf.newaxis], num_samples, axis=0)


def _mean_logits_of(model, output):
    head = _distribution_head(model)
    return head.mean_logits(output) if head is not None else output


def _dropout_sampler(layer, seed):
    """A graph-safe replacement of a dropout layer's `call`, always active (MC dropout).

    `seed` None draws the masks with the stateful `tf.random.uniform` (fresh per run; ONNX
    `RandomUniformLike`), an int64 `[2]` seed with `tf.random.stateless_uniform`
    (reproducible): unlike Keras' own dropout, no seed-generator variable is updated, so the
    exported graph is stateless and converts to ONNX.
    """
    import keras

    rate = float(layer.rate)
    gaussian = getattr(keras.layers, "GaussianDropout", None)
    is_gaussian = gaussian is not None and isinstance(layer, gaussian)

    def call(inputs, *args, training=None, **kwargs):
        del args, training, kwargs
        inputs = tf.convert_to_tensor(inputs)
        if rate <= 0.0:
            return inputs
        if is_gaussian:
            stddev = float(np.sqrt(rate / (1.0 - rate)))
            noise = dists.standard_normal(tf.shape(inputs), seed, tf.float32)
            return inputs * tf.cast(1.0 + stddev * noise, inputs.dtype)
        if rate >= 1.0:
            return tf.zeros_like(inputs)
        get_noise_shape = getattr(layer, "_get_noise_shape", None)  # SpatialDropout*
        noise_shape = get_noise_shape(inputs) if callable(get_noise_shape) else layer.noise_shape
        dynamic = tf.shape(inputs)
        if noise_shape is None:
            shape = dynamic
        else:
            shape = tf.stack(
                [
                    dynamic[i] if d is None else tf.cast(d, tf.int32)
                    for i, d in enumerate(noise_shape)
                ]
            )
        if seed is None:
            u = tf.random.uniform(shape, dtype=tf.float32)
        else:
            u = tf.random.stateless_uniform(shape, seed=seed, dtype=tf.float32)
        keep = tf.cast(u >= rate, inputs.dtype)  # Keras' rule: keep with probability 1 - rate
        return inputs * keep / tf.cast(1.0 - rate, inputs.dtype)

    return call


class _SampledDropout:
    """Context manager: every layer of `layers` runs `_dropout_sampler`, whatever `training`.

    Active while a graph is traced (and for the eager reference of the parity checks); each
    layer's bound `call` is shadowed by an instance attribute and restored on exit.
    """

    def __init__(self, layers, seed):
        self.layers = list(layers)
        self.seed = seed

    def __enter__(self):
        for layer in self.layers:
            if "call" in layer.__dict__:
                raise ExportError(
                    f"Cannot export MC dropout: layer {layer.name!r} is already patched "
                    "(is a tfp_seg.uncertainty.MCDropout sampling it right now?)."
                )
        for j, layer in enumerate(self.layers):
            object.__setattr__(layer, "call", _dropout_sampler(layer, _fold_seed(self.seed, j + 1)))
        return self

    def __exit__(self, *exc):
        for layer in self.layers:
            if "call" in layer.__dict__:
                object.__delattr__(layer, "call")
        return False


class _MCDropoutAdapter(ExportAdapter):
    """`tfp_seg.uncertainty.MCDropout`: dropout on in the sampled outputs, off elsewhere.

    Sample `n` is one forward pass with its own dropout masks (all N passes of a chunk run
    as one batch of `N * B` images: the masks are per example) and, with `head_sampling`,
    one independent draw of the head's distribution, as `MCDropout.sample_logits` does. The
    deterministic outputs (`params`, `mean_logits`) are the network with dropout off.
    Seeded requests are reproducible, but draw other masks than `MCDropout(seed=...)`.
    """

    def __init__(self, sampler, image_shape=None):
        import keras

        model = sampler.model
        self.model = model
        self.head = _distribution_head(model)
        self.head_sampling = bool(sampler.head_sampling)
        self.dropout_layers = list(sampler.dropout_layers)
        supported = tuple(
            t
            for t in (keras.layers.Dropout, getattr(keras.layers, "GaussianDropout", None))
            if t is not None
        )
        unsupported = [layer for layer in self.dropout_layers if not isinstance(layer, supported)]
        if unsupported:
            names = ", ".join(f"{layer.name} ({type(layer).__name__})" for layer in unsupported)
            raise ExportError(
                f"Cannot export MC dropout over {type(model).__name__}: dropout layers {names} "
                "have no graph-safe export (supported: Dropout, SpatialDropout1D/2D/3D, "
                "GaussianDropout). Export the deterministic network instead: "
                "tfp_seg.export.saved_model(mc_dropout.model, ...)."
            )
        num_classes = _num_classes_of(model, "MC dropout")
        config = {
            "format": "tfp_seg.export/1",
            "model": "MCDropout",
            "network": type(model).__name__,
            "num_classes": num_classes,
            "head_sampling": self.head_sampling,
            "dropout_layers": [
                {"name": layer.name, "class": type(layer).__name__, "rate": float(layer.rate)}
                for layer in self.dropout_layers
            ],
            "sampling": "sample n: one forward pass with dropout on (fresh masks)"
            + (" and one draw of the head" if self.head is not None and self.head_sampling else ""),
            "params_note": "params and mean_logits: the network with dropout off",
        }
        if self.head is not None:
            config.update(_head_config(self.head))
        super().__init__(model, num_classes, config, image_shape or _model_image_shape(model))

    def prepare(self, images):
        return images, self.model(images, training=False)

    def params(self, state):
        output = state[1]
        out = {"params": tf.identity(output), "mean_logits": _mean_logits_of(self.model, output)}
        if self.head is not None and hasattr(self.head, "covariance_parts"):
            loc, factor, diag = self.head.covariance_parts(output)
            out.update(loc=loc, cov_factor=factor, cov_diag=diag)
        return out

    def mean_logits(self, state):
        return _mean_logits_of(self.model, state[1])

    def sample_logits(self, state, num_samples, seed=None):
        images = state[0]
        tiled = tf.tile(images, [num_samples, 1, 1, 1])  # pass n, image b at n * B + b
        with _SampledDropout(self.dropout_layers, seed):
            output = self.model(tiled, training=False)
        logits = _logit_samples_of(self.model, output, 1, _fold_seed(seed, 0), self.head_sampling)
        logits = tf.cast(logits[0], tf.float32)
        shape = tf.concat([[num_samples, tf.shape(images)[0]], tf.shape(logits)[1:]], 0)
        return tf.reshape(logits, shape)


class _EnsembleAdapter(ExportAdapter):
    """`tfp_seg.uncertainty.DeepEnsemble`: all members in one graph.

    Sample `n` of a request is a draw of member `n mod M` (its head's independent draw with
    `head_sampling`, else its mean logits), as `DeepEnsemble.sample_logits` assigns them, across
    the SavedModel's sampling chunks too. `params` concatenates the members' packed outputs
    on the last axis; `mean_logits` is the mean of the members' mean logits, i.e. the mean of
    the ensemble's logit distribution.
    """

    def __init__(self, ensemble, image_shape=None):
        members = list(ensemble.members)
        self.members = members
        self.head_sampling = bool(ensemble.head_sampling)
        sizes = [_num_classes_of(member, "the DeepEnsemble") for member in members]
        if len(set(sizes)) != 1:
            raise ExportError(
                f"Cannot export a DeepEnsemble whose members predict different numbers of "
                f"classes ({sizes})."
            )
        members_config = []
        for i, member in enumerate(members):
            head = _distribution_head(member)
            entry = {"member": i, "model": type(member).__name__}
            if head is not None:
                entry.update(_head_config(head))
            members_config.append(entry)
        config = {
            "format": "tfp_seg.export/1",
            "model": "DeepEnsemble",
            "num_members": len(members),
            "num_classes": sizes[0],
            "head_sampling": self.head_sampling,
            "members": members_config,
            "sampling": "sample n: a draw of member n mod num_members",
            "params_note": "params: the members' packed outputs concatenated on the last axis; "
            "mean_logits: the mean of the members' mean logits",
        }
        shape = image_shape or _model_image_shape(members[0])
        super().__init__(ensemble, sizes[0], config, shape)

    def variables(self):
        seen, out = set(), []
        for member in self.members:
            for variable in _variables_of(member):
                if id(variable) not in seen:
                    seen.add(id(variable))
                    out.append(variable)
        return out

    def prepare(self, images):
        return tuple(member(images, training=False) for member in self.members)

    def params(self, state):
        return {
            "params": tf.concat([tf.cast(o, tf.float32) for o in state], axis=-1),
            "mean_logits": self.mean_logits(state),
        }

    def mean_logits(self, state):
        logits = [
            tf.cast(_mean_logits_of(member, output), tf.float32)
            for member, output in zip(self.members, state, strict=True)
        ]
        return tf.add_n(logits) / float(len(logits))

    def sample_logits(self, state, num_samples, seed=None):
        return self._draw(state, num_samples, seed, 0)

    def sample_chunk(self, state, num_samples, seed, start, for_mean=False):
        return self._draw(state, num_samples, seed, start)

    def _draw(self, state, num_samples, seed, start):
        m = len(self.members)
        per_member = -(-num_samples // m)  # any N consecutive samples hold <= ceil(N/M) per member
        draws = tf.concat(
            [
                tf.cast(
                    _logit_samples_of(
                        member, output, per_member, _fold_seed(seed, j), self.head_sampling
                    ),
                    tf.float32,
                )
                for j, (member, output) in enumerate(zip(self.members, state, strict=True))
            ],
            axis=0,
        )  # member j's draws at j * per_member + k
        # Global sample g = start + i comes from member g mod M, as that member's
        # (g // M - first)-th draw of this chunk.
        if isinstance(start, (int, np.integer)):
            g = np.arange(num_samples) + int(start)
            q, r = divmod(int(start), m)
            j = g % m
            index = j * per_member + g // m - q - (j < r)
            return tf.gather(draws, tf.constant(index, tf.int32))
        start = tf.cast(start, tf.int32)
        g = start + tf.range(num_samples, dtype=tf.int32)
        j = tf.math.floormod(g, m)
        local = tf.math.floordiv(g, m) - tf.math.floordiv(start, m)
        local -= tf.cast(j < tf.math.floormod(start, m), tf.int32)
        return tf.gather(draws, j * per_member + local)


def as_adapter(model, image_shape: Optional[Sequence[Optional[int]]] = None) -> ExportAdapter:
    """The `ExportAdapter` of `model` (returned unchanged if it already is one).

    Recognised, in order:
      1. a model with a `head` that is a `tfp_seg.layers.DistributionHead` and
         `model(x) -> params` (`ProbabilisticSegmenter`, any head);
      2. `tfp_seg.uncertainty.MCDropout`: the sampled outputs are forward passes with the
         dropout layers on (Dropout, SpatialDropout*, GaussianDropout; others raise
         `ExportError`), the deterministic ones the network with dropout off;
      3. `tfp_seg.uncertainty.DeepEnsemble`: every member in the graph, sample `n` from member
         `n mod M`;
      4. a model with `num_classes` that samples itself in graph-safe ops:
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
    from tfp_seg.uncertainty import DeepEnsemble, MCDropout

    if isinstance(getattr(model, "head", None), DistributionHead):
        return _HeadAdapter(model, image_shape)
    if isinstance(model, MCDropout):
        return _MCDropoutAdapter(model, image_shape)
    if isinstance(model, DeepEnsemble):
        return _EnsembleAdapter(model, image_shape)
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
        except (NotImplementedError, TypeError, ValueError):
            # The config is informative only; models without a serialisable `get_config`
            # (Keras raises NotImplementedError or TypeError) export without it.
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


def _chunked_samples(
    adapter, state, num_samples, seed, chunk: int, max_num_samples: int, for_mean: bool = False
):
    """`[num_samples, B, H, W, C]` for a tensor `num_samples`, in chunks of `chunk` samples.

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
            lambda: tf.random.experimental.stateless_fold_in(seed, tf.cast(i, tf.int64)),
        )
        samples = adapter.sample_chunk(state, chunk, chunk_seed, i * chunk, for_mean=for_mean)
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
            # A Monte Carlo mean: antithetic pairs where the head uses them for its means.
            samples = self._samples(images, num_samples, seed, for_mean=True)
            probabilities = dists.mean_softmax(samples)
            return {
                "probabilities": probabilities,
                "labels": dists.argmax_classes(probabilities),
            }

        def sample(images, num_samples=default_n, seed=default_seed):
            samples = self._samples(images, num_samples, seed)  # independent draws
            return {
                "labels": dists.argmax_classes(samples),
                "logits": samples,
            }

        def uncertainty(images, num_samples=default_n, seed=default_seed):
            # Independent draws: `variance` is the unbiased sample variance only for those.
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
        self.model_variables = [_tf_variable(v) for v in adapter.variables()]

    def _samples(self, images, num_samples, seed, for_mean=False):
        state = self._adapter.prepare(images)
        samples = _chunked_samples(
            self._adapter, state, num_samples, seed, self._chunk, self._max, for_mean
        )
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
      model: a `ProbabilisticSegmenter` (any head), a `tfp_seg.uncertainty.MCDropout` or
        `DeepEnsemble`, a model that samples itself, or an `ExportAdapter` (see `as_adapter`).
      export_dir: `"savedmodels/<name>/<version>"` (integer version, TF Serving's layout), or
        `"savedmodels/<name>"` to write the next free version (1 if none).
      num_samples: default N of the sampled signatures, and the sampling chunk: a seeded
        `sample` request for exactly N samples reproduces
        `head.sample_logits(params, N, seed=seed, antithetic=False)` (independent draws);
        `serving_default` averages `head.sample_logits(params, N, seed=seed)` (the head's
        antithetic default, for even N).
      image_shape: `(H, W, channels)`; default: the shape the model was built for.
      dynamic_spatial: export with dynamic H/W (True), the fixed `image_shape` (False), or try
        dynamic and fall back to fixed when the model needs a static size (None): when its
        trace with unknown H, W fails with a TypeError or ValueError and the fixed-size trace
        does not. Any other error of the model's trace is raised.
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
    reference = np.asarray(
        dists.mean_softmax(adapter.sample_logits_for_mean(state, num_samples, seed=seed))
    )
    averaged = loaded.signatures["serving_default"](
        images=tf.constant(images), num_samples=tf.constant(num_samples), seed=seed
    )
    _assert_close(
        "SavedModel serving_default/probabilities (seeded)",
        np.asarray(averaged["probabilities"]),
        reference,
        atol,
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
    heads with a covariance), `num_samples` independent logit samples (Box-Muller on ONNX
    `RandomUniformLike`; `logit_samples [N, B, H, W, C]`, `label_samples [N, B, H, W]` int32),
    their mean `probabilities [B, H, W, C]`, `labels [B, H, W]` int32 and the uncertainty maps
    (`predictive_entropy`, `expected_entropy`, `mutual_information`, `variance`, `[B, H, W]`).
    Every sampled output of a run is computed from that run's `logit_samples` (no antithetic
    pairs: they are what a client sees).

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
        # Independent draws: the same samples feed `logit_samples` and the averages.
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
    # Trace here, outside the conversion's error handling: an error of the model itself
    # surfaces as what it is, not as a conversion failure.
    graph.get_concrete_function()
    try:
        model_proto, _ = tf2onnx.convert.from_function(
            graph, input_signature=[images_spec], opset=opset
        )
    except Exception as err:  # tf2onnx raises many types; the cause is chained
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
    except (onnx_lib.checker.ValidationError, ValueError, *_onnxruntime_errors()) as err:
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
    except _onnxruntime_errors() as err:
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


def _onnxruntime_errors() -> tuple:
    """The exception types onnxruntime raises (its own `Fail`, `InvalidGraph`, ... derive
    from `Exception` directly; pybind11 turns other C++ errors into `RuntimeError`)."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    own = tuple(
        value
        for value in vars(state).values()
        if isinstance(value, type) and issubclass(value, Exception)
    )
    return (RuntimeError, *own)


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


# The exception types by which a trace with unknown H, W fails when the graph needs a static
# size (OperatorNotAllowedInGraphError is a TypeError).
_STATIC_SHAPE_ERRORS = (TypeError, ValueError)


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

    def trace(spec):
        def run(images):
            state = adapter.prepare(images)
            return adapter.mean_logits(state), adapter.sample_logits(state, num_samples)

        tf.function(run, autograph=False).get_concrete_function(spec)

    try:
        trace(dynamic)
        return dynamic
    except _STATIC_SHAPE_ERRORS:
        # Layers that need a static H, W fail to trace with unknown ones with a TypeError
        # (Keras' bilinear UpSampling2D tests a symbolic shape in Python:
        # OperatorNotAllowedInGraphError; keras-hub's MiT multiplies `None` sizes) or a
        # ValueError (shape inference). Such an error is the dynamic size's only if the
        # fixed-size trace succeeds; if that fails too, its error is the model's own and
        # propagates (with the dynamic one as context). Other types always propagate.
        trace(fixed)
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
