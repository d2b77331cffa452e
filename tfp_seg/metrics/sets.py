"""Set metrics between sampled and reference label maps: the IoU distance, the generalized
energy distance, sample diversity and Hungarian-matched IoU.

Set metrics take one image as `samples [N, *S]`, `references [K, *S]`, or a batch as
`[B, N, *S]` / `[B, K, *S]` and average over `B`, with `S = (H, W)` (images, the default
`spatial_dims=2`) or `S = (D, H, W)` (volumes, `spatial_dims=3`). The rank of a set does not
tell a batch of images `[B, N, H, W]` from one volume `[N, D, H, W]`, so the set functions take
`spatial_dims` explicitly; `iou_distance` and `pairwise_iou_distance` compare maps of any
shape (`[*S]`, `[N, *S]`) and need none. A voxel counts as a pixel in every formula below.

The set distance is `d(a, b) = 1 - IoU` over the foreground classes `1..C-1`, averaged over
the classes present in `a` or `b`; two masks without any foreground have `d = 0` (Kohl et al.,
2018; Monteiro et al., 2020).

Unlabelled pixels (`ignore_label`, `mask`): every function takes an optional `ignore_label` (an
int outside the class range `[0, C)`, e.g. 255) and an optional boolean `mask` of valid pixels.
They define ONE set of valid pixels per image, shared by every map of the image and every pair
of maps compared (sample-reference, sample-sample, reference-reference):

```none
valid(p) = mask(p)  and  no map of the image (sample or reference) has label ignore_label at p
```

Every distance of the image is then the IoU distance of the maps restricted to their valid
pixels (the conventions above apply there: a class is averaged if it occurs in a valid pixel of
either map). A model's samples hold labels in `[0, C)`, so in practice the ignored pixels are
those an annotator left unlabelled; to restrict the samples' own diversity to the annotators'
valid region, pass it as `mask`. One region for all pairs keeps `D_GED^2` a comparison of two
distributions of label maps on the same pixels, and identical sets at distance 0. This is what
the Probabilistic U-Net's Cityscapes evaluation does (one ignore mask per image, from the
ground truth's void pixels, applied to all three distance matrices of the energy distance).
An image without any valid pixel is an error.
"""

from __future__ import annotations

import math
from typing import Literal, Optional, Union, overload

import numpy as np
import scipy.optimize

from tfp_seg import _checks
from tfp_seg.metrics import _common
from tfp_seg.metrics._common import ArrayLike
from tfp_seg.metrics._set_inputs import (
    check_ignore,
    check_label_sets,
    check_set_rank,
    check_set_weights,
    restrict,
    set_forms,
    valid_pixels,
)

__all__ = [
    "diversity",
    "generalized_energy_distance",
    "hungarian_matched_iou",
    "iou_distance",
    "pairwise_iou_distance",
]


# ================================================================================================
# IoU distance
# ================================================================================================


def _pairwise_distance(x: np.ndarray, y: np.ndarray, num_classes: int) -> np.ndarray:
    """`1 - IoU` between every row of x [N,P] and y [K,P] (validated int arrays) -> [N,K]."""
    n, k = x.shape[0], y.shape[0]
    # Counts are exact in float32 below 2**24 pixels; BLAS then gives exact integer sums.
    dtype = np.float32 if x.shape[1] < 2**24 else np.float64
    iou_sum = np.zeros((n, k))
    present = np.zeros((n, k))
    for c in range(1, num_classes):  # loop over classes only; every pair at once per class
        xc = (x == c).astype(dtype)
        yc = xc if y is x else (y == c).astype(dtype)  # within one set: one indicator
        inter = (xc @ yc.T).astype(np.float64)
        union = xc.sum(axis=1, dtype=np.float64)[:, None] + yc.sum(axis=1, dtype=np.float64)
        union = union - inter
        has = union > 0
        iou_sum += np.where(has, inter / np.where(has, union, 1.0), 0.0)
        present += has
    return np.where(present > 0, 1.0 - iou_sum / np.maximum(present, 1.0), 0.0)


