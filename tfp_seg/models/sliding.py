"""Sliding-window inference on whole volumes, with ONE low-rank `z` per volume.

A volume too large for one forward pass is cut into windows; the model's head parameters are
computed window by window and stitched into the parameters of the whole volume
(`sliding_window_params`); `SlidingWindowSampler` then samples the distribution those stitched
parameters define, in one piece.

#### Windows and stitching

```none
volume [B, *S, M],  S = (D, H, W) (or (H, W)),  window w_a, overlap o_a (0 <= o_a < w_a) per axis a
stride t_a = w_a - o_a;   starts along axis a: 0, t_a, 2 t_a, ..., L_a - w_a   (the last window
                          is moved back to end at the border, so no window leaves the volume)
L_a = max(S_a, w_a):      an axis shorter than its window is padded at its end to w_a
                          (`pad_mode`; an `roi_mask` with 0), so the model sees w-sized windows
owner(v)_a = argmin_j |v_a - c_(a,j)|,  c_(a,j) = start_j + (w_a - 1) / 2   (ties: the lower j)
params[b, v] = params of window (owner(v)_1, ..., owner(v)_s) at v
```

Each voxel takes its parameters from the window in which it is most central: per axis, the
window whose centre is nearest, which maximises the voxel's distance to the nearest face of its
window. A window thus contributes the central block between the midpoints of its neighbours'
centres; that block lies at least `floor(o_a / 2)` voxels inside the window on every side that
is not a volume border, so a backbone + head whose receptive-field radius is at most that
margin gives stitched parameters EQUAL to those of one pass over the whole volume (at a volume
border the window's edge is the volume's, and a "same"-padded convolution sees the same
padding in both; an axis padded to its window keeps this only for a pointwise model).

Memory: the parameters of the whole volume `[B, *S, P]` (float32 numpy) plus one batch of
`batch_size` windows through the model.

#### Sampling the stitched distribution

Let `mu~, P~, D~` be the stitched low-rank parameters (voxel `v` from window `owner(v)`). They
define one low-rank normal over the flattened volume,

```none
eta ~ N(mu~, P~ P~^T + diag(D~))                        P~ [prod(S)*C, R]
eta = mu~ + P~ z + sqrt(D~) * eps,   z ~ N(0, I_R) ONE per volume,  eps ~ N(0, I) per voxel
Cov(eta_u, eta_v) = P~_u E[z z^T] P~_v^T + [u = v] D~_v = P~_u P~_v^T + [u = v] D~_v
```

`eta` is linear in the Gaussian `(z, eps)`, so it is Gaussian with exactly that mean and
covariance: a stitched sample drawn this way is an exact sample of the stitched distribution,
and when the stitched parameters equal the one-pass parameters it is the one-pass sample
itself (for the same seed the same `z` and `eps` are drawn, `head.sample_logits` on the whole
volume). A `z_w` per window would instead give
`Cov(eta_u, eta_v) = P~_u E[z_(owner u) z_(owner v)^T] P~_v^T = 0` for voxels of different
windows: a block-diagonal covariance, not the stitched one, whose windows decide an ambiguous
structure independently (seams at the window borders). The columns of `P~` mean the same
latent directions in every window because the head is convolutional (the same weights at
every voxel), as in a one-pass call on a larger image than the training patches.

```none
head                     what is shared by the whole volume        per voxel
LowRankLogits (SSN)      z ~ N(0, I_R)                             eps
HeteroscedasticLogits    nothing (class factors are per voxel)     z_v, eps
CategoricalLogits        (a point mass)                            -
MixtureLowRankLogits     the component k and z                     eps
```

For a mixture head (`tfp_seg.protocols.MixtureHead`) the gate is image-level, computed per
window from the window's mean features; the stitched volume's mixture logits are the
voxel-weighted mean of its windows' gate logits (each voxel counts for its owner window),
written at every voxel, and a sample draws ONE component per volume (then one `z`). A
Probabilistic U-Net has no such per-voxel parameters (its latent comes from a prior net over the
whole input): a `ValueError`.

Samples are drawn `sample_chunk` at a time over `num_samples` (chunk 0 with the batch's seed,
chunk `j > 0` with `fold_seed(split_seed(seed, 53), j)`), into one preallocated output:
memory is the output `[N, B, *S, C]`, the parameters, and one chunk's intermediates. With
`num_samples <= sample_chunk` the samples equal those of `head.sample_logits` on the stitched
parameters with the same seed; with `antithetic=True` every chunk holds its own mirrored pairs.
"""

