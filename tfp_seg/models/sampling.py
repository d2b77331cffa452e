"""`Sampler`: the one model-level sampling interface of tfp_seg.

Every model that draws segmentations inherits it: `ProbabilisticSegmenter`,
`ProbabilisticUNet` and the wrappers `MCDropout` and `DeepEnsemble`
(`tfp_seg.models.wrappers`). A model provides graph pieces for one batch of images; `Sampler`
turns them into the public, batched, NumPy-returning read-outs (`sample_logits`, `sample`,
`probability_samples`, `predict_proba`) that metrics, plots, the CLI and the exporters rely on
(`tfp_seg.protocols.Sampler`). `S` is the spatial shape: `(H, W)` for images, `(D, H, W)` for
volumes (a model with `spatial_dims=3`); one code path serves both, and `x` is checked against
the model's rank (`Sampler.input_spatial_dims`).

```none
hook (one batch `images [B, *S, channels]`)             default
_sample_logits_tensor(images, N, seed, antithetic)       required: logits [N, B, *S, C]
_sample_labels_tensor(images, N, seed, antithetic)       argmax of _sample_logits_tensor
_mean_probabilities(images, N, seed)                     mean softmax of N independent draws
```

#### The contract, the same for every model

```none
argument     accepted                                      default
x            images [B, *S, channels], B >= 1             -
num_samples  a positive int (Python or NumPy, not bool)    `model.default_num_samples`: 16;
                                                           MCDropout / DeepEnsemble: their
                                                           `num_samples`
seed         None (fresh randomness), an int, or a pair    None
             of ints (a shape-[2] stateless seed)
batch_size   None (all images at once) or a positive int   32
antithetic   (`sample_logits`, `sample`) a bool; True      False
             needs an even N, and a model that mirrors
             its draws (`MCDropout`, `DeepEnsemble` raise)
```

Every argument is checked before anything runs, with the same `ValueError` for every model.

- **Seeds per batch.** Batch 0 uses `seed` itself and batch `k > 0` uses
  `tfp_seg._seeds.fold_seed(seed, k)` (as the exporters' sample chunks): every batch draws
  its own noise, so images in different batches are never given the same noise, and a seeded
  call is reproducible for a fixed `batch_size` (not across batch sizes).
- **Labels.** `sample` draws from the label sampler of whatever draws the logits: a
  distribution head's `sample_labels` (exact; for SSN and heteroscedastic heads cheaper than
  the arg max of logit samples, but other draws than `sample_logits` with the same seed),
  otherwise the arg max of the logit sample (Prob U-Net latents, the mean logits of a wrapped
  model without head sampling). So `sample(x, N, seed)` is always *distributed* as
  `argmax(sample_logits(x, N, seed))`, and equal to it exactly when no head draws the labels.
- **Predictive probabilities.** `predict_proba` is the model's own Monte Carlo estimator of
  `E[softmax(eta)]`: a head's `mean_probabilities` (antithetic pairs for SSN when N is even,
  one pass for a point mass) in `ProbabilisticSegmenter`, else the mean softmax of N
  independent draws; it is not necessarily the mean of `probability_samples` with the same
  seed.
"""

from __future__ import annotations

from typing import Iterator, Optional, Tuple

import numpy as np
import tensorflow as tf

from tfp_seg import _checks, _seeds
from tfp_seg import distributions as dists
from tfp_seg._seeds import SeedLike
from tfp_seg.models import _spatial

__all__ = ["Sampler", "DEFAULT_NUM_SAMPLES"]

DEFAULT_NUM_SAMPLES = 16


INPUT_KEYS = ("images", "roi_mask")


def split_inputs(x, name: str = "x"):
    """`(images, roi_mask)` of a model input: the images themselves (`roi_mask` None), or a
    dict `{"images": ..., "roi_mask": ...}` (roi_mask optional); other keys are a
    `ValueError` naming `name`."""
    if not isinstance(x, dict):
        return x, None
    if "images" not in x or set(x) - set(INPUT_KEYS):
        raise ValueError(
            f"`{name}` as a dict must have the key 'images' and optionally 'roi_mask'; got "
            f"keys {sorted(x)}."
        )
    return x["images"], x.get("roi_mask")