def iou_distance(
    a: ArrayLike,
    b: ArrayLike,
    num_classes: int,
    ignore_label: Optional[int] = None,
    mask: Optional[ArrayLike] = None,
) -> float:
    """IoU distance `1 - IoU` between two label maps, over the foreground classes.

    Args:
      a: Integer label map `[*S]`: `[H, W]`, `[D, H, W]` (any non-empty shape is accepted).
      b: Integer label map of the same shape as `a`.
      num_classes: Number of classes `C` (labels in `[0, C)`; class 0 is background).
      ignore_label: Optional label of unlabelled pixels, outside `[0, C)` (e.g. 255): a pixel
        where `a` or `b` has it is left out (see the module docstring).
      mask: Optional boolean map of valid pixels, the shape of `a`.

    Returns:
      The distance as a Python float in `[0, 1]`.

    #### Mathematical Details

    Over the valid pixels `V` (all pixels without `ignore_label` and `mask`):

    ```none
    IoU_c(a, b) = |{a = c} ∩ {b = c} ∩ V| / |({a = c} ∪ {b = c}) ∩ V|
    P(a, b)     = {c in 1..C-1 : c occurs in a or in b (in V)}
    d(a, b)     = 1 - (1 / |P|) sum_{c in P} IoU_c(a, b)      if P is not empty
                = 0                                          if neither map has foreground
    ```

    #### References

    [1]: Simon Kohl et al. A Probabilistic U-Net for Segmentation of Ambiguous Images.
         NeurIPS 2018. https://arxiv.org/abs/1806.05034
    """
    num_classes = _checks.positive_int(num_classes, "num_classes")
    ignore_label = check_ignore(ignore_label, num_classes)
    a_arr = _common.check_int_labels(a, "a", num_classes, "[*S] label map", ignore_label)
    b_arr = _common.check_int_labels(b, "b", num_classes, "[*S] label map", ignore_label)
    if a_arr.ndim < 1:
        raise ValueError(
            f"`a` must be a label map of rank >= 1 ([*S]); got {_common.describe(a_arr)}."
        )
    if a_arr.shape != b_arr.shape:
        raise ValueError(
            f"`a` and `b` must have the same shape; got a {_common.describe(a_arr)} and "
            f"b {_common.describe(b_arr)}."
        )
    x, y = a_arr.reshape(1, 1, -1), b_arr.reshape(1, 1, -1)
    keep = valid_pixels((a_arr[None, None], b_arr[None, None]), ignore_label, mask, False)
    x, y = restrict(x, keep, 0), restrict(y, keep, 0)
    return float(_pairwise_distance(x, y, num_classes)[0, 0])


def pairwise_iou_distance(
    x: ArrayLike,
    y: ArrayLike,
    num_classes: int,
    ignore_label: Optional[int] = None,
    mask: Optional[ArrayLike] = None,
) -> np.ndarray:
    """Matrix of IoU distances between two sets of label maps.

    Vectorised over pairs: for every foreground class the intersections of all pairs come from
    one matrix product of the class indicator maps.

    Args:
      x: Integer label maps `[N, *S]` (any spatial rank >= 1: `[N, H, W]`, `[N, D, H, W]`).
      y: Integer label maps `[K, *S]` (same spatial shape as `x`).
      num_classes: Number of classes `C`.
      ignore_label: Optional label of unlabelled pixels, outside `[0, C)`: a pixel where any
        map of `x` or `y` has it is left out of every entry (one valid region for all pairs).
      mask: Optional boolean map of valid pixels `[*S]`, shared by all pairs.

    Returns:
      float64 array `[N, K]` with entry `(n, k) = d(x[n], y[k])` (see `iou_distance`), over
      the valid pixels.

    #### Mathematical Details

    ```none
    X_c[n, p] = 1{x[n, p] = c},  Y_c[k, p] = 1{y[k, p] = c}
    I_c = X_c Y_c^T,  U_c[n, k] = |X_c[n]| + |Y_c[k]| - I_c[n, k]
    D[n, k] = 1 - mean_{c : U_c[n, k] > 0} I_c[n, k] / U_c[n, k]     (0 if no such c)
    ```
    """
    num_classes = _checks.positive_int(num_classes, "num_classes")
    ignore_label = check_ignore(ignore_label, num_classes)
    x_arr = _common.check_int_labels(x, "x", num_classes, "[N,*S]", ignore_label)
    y_arr = _common.check_int_labels(y, "y", num_classes, "[K,*S]", ignore_label)
    for name, arr, form in (("x", x_arr, "[N,*S]"), ("y", y_arr, "[K,*S]")):
        if arr.ndim < 2:
            raise ValueError(
                f"`{name}` must be a stack of label maps of rank >= 2 ({form}); "
                f"got {_common.describe(arr)}."
            )
    if x_arr.shape[1:] != y_arr.shape[1:]:
        raise ValueError(
            f"`x` and `y` must have the same spatial shape; got x {_common.describe(x_arr)} and "
            f"y {_common.describe(y_arr)}."
        )
    keep = valid_pixels((x_arr[None], y_arr[None]), ignore_label, mask, False)
    xs = restrict(x_arr.reshape(1, x_arr.shape[0], -1), keep, 0)
    ys = restrict(y_arr.reshape(1, y_arr.shape[0], -1), keep, 0)
    return _pairwise_distance(xs, ys, num_classes)