from __future__ import annotations

import itertools
import math
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import tensorflow as tf

from tfp_seg import _checks, _seeds, protocols
from tfp_seg.models import _spatial, sampling
from tfp_seg.models.prob_unet import ProbabilisticUNet
from tfp_seg.models.segmenter import ProbabilisticSegmenter

__all__ = ["sliding_window_params", "SlidingWindowSampler"]

PAD_MODES = ("constant", "edge", "reflect", "symmetric")
DEFAULT_BATCH_SIZE = 4
DEFAULT_SAMPLE_CHUNK = 8
_CHUNK_SALT = 53

Sizes = Union[int, Sequence[int]]
# One axis of the plan: (window start, owned voxels [lo, hi) in volume coordinates).
_AxisPlan = List[Tuple[int, int, int]]


# --- arguments ---------------------------------------------------------------------------------
def check_model(model) -> ProbabilisticSegmenter:
    """`model` if it is a `ProbabilisticSegmenter` (backbone + distribution head), else a
    `ValueError` that says why (a Probabilistic U-Net, a wrapper, anything else)."""
    if isinstance(model, ProbabilisticUNet):
        raise ValueError(
            "`model` is a ProbabilisticUNet: its latent z comes from a prior net over the whole "
            "input, so windows would each draw a latent of their own and no stitched "
            "distribution exists. Sliding-window inference needs a ProbabilisticSegmenter "
            "(backbone + distribution head, e.g. LowRankLogits)."
        )
    if not isinstance(model, ProbabilisticSegmenter):
        raise ValueError(
            "`model` must be a tfp_seg.models.ProbabilisticSegmenter (backbone + distribution "
            f"head, whose per-voxel parameters can be stitched); got {type(model).__name__}."
        )
    return model


def _sizes(value, name: str, spatial_dims: int, minimum: int) -> Tuple[int, ...]:
    """An int or a sequence of `spatial_dims` ints >= `minimum`, as a tuple per axis."""
    axes = _checks.spatial_axes(spatial_dims)
    what = "positive ints" if minimum == 1 else f"ints >= {minimum}"
    message = (
        f"`{name}` must be an int or a sequence of {spatial_dims} {what} (one per axis "
        f"{axes}); got {value!r}."
    )
    if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
        value = (value,) * spatial_dims
    if isinstance(value, (str, bytes)) or not isinstance(value, (Sequence, np.ndarray)):
        raise ValueError(message)
    value = tuple(value)
    if len(value) != spatial_dims:
        raise ValueError(message)
    return tuple(_checks.positive_int(v, name, minimum, message=message) for v in value)