def _as_array(x):
    return x if isinstance(x, tf.Tensor) else np.asarray(x)


def _images_form(spatial_dims: Optional[int]) -> str:
    if spatial_dims is None:
        return "rank 4 ([B, H, W, channels] images) or 5 ([B, D, H, W, channels] volumes)"
    kind = "images" if spatial_dims == 2 else "volumes"
    return (
        f"rank {spatial_dims + 2} ({_spatial.input_form(spatial_dims)} {kind}, "
        f"spatial_dims={spatial_dims})"
    )


def _check_images(x, spatial_dims: Optional[int] = None):
    """`x` checked: images `[B, *S, channels]` (`S = (H, W)` or `(D, H, W)`: the model's
    `spatial_dims`, or either when None), or a dict `{"images": ..., "roi_mask": [B, *S] or
    [B, *S, 1]}` (the region of interest of heads that take one)."""
    if isinstance(x, dict):
        split_inputs(x)
        checked = {key: _as_array(value) for key, value in x.items()}
        images = _check_images(checked["images"], spatial_dims)
        s = len(images.shape) - 2
        mask = checked.get("roi_mask")
        if mask is not None and (
            len(mask.shape) not in (s + 1, s + 2)
            or tuple(mask.shape[: s + 1]) != tuple(images.shape[: s + 1])
            or (len(mask.shape) == s + 2 and mask.shape[-1] != 1)
        ):
            form = _checks.spatial_form(s)
            raise ValueError(
                f"`x['roi_mask']` must be {form} (or {_checks.spatial_form(s, 'B', '1')}) "
                f"matching the images {_checks.shape_str(images)}; got shape "
                f"{_checks.shape_str(mask)}."
            )
        return checked
    x = _as_array(x)
    ranks = _checks.SPATIAL_DIMS if spatial_dims is None else (spatial_dims,)
    if len(x.shape) - 2 not in ranks:
        raise ValueError(
            f"`x` must have {_images_form(spatial_dims)}; got shape {_checks.shape_str(x)}."
        )
    if x.shape[0] == 0:
        raise ValueError("`x` is an empty batch (0 images).")
    return x


def _batch_free_spec(value) -> tf.TensorSpec:
    """The `tf.TensorSpec` of one input array with any batch size."""
    dtype = value.dtype if isinstance(value, tf.Tensor) else tf.as_dtype(np.asarray(value).dtype)
    return tf.TensorSpec([None, *value.shape[1:]], dtype)


def _signature_key(signature) -> tuple:
    """A hashable key of a (dict of) `tf.TensorSpec`."""
    flat = tf.nest.flatten(signature)
    keys = tuple(sorted(signature)) if isinstance(signature, dict) else None
    return (keys, tuple((tuple(spec.shape.as_list()), spec.dtype.name) for spec in flat))


def _rows(x, start: int, stop: int):
    if isinstance(x, dict):
        return {key: value[start:stop] for key, value in x.items()}
    return x[start:stop]