# ================================================================================================
# Set metrics: GED, diversity, Hungarian-matched IoU
# ================================================================================================


@overload
def generalized_energy_distance(
    samples: ArrayLike,
    references: ArrayLike,
    num_classes: int,
    reference_weights: Optional[ArrayLike] = None,
    sample_weights: Optional[ArrayLike] = None,
    return_terms: Literal[False] = False,
    ignore_label: Optional[int] = None,
    mask: Optional[ArrayLike] = None,
    spatial_dims: int = 2,
) -> float: ...


@overload
def generalized_energy_distance(
    samples: ArrayLike,
    references: ArrayLike,
    num_classes: int,
    reference_weights: Optional[ArrayLike] = None,
    sample_weights: Optional[ArrayLike] = None,
    *,
    return_terms: Literal[True],
    ignore_label: Optional[int] = None,
    mask: Optional[ArrayLike] = None,
    spatial_dims: int = 2,
) -> dict[str, float]: ...


@overload
def generalized_energy_distance(
    samples: ArrayLike,
    references: ArrayLike,
    num_classes: int,
    reference_weights: Optional[ArrayLike] = None,
    sample_weights: Optional[ArrayLike] = None,
    return_terms: bool = False,
    ignore_label: Optional[int] = None,
    mask: Optional[ArrayLike] = None,
    spatial_dims: int = 2,
) -> Union[float, dict[str, float]]: ...