def check_windows(window, overlap, spatial_dims: int) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
    """`(window, overlap)` per spatial axis: `window` positive, `0 <= overlap < window`
    (default `window // 4`), else a `ValueError` naming the argument."""
    window = _sizes(window, "window", spatial_dims, 1)
    if overlap is None:
        overlap = tuple(w // 4 for w in window)
    overlap = _sizes(overlap, "overlap", spatial_dims, 0)
    if any(o >= w for o, w in zip(overlap, window, strict=True)):
        raise ValueError(
            f"`overlap` must be smaller than `window` on every axis (the stride window - "
            f"overlap must be positive); got overlap={overlap} for window={window}."
        )
    return window, overlap


def _check_pad_mode(pad_mode) -> str:
    if pad_mode not in PAD_MODES:
        raise ValueError(f"`pad_mode` must be one of {PAD_MODES}; got {pad_mode!r}.")
    return pad_mode


# --- the plan ----------------------------------------------------------------------------------
def _axis_plan(size: int, window: int, overlap: int) -> _AxisPlan:
    """`[(start, lo, hi), ...]` along one axis of `size` voxels (padded to `window` if
    shorter): window `j` covers `[start, start + window)` and owns the voxels `[lo, hi)`, those
    nearest its centre (module docstring)."""
    length = max(size, window)
    stride = window - overlap
    count = max(1, math.ceil((length - window) / stride) + 1)
    starts = [min(j * stride, length - window) for j in range(count)]
    # doubled centres 2 c_j = 2 start_j + window - 1; voxel i goes to j iff 4 i <= 2c_j + 2c_(j+1)
    centres = [2 * s + window - 1 for s in starts]
    cuts = [(a + b) // 4 + 1 for a, b in zip(centres, centres[1:], strict=False)]
    bounds = [0] + cuts + [size]
    return [(s, bounds[j], bounds[j + 1]) for j, s in enumerate(starts)]


def _plan(spatial: Sequence[int], window, overlap) -> List[Tuple[Tuple[int, int, int], ...]]:
    """Every window of the volume: a tuple of `(start, lo, hi)` per axis."""
    axes = [_axis_plan(s, w, o) for s, w, o in zip(spatial, window, overlap, strict=True)]
    return list(itertools.product(*axes))


def _pad(array: np.ndarray, spatial: Sequence[int], window, mode: str, **kwargs) -> np.ndarray:
    """`array [B, *S, ...]` padded at the end of every spatial axis shorter than its window."""
    widths = [(0, 0)] + [(0, max(w - s, 0)) for s, w in zip(spatial, window, strict=True)]
    widths += [(0, 0)] * (array.ndim - len(widths))
    if not any(after for _, after in widths):
        return array
    return np.pad(array, widths, mode=mode, **kwargs)


def _as_numpy(x) -> np.ndarray:
    return x.numpy() if isinstance(x, tf.Tensor) else np.asarray(x)


# --- stitched parameters -----------------------------------------------------------------------
def sliding_window_params(
    model,
    volume,
    window: Sizes,
    overlap: Optional[Sizes] = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    pad_mode: str = "constant",
) -> np.ndarray:
    """The head parameters of whole volumes, computed window by window and stitched.

    ```none
    volume [B, *S, M] (or {"images": [B, *S, M], "roi_mask": [B, *S] or [B, *S, 1]})
      -> windows [batch_size, *window, M] -> model -> [batch_size, *window, P]
      -> params [B, *S, P]:  each voxel from the window where it is most central
    ```

    `S = (D, H, W)` for a 3D model, `(H, W)` for a 2D one (the model's `spatial_dims`). See the
    module docstring for the windows, the padding of axes shorter than the window, and when the
    result equals one pass `model(volume)`. A mixture head's gate channels hold the
    voxel-weighted mean of the windows' gate logits at every voxel.

    Args:
      model: a `tfp_seg.models.ProbabilisticSegmenter`.
      volume: images `[B, *S, M]`, or a dict with `"images"` and an optional `"roi_mask"`
        (cut into the same windows, padded with 0).
      window: the window size, an int (every axis) or one int per spatial axis.
      overlap: voxels shared by neighbouring windows, an int or one per axis,
        `0 <= overlap < window`; default `window // 4`.
      batch_size: windows per forward pass (a positive int).
      pad_mode: how an axis shorter than its window is padded (`numpy.pad` mode): "constant"
        (zeros, as a "same" convolution pads), "edge", "reflect" or "symmetric".

    Returns:
      float32 numpy `[B, *S, P]`, `P = model.head.params_size`.
    """
    model = check_model(model)
    window, overlap = check_windows(window, overlap, model.spatial_dims)
    batch_size = _checks.positive_int(batch_size, "batch_size")
    pad_mode = _check_pad_mode(pad_mode)
    images, _ = sampling.split_inputs(volume, "volume")
    _spatial.check_input_rank(sampling._as_array(images).shape, model.spatial_dims, "volume")
    checked = sampling._check_images(volume, model.spatial_dims)
    images, mask = sampling.split_inputs(checked, "volume")
    images = _as_numpy(images)
    spatial = images.shape[1:-1]
    padded = _pad(images, spatial, window, pad_mode)
    if mask is not None:
        mask = _pad(_as_numpy(mask), spatial, window, "constant", constant_values=0)
    head = model.head
    out = np.empty(images.shape[:-1] + (head.params_size,), np.float32)
    tasks = [(b, w) for b in range(images.shape[0]) for w in _plan(spatial, window, overlap)]
    for first in range(0, len(tasks), batch_size):
        chunk = tasks[first : first + batch_size]
        cuts = [
            (b, tuple(slice(s, s + n) for (s, _, _), n in zip(w, window, strict=True)))
            for b, w in chunk
        ]
        x = np.stack([padded[(b,) + cut] for b, cut in cuts])
        if mask is not None:
            x = {"images": x, "roi_mask": np.stack([mask[(b,) + cut] for b, cut in cuts])}
        params = _as_numpy(model(x, training=False))
        for (b, w), p in zip(chunk, params, strict=True):
            owned = tuple(slice(lo, hi) for _, lo, hi in w)
            local = tuple(slice(lo - s, hi - s) for s, lo, hi in w)
            out[(b,) + owned] = p[local]
    if isinstance(head, protocols.MixtureHead):
        for b in range(len(out)):  # in place, one volume at a time
            out[b : b + 1] = _constant_gate(head, out[b : b + 1])
    return out


def _constant_gate(head, params: np.ndarray) -> np.ndarray:
    """Stitched mixture params of one volume with its gate written as the voxel mean."""
    return head.pack_mixture_params(
        head.component_params(params), head.mixture_logits(params)
    ).numpy()


# --- the sampler -------------------------------------------------------------------------------
class SlidingWindowSampler(sampling.Sampler):
    """Samples of whole volumes from sliding-window parameters, ONE `z` per volume.

    A `tfp_seg.models.sampling.Sampler` (so `sample_logits`, `sample`, `probability_samples`,
    `predict_proba`, and `tfp_seg.evaluation.evaluate_annotations`, with their argument
    checks and per-batch seeds) over a `ProbabilisticSegmenter`: every read-out computes the
    stitched parameters of a batch of volumes (`sliding_window_params`) and draws from the
    distribution they define with the head's own samplers, `num_samples` in chunks of
    `sample_chunk`. For the SSN head that is `eta = mu~ + P~ z + sqrt(D~) * eps` with one
    `z ~ N(0, I_R)` per volume shared by all windows and `eps` per voxel: an exact sample of
    the stitched distribution (the module docstring gives the math, and why a `z` per window
    would not be one).

    ```none
    x [B, *S, M] (or {"images", "roi_mask"})   S = (D, H, W) for a 3D model, (H, W) for 2D
    sample_logits [N, B, *S, C], sample [N, B, *S], predict_proba [B, *S, C]
    ```

    Args:
      model: a `tfp_seg.models.ProbabilisticSegmenter` (a Probabilistic U-Net or a wrapper is
        a `ValueError`).
      window, overlap, pad_mode: the windows (see `sliding_window_params`).
      window_batch_size: windows per forward pass (`batch_size` of `sliding_window_params`;
        the read-outs' own `batch_size` counts volumes).
      sample_chunk: samples drawn at once (a positive int; rounded down to an even number,
        at least 2, for antithetic draws).

    #### Examples

    ```python
    model = tfp_seg.models.ProbabilisticSegmenter(
        tfp_seg.models.UNet(base_filters=8, depth=2, spatial_dims=3),
        tfp_seg.layers.LowRankLogits(num_classes=4, rank=10, spatial_dims=3))
    sampler = tfp_seg.models.SlidingWindowSampler(model, window=64, overlap=16)
    maps = sampler.sample(volumes, num_samples=8, batch_size=1)   # [8, B, D, H, W]
    ```
    """

    def __init__(
        self,
        model,
        window: Sizes,
        overlap: Optional[Sizes] = None,
        window_batch_size: int = DEFAULT_BATCH_SIZE,
        sample_chunk: int = DEFAULT_SAMPLE_CHUNK,
        pad_mode: str = "constant",
    ):
        self.model = check_model(model)
        self.window, self.overlap = check_windows(window, overlap, self.model.spatial_dims)
        self.window_batch_size = _checks.positive_int(window_batch_size, "window_batch_size")
        self.sample_chunk = _checks.positive_int(sample_chunk, "sample_chunk")
        self.pad_mode = _check_pad_mode(pad_mode)

    @property
    def head(self):
        """The model's distribution head."""
        return self.model.head

    @property
    def num_classes(self) -> int:
        """C, the number of classes."""
        return self.model.num_classes

    @property
    def spatial_dims(self) -> int:
        """2 or 3: the model's spatial rank (the read-outs check `x` against it)."""
        return self.model.spatial_dims

    @property
    def default_num_samples(self) -> int:
        return self.model.default_num_samples

    def params(self, x) -> np.ndarray:
        """Stitched parameters `[B, *S, P]` of volumes `x` (`sliding_window_params`)."""
        return sliding_window_params(
            self.model,
            x,
            self.window,
            self.overlap,
            batch_size=self.window_batch_size,
            pad_mode=self.pad_mode,
        )

    def distribution(self, x):
        """The stitched distribution over logits: batch `[B]`, event `[*S, C]`."""
        return self.head.distribution(self.params(x))

    # --- Sampler hooks -------------------------------------------------------------------------
    def _chunks(self, num_samples: int, seed, antithetic: bool):
        """`(start, size, seed)` of every chunk of `num_samples` (module docstring)."""
        size = self.sample_chunk
        if antithetic:
            size = max(2, size - size % 2)
        base = None if seed is None else _seeds.split_seed(seed, _CHUNK_SALT)
        for j, start in enumerate(range(0, num_samples, size)):
            chunk_seed = seed if j == 0 or seed is None else _seeds.fold_seed(base, j)
            yield start, min(size, num_samples - start), chunk_seed

    def _draw(self, draw, images, num_samples: int, seed, antithetic: bool) -> np.ndarray:
        """`draw(params, n, seed, antithetic)` chunk by chunk into one `[N, ...]` array."""
        params = tf.constant(self.params(images))
        out = None
        for start, n, chunk_seed in self._chunks(num_samples, seed, antithetic):
            part = _as_numpy(draw(params, n, seed=chunk_seed, antithetic=antithetic))
            if out is None:
                out = np.empty((num_samples,) + part.shape[1:], part.dtype)
            out[start : start + n] = part
        return out

    def _sample_logits_tensor(self, images, num_samples: int, seed=None, antithetic=False):
        return self._draw(self.head.sample_logits, images, num_samples, seed, antithetic)

    def _sample_labels_tensor(self, images, num_samples: int, seed=None, antithetic=False):
        return self._draw(self.head.sample_labels, images, num_samples, seed, antithetic)

    def _mean_probabilities(self, images, num_samples: int, seed=None) -> np.ndarray:
        # The head's own estimator per chunk (antithetic pairs when it has them), weighted by
        # the chunk sizes: one chunk is exactly `head.mean_probabilities(params, N, seed)`.
        params = tf.constant(self.params(images))
        _, antithetic = self.head.mean_sampling(num_samples)
        total = None
        for _, n, chunk_seed in self._chunks(num_samples, seed, antithetic):
            part = _as_numpy(self.head.mean_probabilities(params, n, seed=chunk_seed)) * n
            total = part if total is None else total + part
        return total / num_samples