class Sampler:
    """Mixin: the batched, NumPy-returning sampling read-outs (see the module docstring).

    Subclasses implement `_sample_logits_tensor` and may override `_sample_labels_tensor`
    (an exact label sampler), `_mean_probabilities` (the model's estimator),
    `default_num_samples`, and `_supports_antithetic`.
    """

    # Whether `_sample_logits_tensor(..., antithetic=True)` draws mirrored pairs.
    _supports_antithetic = True
    # Whether the read-outs run each batch through a cached `tf.function`
    # (`_compiled_read_out`); models whose hooks are graph-safe turn it on.
    _compile_read_outs = False

    @property
    def input_spatial_dims(self) -> Optional[int]:
        """The spatial rank the read-outs check `x` against: 2 (images `[B, H, W, ch]`), 3
        (volumes `[B, D, H, W, ch]`), or None (either; a wrapper of a model without one)."""
        dims = getattr(self, "spatial_dims", None)
        return dims if isinstance(dims, int) and not isinstance(dims, bool) else None

    @property
    def default_num_samples(self) -> int:
        """N when a read-out is called without `num_samples`."""
        return DEFAULT_NUM_SAMPLES

    # --- hooks ---------------------------------------------------------------------------------
    def _sample_logits_tensor(self, images, num_samples: int, seed=None, antithetic=False):
        """Logit samples `[N, B, *S, C]` (float32 tensor) for one batch."""
        raise NotImplementedError

    def _sample_labels_tensor(self, images, num_samples: int, seed=None, antithetic=False):
        """Label maps `[N, B, *S]` (int32); models with an exact label sampler override it."""
        return dists.argmax_classes(
            self._sample_logits_tensor(images, num_samples, seed=seed, antithetic=antithetic)
        )

    def _mean_probabilities(self, images, num_samples: int, seed=None):
        """`E[softmax(eta)]` `[B, *S, C]`: the mean softmax of N independent draws."""
        samples = self._sample_logits_tensor(images, num_samples, seed=seed, antithetic=False)
        return dists.mean_softmax(samples)

    # --- argument checks -----------------------------------------------------------------------
    def _num_samples_arg(self, num_samples, antithetic: bool = False) -> int:
        if num_samples is None:
            num_samples = self.default_num_samples
        num_samples = _checks.positive_int(num_samples, "num_samples")
        if antithetic and not self._supports_antithetic:
            raise ValueError(
                f"{type(self).__name__} draws independent samples; `antithetic=True` is not "
                "supported."
            )
        return _checks.check_num_samples(num_samples, antithetic)

    def _batches(
        self, x, batch_size: Optional[int], seed: SeedLike
    ) -> Iterator[Tuple[object, object]]:
        """Check `x`, `batch_size` and `seed` (before anything runs); yield `(images, seed)`."""
        batch_size = _checks.positive_int(batch_size, "batch_size", optional=True)
        seed = _seeds.check_seed(seed)
        x = _check_images(x, self.input_spatial_dims)
        n = (x["images"] if isinstance(x, dict) else x).shape[0]
        if batch_size is None or n is None:
            return iter([(x, seed)])
        starts = range(0, int(n), batch_size)
        return (
            (_rows(x, start, start + batch_size), _seeds.batch_seed(seed, k))
            for k, start in enumerate(starts)
        )

    def _read_out(
        self, read, x, num_samples, seed, batch_size, antithetic=False, axis=1, kind=None
    ):
        """Check the arguments (all before anything runs), then `read(images, n, seed=...,
        antithetic=...)` per batch of `x`, joined along `axis` as one numpy array.

        With `_compile_read_outs` (and a `kind` naming the read-out), each batch runs through
        one `tf.function` cached on the model (`_compiled_read_out`); seeded calls give the
        values of the eager `read` for the same seed."""
        antithetic = bool(antithetic)
        n = self._num_samples_arg(num_samples, antithetic)
        if kind is not None and self._compile_read_outs:
            read = self._compiled_read_out(kind, read, n, antithetic)
        out = [
            np.asarray(read(xb, n, seed=s, antithetic=antithetic))
            for xb, s in self._batches(x, batch_size, seed)
        ]
        # A writable array of its own, as from `np.concatenate` (the tensors' views are not).
        return np.array(out[0]) if len(out) == 1 else np.concatenate(out, axis=axis)

    def _read_out_key(self) -> tuple:
        """What besides the weights a compiled read-out depends on (a model whose Python
        settings can change after it is built extends it; the cache is keyed by it)."""
        return ()

    def _compiled_read_out(self, kind: str, read, n: int, antithetic: bool):
        """`read` as a function of `(images, n, seed, antithetic)` that runs one `tf.function`
        per (kind, N, antithetic, `_read_out_key()`, input signature with any batch size),
        cached on the model. An unbuilt model runs eagerly once (building it). `seed=None`
        draws a fresh stateless seed eagerly (`_seeds.draw_seed`, which follows a global
        seed), so the compiled function is always stateless and traced once."""
        cache = self.__dict__.get("_read_out_cache")
        if cache is None:
            cache = {}
            # Not a Keras-tracked attribute: nothing of it is saved or exported.
            object.__setattr__(self, "_read_out_cache", cache)

        settings = self._read_out_key()  # once per read-out call, not per batch

        def run(images, num, seed=None, antithetic=antithetic):
            if not getattr(self, "built", True):
                return read(images, num, seed=seed, antithetic=antithetic)
            signature = tf.nest.map_structure(_batch_free_spec, images)
            key = (kind, num, antithetic, settings, _signature_key(signature))
            fn = cache.get(key)
            if fn is None:

                def traced(images_arg, seed_arg):
                    return read(images_arg, num, seed=seed_arg, antithetic=antithetic)

                fn = tf.function(
                    traced,
                    input_signature=[signature, tf.TensorSpec([2], tf.int64)],
                    reduce_retracing=False,
                )
                cache[key] = fn
            seed = _seeds.draw_seed() if seed is None else seed
            return fn(images, _seeds.stateless_seed(seed))

        return run

    # --- read-outs -----------------------------------------------------------------------------
    def sample_logits(
        self,
        x,
        num_samples: Optional[int] = None,
        seed: SeedLike = None,
        batch_size: Optional[int] = 32,
        antithetic: bool = False,
    ) -> np.ndarray:
        """Logit samples `[N, B, *S, C]` (float32 numpy) for images `x [B, *S, channels]`.

        Independent samples by default (what a person looking at plausible segmentations
        wants); `antithetic=True` gives mirrored pairs, a variance reduction for estimators.
        """
        return self._read_out(
            self._sample_logits_tensor,
            x,
            num_samples,
            seed,
            batch_size,
            antithetic,
            kind="sample_logits",
        )

    def sample(
        self,
        x,
        num_samples: Optional[int] = None,
        seed: SeedLike = None,
        batch_size: Optional[int] = 32,
        antithetic: bool = False,
    ) -> np.ndarray:
        """Sampled label maps `[N, B, *S]` (int32 numpy), distributed as the arg max of
        logit samples.

        A distribution head that draws the samples draws the maps with its exact label
        sampler (`head.sample_labels`: cheaper for SSN and heteroscedastic heads), so they are
        then not the arg max of `sample_logits` with the same seed, though they have its
        distribution.
        """
        return self._read_out(
            self._sample_labels_tensor, x, num_samples, seed, batch_size, antithetic, kind="sample"
        )

    def probability_samples(
        self,
        x,
        num_samples: Optional[int] = None,
        seed: SeedLike = None,
        batch_size: Optional[int] = 32,
    ) -> np.ndarray:
        """Softmax of each logit sample, `[N, B, *S, C]` (input of `tfp_seg.uncertainty`).

        The softmax of `sample_logits(x, num_samples, seed, batch_size)`: the same draws.
        """

        def softmax_of_samples(images, n, seed, antithetic):
            samples = self._sample_logits_tensor(images, n, seed=seed, antithetic=antithetic)
            return dists.class_softmax(samples)

        return self._read_out(
            softmax_of_samples, x, num_samples, seed, batch_size, kind="probability_samples"
        )

    def predict_proba(
        self,
        x,
        num_samples: Optional[int] = None,
        seed: SeedLike = None,
        batch_size: Optional[int] = 32,
    ) -> np.ndarray:
        """Predictive probabilities `E[softmax(eta)]` over `num_samples`, `[B, *S, C]`.

        The model's own Monte Carlo estimator (see the module docstring).
        """

        def mean_probabilities(images, n, seed, antithetic):
            return self._mean_probabilities(images, n, seed=seed)

        return self._read_out(
            mean_probabilities, x, num_samples, seed, batch_size, axis=0, kind="predict_proba"
        )