def generalized_energy_distance(
    samples: ArrayLike,
    references: ArrayLike,
    num_classes: int,
    reference_weights: Optional[ArrayLike] = None,
    sample_weights: Optional[ArrayLike] = None,
    return_terms: bool = False,
    ignore_label: Optional[int] = None,
    mask: Optional[ArrayLike] = None,
    spatial_dims: int = 2,
) -> Union[float, dict[str, float]]:
    """Squared generalized energy distance `D_GED^2` between sampled and reference label maps.

    Args:
      samples: Integer label maps drawn from the model, `[N, *S]` for one image or
        `[B, N, *S]` for a batch (`S = (H, W)`, or `(D, H, W)` with `spatial_dims=3`).
      references: Integer reference annotations, `[K, *S]` or `[B, K, *S]` (same rank, batch
        size and spatial shape as `samples`).
      num_classes: Number of classes `C`.
      reference_weights: Optional probabilities of the references, `[K]` (shared over the batch)
        or `[B, K]`; non-negative, summing to 1. With weights the reference side is an exact
        discrete distribution (e.g. the enumerated annotation modes of
        `tfp_seg.data.ambiguous_shapes`), and its expectations are weighted. Default: uniform.
      sample_weights: Optional weights of the samples, `[N]` or `[B, N]`, same rules.
      return_terms: If True return a dict with the three terms as well.
      ignore_label: Optional label of unlabelled pixels, outside `[0, C)` (e.g. 255): a pixel
        where any map of the image (in practice, any reference) has it is left out of all
        three terms (see the module docstring).
      mask: Optional boolean valid pixels, `[*S]` (shared by the batch) or `[B, *S]`.
      spatial_dims: 2 (images, `S = (H, W)`) or 3 (volumes, `S = (D, H, W)`): the rank of
        `S`, which tells one image `[N, *S]` from a batch `[B, N, *S]` (a rank-4 input is a
        batch of images or one volume; it is never guessed).

    Returns:
      `D_GED^2` averaged over the batch as a float, or (if `return_terms`) a dict
      `{"ged", "cross", "sample_diversity", "reference_diversity"}` of batch-averaged floats,
      where `cross = E[d(S,Y)]`, `sample_diversity = E[d(S,S')]`,
      `reference_diversity = E[d(Y,Y')]`.

    #### Mathematical Details

    With `d(a, b) = 1 - IoU(a, b)` (see `iou_distance`), weights `u` over the `N` samples
    (uniform `1/N` by default) and `w` over the `K` references (uniform `1/K` by default):

    ```none
    D_GED^2 = 2 E[d(S, Y)] - E[d(S, S')] - E[d(Y, Y')]
    E[d(S, Y)]  = u^T D_SY w          D_SY[n, k] = d(s_n, y_k)
    E[d(S, S')] = u^T D_SS u          (all N^2 pairs, including n = n')
    E[d(Y, Y')] = w^T D_YY w          (all K^2 pairs, including k = k')
    ```

    All pairs including identical indices are averaged (a V-statistic), so identical sample and
    reference sets give exactly 0. The result is not clipped; because `d` is not guaranteed to be
    of negative type, it can in principle be slightly negative.

    As an estimator of the `D_GED^2` between the *distributions* the sets are drawn from, the
    V-statistic is biased: for `N` i.i.d. samples `E[u^T D_SS u] = (N - 1) / N E[d(S, S')]`
    (the `N` self-pairs have `d = 0`), so even a perfect sampler scores `E[d(S, S')] / N` on
    average. `tfp_seg.evaluation.evaluate_ambiguous`, whose reference side is exact, uses the
    unbiased U-statistic over pairs of distinct samples instead; against raters
    (`tfp_seg.evaluation.evaluate_annotations`) this V-statistic is reported, as in the
    published LIDC tables (Kohl et al., 2018; Baumgartner et al., 2019; Monteiro et al., 2020).

    #### Examples

    ```python
    s = np.array([[[1, 0]], [[1, 1]]])      # N=2 samples of a 1x2 image
    y = np.array([[[1, 0]]])                # K=1 reference
    generalized_energy_distance(s, y, num_classes=2)
    # ==> 0.25   (= 2 * 0.25 - 0.25 - 0)
    ```

    #### References

    [1]: Simon Kohl et al. A Probabilistic U-Net for Segmentation of Ambiguous Images.
         NeurIPS 2018. https://arxiv.org/abs/1806.05034
    [2]: Gábor Székely and Maria Rizzo. Energy statistics: A class of statistics based on
         distances. Journal of Statistical Planning and Inference, 2013.
    [3]: Miguel Monteiro et al. Stochastic Segmentation Networks: Modelling Spatially Correlated
         Aleatoric Uncertainty. NeurIPS 2020. https://arxiv.org/abs/2006.06015
    """
    num_classes = _checks.positive_int(num_classes, "num_classes")
    s, r, batched, keep = check_label_sets(
        samples, references, num_classes, ignore_label, mask, spatial_dims
    )
    batch = s.shape[0]
    w_ref = check_set_weights(reference_weights, "reference_weights", batch, r.shape[1], batched)
    w_smp = check_set_weights(sample_weights, "sample_weights", batch, s.shape[1], batched)
    cross = np.empty(batch)
    sample_div = np.empty(batch)
    reference_div = np.empty(batch)
    for i in range(batch):
        u, w = w_smp[i], w_ref[i]
        si, ri = restrict(s, keep, i), restrict(r, keep, i)
        cross[i] = u @ _pairwise_distance(si, ri, num_classes) @ w
        sample_div[i] = u @ _pairwise_distance(si, si, num_classes) @ u
        reference_div[i] = w @ _pairwise_distance(ri, ri, num_classes) @ w
    ged = 2.0 * cross - sample_div - reference_div
    if not return_terms:
        return float(ged.mean())
    return {
        "ged": float(ged.mean()),
        "cross": float(cross.mean()),
        "sample_diversity": float(sample_div.mean()),
        "reference_diversity": float(reference_div.mean()),
    }


def diversity(
    samples: ArrayLike,
    num_classes: int,
    ignore_label: Optional[int] = None,
    mask: Optional[ArrayLike] = None,
    spatial_dims: int = 2,
) -> float:
    """Mean pairwise IoU distance `E[d(S, S')]` within a set of label maps.

    Args:
      samples: Integer label maps, `[N, *S]` for one image or `[B, N, *S]` for a batch.
      num_classes: Number of classes `C`.
      ignore_label: Optional label of unlabelled pixels, outside `[0, C)`: a pixel where any
        map of the image's set has it is left out of every pair (for the diversity of a set
        of annotations, e.g. `reference_diversity`).
      mask: Optional boolean valid pixels, `[*S]` or `[B, *S]`: e.g. the annotators'
        valid region, to measure a model's sample diversity where the references are defined.
      spatial_dims: 2 (`S = (H, W)`) or 3 (`S = (D, H, W)`), as in
        `generalized_energy_distance`.

    Returns:
      The sample diversity (the `E[d(S,S')]` term of `generalized_energy_distance`), averaged
      over the batch, as a float.

    #### Mathematical Details

    ```none
    diversity = (1 / N^2) sum_{n, n'} d(s_n, s_n')     (all pairs, including n = n')
    ```

    This V-statistic describes the set itself. For `N` i.i.d. samples of a distribution its
    expectation is `(N - 1) / N E[d(S, S')]`; `N / (N - 1)` times it is the unbiased
    U-statistic (mean over pairs `n != n'`), which `tfp_seg.evaluation.evaluate_ambiguous`
    reports as `diversity`.
    """
    num_classes = _checks.positive_int(num_classes, "num_classes")
    spatial_dims = _checks.check_spatial_dims(spatial_dims)
    ignore_label = check_ignore(ignore_label, num_classes)
    forms = " or ".join(set_forms(spatial_dims, "N"))
    s = _common.check_int_labels(samples, "samples", num_classes, forms, ignore_label)
    batched = check_set_rank(s, "samples", "N", spatial_dims)
    if not batched:
        s = s[None]
    keep = valid_pixels((s,), ignore_label, mask, batched)
    s = s.reshape(s.shape[0], s.shape[1], -1)
    return float(
        np.mean(
            [
                _pairwise_distance(x, x, num_classes).mean()
                for x in (restrict(s, keep, i) for i in range(s.shape[0]))
            ]
        )
    )


def hungarian_matched_iou(
    samples: ArrayLike,
    references: ArrayLike,
    num_classes: int,
    ignore_label: Optional[int] = None,
    mask: Optional[ArrayLike] = None,
    spatial_dims: int = 2,
) -> float:
    """Mean IoU of an optimal one-to-one matching between samples and references.

    Args:
      samples: Integer label maps, `[N, *S]` or `[B, N, *S]`.
      references: Integer label maps, `[K, *S]` or `[B, K, *S]`.
      num_classes: Number of classes `C`.
      ignore_label: Optional label of unlabelled pixels, outside `[0, C)`: a pixel where any
        map of the image (in practice, any reference) has it is left out of every IoU.
      mask: Optional boolean valid pixels, `[*S]` (shared by the batch) or `[B, *S]`.
      spatial_dims: 2 (`S = (H, W)`) or 3 (`S = (D, H, W)`), as in
        `generalized_energy_distance`.

    Returns:
      The Hungarian-matched IoU averaged over the batch, a float in `[0, 1]`.

    #### Mathematical Details

    Both sets are replicated to the common size `L = lcm(N, K)` (each sample `L / N` times,
    each reference `L / K` times). When one size divides the other this is the usual "replicate
    the smaller set to the size of the larger" (e.g. 16 samples vs 4 raters: each rater 4
    times); unlike cyclic tiling to `max(N, K)`, it does not depend on the order of the sets
    when neither divides the other, and equals optimal transport between the two uniform
    empirical distributions. With `IoU = 1 - d` (two masks with no foreground have IoU 1):

    ```none
    pi*  = argmin_{permutation pi} sum_i d(s_i, y_pi(i))      (scipy linear_sum_assignment)
    HM-IoU = (1 / L) sum_i (1 - d(s_i, y_pi*(i)))
    ```

    #### References

    [1]: Simon Kohl et al. A Hierarchical Probabilistic U-Net for Modeling Multi-Scale
         Ambiguities. 2019. https://arxiv.org/abs/1905.13077
    [2]: Miguel Monteiro et al. Stochastic Segmentation Networks. NeurIPS 2020.
    """
    num_classes = _checks.positive_int(num_classes, "num_classes")
    s, r, _, keep = check_label_sets(
        samples, references, num_classes, ignore_label, mask, spatial_dims
    )
    n, k = s.shape[1], r.shape[1]
    size = math.lcm(n, k)
    rows = np.repeat(np.arange(n), size // n)
    cols = np.repeat(np.arange(k), size // k)
    scores = []
    for i in range(s.shape[0]):
        cost = _pairwise_distance(restrict(s, keep, i), restrict(r, keep, i), num_classes)
        cost = cost[np.ix_(rows, cols)]
        row_idx, col_idx = scipy.optimize.linear_sum_assignment(cost)
        scores.append(np.mean(1.0 - cost[row_idx, col_idx]))
    return float(np.mean(scores))
