"""Conformal calibration of segmentation outputs: distribution-free, finite-sample guarantees on
held-out (calibration) images.

- `ConformalRiskControl` (Angelopoulos et al., 2022): a threshold on the per-pixel foreground
  probability whose masks miss, in expectation over a new image, at most a fraction `alpha` of
  its foreground (false-negative rate).
- `ConformalPredictionSets` (split conformal prediction): per-pixel class sets that contain the
  true class with probability at least `1 - alpha`, with the LAC score (Sadinle et al., 2019)
  or the APS score (Romano et al., 2020).

Both assume the calibration images and the new image are exchangeable (e.g. drawn i.i.d. from
the same distribution); nothing is assumed about the model. The unit of exchangeability is the
image: pixels of one image are not exchangeable with pixels of another (they share the image's
content and the model's errors on it), so `ConformalRiskControl` scores whole images and
`ConformalPredictionSets` calibrates on one random pixel per image by default.

Images and volumes alike (`S = (H, W)` or `(D, H, W)`): each of the `N` items of `[N, *S]`
is an image or a volume, the unit of exchangeability, and nothing depends on the rank of `S`
(the pixels / voxels of an item are flattened). `ConformalRiskControl` tells foreground
probabilities `[N, *S]` from class probabilities `[N, *S, C]` by the rank of its companion
`labels [N, *S]`.

NumPy in, NumPy out (float64 arithmetic); inputs are checked early with errors that name the
argument. Plain Python objects (not Keras layers): `get_config` / `from_config` give a JSON-able
round trip that keeps the fitted threshold / quantile.

#### References

[1]: Anastasios Angelopoulos, Stephen Bates, Adam Fisch, Lihua Lei and Tal Schuster. Conformal
     Risk Control. ICLR 2024. https://arxiv.org/abs/2208.02814
[2]: Mauricio Sadinle, Jing Lei and Larry Wasserman. Least Ambiguous Set-Valued Classifiers With
     Bounded Error Levels. JASA, 2019.
[3]: Yaniv Romano, Matteo Sesia and Emmanuel Candes. Classification with Valid and Adaptive
     Coverage. NeurIPS 2020. https://arxiv.org/abs/2006.02544
[4]: Vladimir Vovk, Alexander Gammerman and Glenn Shafer. Algorithmic Learning in a Random
     World. Springer, 2005.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np

from tfp_seg import _checks

__all__ = ["ConformalPredictionSets", "ConformalRiskControl"]

_METHODS = ("lac", "aps")
# Slack of the float comparisons of k = ceil(...) and of the risk bound: (n + 1)(1 - alpha)
# computed in floats may exceed an integer by a few ulps (e.g. 100 * 0.9 = 90.00000000000001).
_SLACK = 1e-9


def _check_alpha(alpha: Any) -> float:
    real = isinstance(alpha, (int, float, np.integer, np.floating)) and not isinstance(
        alpha, (bool, np.bool_)
    )
    if not real or not 0.0 < float(alpha) < 1.0:
        raise ValueError(f"`alpha` must be a float in (0, 1); got {alpha!r}.")
    return float(alpha)


def _describe(x: np.ndarray) -> str:
    return f"shape {tuple(x.shape)}, dtype {x.dtype}"


def _float_array(x: Any, name: str, form: str) -> np.ndarray:
    arr = np.asarray(x)
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(
            f"`{name}` must be a floating-point probability array ({form}); got {_describe(arr)}."
        )
    if arr.size == 0:
        raise ValueError(f"`{name}` must not be empty ({form}); got {_describe(arr)}.")
    out = arr.astype(np.float64)
    if not np.all(np.isfinite(out)):
        raise ValueError(f"`{name}` contains NaN or Inf values ({_describe(arr)}).")
    if out.min() < 0.0 or out.max() > 1.0 + 1e-6:
        raise ValueError(
            f"`{name}` must hold probabilities in [0, 1] ({form}); got values in "
            f"[{out.min():.4g}, {out.max():.4g}] ({_describe(arr)})."
        )
    return np.clip(out, 0.0, 1.0)


def _label_array(x: Any, shape: tuple, form: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.shape != shape:
        raise ValueError(f"`labels` must have shape {shape} ({form}); got {_describe(arr)}.")
    if not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_):
        raise ValueError(
            f"`labels` must hold integer (or boolean) labels ({form}); got {_describe(arr)}."
        )
    return arr.astype(np.int64)


def _check_seed(seed: Any) -> Optional[int]:
    if seed is None:
        return None
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"`seed` must be None or an int; got {seed!r}.")
    return int(seed)


# ================================================================================================
# Conformal risk control of the false-negative rate
# ================================================================================================


class ConformalRiskControl:
    """A threshold on the foreground probability with a bounded expected false-negative rate.

    The mask of a threshold `lambda` is `{p >= lambda}`; its loss on image `i` is the fraction
    of the image's foreground pixels that it misses (0 for an image without foreground):

    ```none
    L_i(lambda) = |{j in F_i : p_ij < lambda}| / |F_i|,   F_i = foreground pixels of image i
    R_n(lambda) = (1 / n) sum_{i=1..n} L_i(lambda)        on n calibration images
    lambda_hat  = max { lambda in [0, 1] : n / (n + 1) R_n(lambda) + B / (n + 1) <= alpha },  B = 1
    ```

    `L_i` lies in `[0, B]` with `B = 1` and does not decrease as `lambda` grows (a higher
    threshold keeps a subset of the mask), and `L_i(0) = 0` (the mask of everything). So by
    Angelopoulos et al. (2022, Theorem 1), for a new image exchangeable with the calibration
    images,

    ```none
    E[ L_{n+1}(lambda_hat) ] <= alpha
    ```

    the expectation being over the calibration images and the new one. `R_n` only changes at
    the calibration foreground probabilities, so `lambda_hat` is the largest of those values
    (or 1) that satisfies the bound. If no threshold does (only when `1 / (n + 1) > alpha`,
    i.e. `n < 1 / alpha - 1` images), `lambda_hat = 0`: the mask of everything, whose loss is 0.

    Images, not pixels, are the exchangeable units: the bound is on the expected per-image
    false-negative rate of a new image, and the pixels of one image enter only through its
    loss `L_i`.

    Args:
      alpha: The risk level, a float in `(0, 1)`.
      threshold: A calibrated threshold to restore (`from_config`); None until `fit`.

    #### Examples

    ```python
    fg = 1.0 - model.predict_proba(val_images)[..., 0]          # P(foreground) [N, H, W]
    crc = tfp_seg.calibration.ConformalRiskControl(alpha=0.1).fit(fg, val_labels)
    crc.threshold                                               # ==> e.g. 0.23
    masks = crc(1.0 - model.predict_proba(test_images)[..., 0])  # bool [N, H, W]
    ```
    """

    def __init__(self, alpha: float = 0.1, threshold: Optional[float] = None):
        self.alpha = _check_alpha(alpha)
        if threshold is not None:
            real = isinstance(threshold, (int, float, np.integer, np.floating)) and not isinstance(
                threshold, (bool, np.bool_)
            )
            if not real or not 0.0 <= float(threshold) <= 1.0:
                raise ValueError(
                    f"`threshold` must be None or a float in [0, 1]; got {threshold!r}."
                )
            threshold = float(threshold)
        self._threshold: Optional[float] = threshold
        self.num_calibration: Optional[int] = None
        self.calibration_risk: Optional[float] = None

    @property
    def fitted(self) -> bool:
        """Whether `fit` has run (the threshold is known)."""
        return self._threshold is not None

    @property
    def threshold(self) -> float:
        """The calibrated threshold `lambda_hat` (masks are `probabilities >= threshold`)."""
        if self._threshold is None:
            raise ValueError("ConformalRiskControl is not fitted: call `fit` first.")
        return self._threshold

    @staticmethod
    def _inputs(probabilities, labels, ignore_label) -> tuple[np.ndarray, np.ndarray]:
        """(foreground probabilities [N, X], foreground masks [N, X])."""
        p_arr = np.asarray(probabilities)
        lab = np.asarray(labels)
        form = "[N, *S] foreground probabilities, or [N, *S, C] class probabilities"
        p = _float_array(p_arr, "probabilities", form)
        if p.ndim == lab.ndim + 1 and p.ndim >= 2:
            p = 1.0 - p[..., 0]  # class probabilities: P(foreground) = 1 - P(class 0)
        if p.ndim < 1:
            raise ValueError(f"`probabilities` must have shape {form}; got {_describe(p_arr)}.")
        y = _label_array(lab, p.shape, "[N, *S]: foreground where labels != 0")
        ignore_label = _checks.check_ignore_label(ignore_label)
        foreground = y != 0
        if ignore_label is not None:
            foreground &= y != ignore_label
        n = p.shape[0]
        return p.reshape(n, -1), foreground.reshape(n, -1)

    def fit(
        self, probabilities, labels, ignore_label: Optional[int] = None
    ) -> "ConformalRiskControl":
        """Calibrate `threshold` on held-out images.

        Args:
          probabilities: Foreground probabilities `[N, *S]` of `N` calibration images (or
            volumes), or class probabilities `[N, *S, C]` (then `P(foreground) = 1 -
            p[..., 0]`): class probabilities are those with one axis more than `labels`.
          labels: Integer (or boolean) label maps `[N, *S]`; foreground = `labels != 0`.
          ignore_label: Label value of pixels that are neither foreground nor background.

        Returns:
          self, with `threshold`, `num_calibration` (`n`) and `calibration_risk`
          (`R_n(threshold)`) set.
        """
        p, fg = self._inputs(probabilities, labels, ignore_label)
        n = p.shape[0]
        counts = fg.sum(axis=1)
        # Each foreground pixel of image i weighs 1 / (n |F_i|) in R_n: R_n(lambda) is the sum of
        # the weights of the foreground probabilities below lambda.
        rows, cols = np.nonzero(fg)
        values = p[rows, cols]
        weights = 1.0 / (n * counts[rows])
        order = np.argsort(values, kind="stable")
        values, weights = values[order], weights[order]
        candidates = np.unique(np.r_[values, 1.0])
        below = np.r_[0.0, np.cumsum(weights)]
        risk = below[np.searchsorted(values, candidates, side="left")]  # R_n at each candidate
        ok = n / (n + 1.0) * risk + 1.0 / (n + 1.0) <= self.alpha + _SLACK
        self._threshold = float(candidates[ok].max()) if ok.any() else 0.0
        self.num_calibration = int(n)
        self.calibration_risk = float(self.risk(p, fg.astype(np.int64)).mean())
        return self

    def __call__(self, probabilities) -> np.ndarray:
        """Boolean masks `probabilities >= threshold` (the shape of `probabilities`; for class
        probabilities `[..., C]`, pass `1 - probs[..., 0]`)."""
        p = _float_array(probabilities, "probabilities", "[N, *S] foreground probabilities")
        return p >= self.threshold

    def risk(self, probabilities, labels, ignore_label: Optional[int] = None) -> np.ndarray:
        """Per-image false-negative rates `L_i(threshold)` `[N]` of the calibrated masks (inputs
        as in `fit`); 0 for images without foreground."""
        p, fg = self._inputs(probabilities, labels, ignore_label)
        missed = (fg & (p < self.threshold)).sum(axis=1)
        counts = fg.sum(axis=1)
        return np.where(counts > 0, missed / np.maximum(counts, 1), 0.0)

    def get_config(self) -> dict:
        return {"alpha": self.alpha, "threshold": self._threshold}

    @classmethod
    def from_config(cls, config: dict) -> "ConformalRiskControl":
        return cls(**config)

    def __repr__(self):
        t = "unfitted" if self._threshold is None else f"threshold={self._threshold:.4g}"
        return f"ConformalRiskControl(alpha={self.alpha:.4g}, {t})"


# ================================================================================================
# Conformal prediction sets (LAC, APS)
# ================================================================================================


class ConformalPredictionSets:
    """Pixel-wise conformal class sets with marginal coverage `>= 1 - alpha`.

    A non-conformity score `s(p, y)` of class `y` under predicted probabilities `p` is computed
    for `n` calibration items; the set of a new item holds every class whose score is at most
    the finite-sample quantile of the calibration scores:

    ```none
    LAC:  s(p, y) = 1 - p_y                                          (Sadinle et al., 2019)
    APS:  s(p, y) = sum_{c : p_c > p_y} p_c + U p_y,  U ~ U(0, 1)      (randomized=True)
                  = sum_{c : p_c > p_y} p_c + p_y                      (randomized=False)
    q_hat = s_(k),  k = ceil((n + 1)(1 - alpha))   (the k-th smallest score: the
            ceil((n + 1)(1 - alpha)) / n empirical quantile; +inf if k > n: every class)
    set(p) = {y : s(p, y) <= q_hat}
    ```

    For a new item exchangeable with the calibration items, `P(y in set(p)) >= 1 - alpha`
    (Vovk et al., 2005), and `<= 1 - alpha + 1 / (n + 1)` when the scores have no ties (LAC with
    continuous probabilities, randomized APS). LAC gives the smallest sets on average; APS
    adapts the set size to the item's uncertainty (sets are the top classes whose cumulative
    probability reaches `q_hat`). `randomized` only concerns APS: one `U` per item, drawn anew
    at every `fit` / call (use `seed` for reproducible sets). Sets may be empty.

    **Exchangeability of pixels.** With probabilities `[n, C]` the `n` items are taken to be
    exchangeable. Pixels of one image are not (they share its content and the model's errors on
    it), so for images `[N, *S, C]` the calibration uses `pixels_per_image` pixels drawn
    uniformly at random from the valid pixels of each image (default 1). With one pixel per
    image the calibration scores and a uniformly drawn pixel of a new exchangeable image are
    exchangeable, so the guarantee holds exactly for a random pixel of a new image: the expected
    fraction of a new image's pixels whose class is in their set is `>= 1 - alpha`. More pixels
    per image (`pixels_per_image=k`, or None for all) give a less noisy quantile but only an
    approximate guarantee (exact as the number of images grows).

    Args:
      alpha: Miscoverage level, a float in `(0, 1)`.
      method: `"lac"` or `"aps"`.
      randomized: APS with the uniform tie-break `U` (default True); ignored by LAC.
      pixels_per_image: Calibration pixels drawn per image for `[N, *S, C]` inputs (an int
        >= 1, default 1), or None for every valid pixel.
      seed: None or an int: the seed of the pixel draws and of `U` (NumPy `default_rng`).
      quantile: A calibrated `q_hat` to restore (`from_config`); None until `fit`.

    #### Examples

    ```python
    sets = tfp_seg.calibration.ConformalPredictionSets(0.1, method="aps", seed=0)
    sets.fit(model.predict_proba(val_images), val_labels)       # [N, H, W, C], [N, H, W]
    masks = sets(model.predict_proba(test_images))              # bool [N, H, W, C]
    masks.sum(-1)                                               # set size per pixel
    ```
    """

    def __init__(
        self,
        alpha: float = 0.1,
        method: str = "lac",
        randomized: bool = True,
        pixels_per_image: Optional[int] = 1,
        seed: Optional[int] = None,
        quantile: Optional[float] = None,
    ):
        self.alpha = _check_alpha(alpha)
        if method not in _METHODS:
            raise ValueError(f"`method` must be one of {_METHODS}; got {method!r}.")
        self.method = method
        if not isinstance(randomized, (bool, np.bool_)):
            raise ValueError(f"`randomized` must be a bool; got {randomized!r}.")
        self.randomized = bool(randomized)
        if pixels_per_image is not None and (
            isinstance(pixels_per_image, (bool, np.bool_))
            or not isinstance(pixels_per_image, (int, np.integer))
            or pixels_per_image < 1
        ):
            raise ValueError(
                f"`pixels_per_image` must be None or a positive int; got {pixels_per_image!r}."
            )
        self.pixels_per_image = None if pixels_per_image is None else int(pixels_per_image)
        self.seed = _check_seed(seed)
        self._rng = np.random.default_rng(self.seed)
        if quantile is not None:
            real = isinstance(quantile, (int, float, np.integer, np.floating)) and not isinstance(
                quantile, (bool, np.bool_)
            )
            if not real or math.isnan(quantile):
                raise ValueError(f"`quantile` must be None or a number; got {quantile!r}.")
            quantile = float(quantile)
        self._quantile: Optional[float] = quantile
        self.num_calibration: Optional[int] = None

    @property
    def fitted(self) -> bool:
        """Whether `fit` has run (the score quantile is known)."""
        return self._quantile is not None

    @property
    def quantile(self) -> float:
        """The calibrated score quantile `q_hat` (`inf`: every set is all classes)."""
        if self._quantile is None:
            raise ValueError("ConformalPredictionSets is not fitted: call `fit` first.")
        return self._quantile

    def _uniforms(self, shape) -> np.ndarray:
        if self.method == "aps" and self.randomized:
            return self._rng.uniform(size=shape)
        return np.ones(shape)

    def scores(self, probabilities, uniforms=None) -> np.ndarray:
        """Scores `s(p, y)` of every class, `[..., C]` (`uniforms [...]`: APS's `U`; default:
        fresh draws, or 1 when not randomized)."""
        p = _float_array(probabilities, "probabilities", "[..., C] class probabilities")
        if self.method == "lac":
            return 1.0 - p
        u = self._uniforms(p.shape[:-1]) if uniforms is None else np.asarray(uniforms)
        # The mass of the strictly more probable classes, sum_c p_c 1{p_c > p_y}, class by class
        # (memory [..., C], not [..., C, C]).
        above = np.zeros_like(p)
        for y in range(p.shape[-1]):
            above[..., y] = np.sum(np.where(p > p[..., y : y + 1], p, 0.0), axis=-1)
        return above + u[..., None] * p

    def fit(
        self, probabilities, labels, ignore_label: Optional[int] = None
    ) -> "ConformalPredictionSets":
        """Calibrate `quantile` on held-out items.

        Args:
          probabilities: Class probabilities `[n, C]` (exchangeable items) or `[N, *S, C]`
            (images; `pixels_per_image` pixels of each are used).
          labels: Integer labels `[n]` / `[N, *S]`.
          ignore_label: Label value of pixels left out.

        Returns:
          self, with `quantile` and `num_calibration` (the number of calibration scores) set.
        """
        p_arr = np.asarray(probabilities)
        form = "[n, C] or [N, *S, C] class probabilities"
        p = _float_array(p_arr, "probabilities", form)
        if p.ndim < 2:
            raise ValueError(f"`probabilities` must have shape {form}; got {_describe(p_arr)}.")
        c = p.shape[-1]
        y = _label_array(labels, p.shape[:-1], "integer labels: probabilities.shape[:-1]")
        ignore_label = _checks.check_ignore_label(ignore_label)
        valid = np.ones(y.shape, bool) if ignore_label is None else y != ignore_label
        bad = valid & ((y < 0) | (y >= c))
        if bad.any():
            raise ValueError(
                f"`labels` must hold labels in [0, {c})"
                + (f" or ignore_label={ignore_label}" if ignore_label is not None else "")
                + f"; got e.g. {y[bad][:3].tolist()}."
            )
        if p.ndim == 2 or self.pixels_per_image is None:
            keep = valid.reshape(-1)
            p_items, y_items = p.reshape(-1, c)[keep], y.reshape(-1)[keep]
        else:
            n_img = p.shape[0]
            flat_p, flat_y = p.reshape(n_img, -1, c), y.reshape(n_img, -1)
            flat_valid = valid.reshape(n_img, -1)
            picks_p, picks_y = [], []
            for i in range(n_img):
                idx = np.flatnonzero(flat_valid[i])
                if idx.size == 0:
                    continue
                take = self._rng.choice(
                    idx, size=min(self.pixels_per_image, idx.size), replace=False
                )
                picks_p.append(flat_p[i, take])
                picks_y.append(flat_y[i, take])
            if not picks_p:
                raise ValueError("`labels` has no valid (non-ignored) pixels.")
            p_items, y_items = np.concatenate(picks_p), np.concatenate(picks_y)
        if y_items.size == 0:
            raise ValueError("`labels` has no valid (non-ignored) entries.")
        s = self.scores(p_items)[np.arange(y_items.size), y_items]
        n = s.size
        k = math.ceil((n + 1) * (1.0 - self.alpha) - _SLACK)
        self._quantile = float(np.sort(s)[k - 1]) if k <= n else math.inf
        self.num_calibration = int(n)
        return self

    def __call__(self, probabilities) -> np.ndarray:
        """Boolean set masks `[..., C]` (`True`: the class is in the pixel's set)."""
        return self.scores(probabilities) <= self.quantile

    def get_config(self) -> dict:
        return {
            "alpha": self.alpha,
            "method": self.method,
            "randomized": self.randomized,
            "pixels_per_image": self.pixels_per_image,
            "seed": self.seed,
            "quantile": self._quantile,
        }

    @classmethod
    def from_config(cls, config: dict) -> "ConformalPredictionSets":
        return cls(**config)

    def __repr__(self):
        q = "unfitted" if self._quantile is None else f"quantile={self._quantile:.4g}"
        return (
            f"ConformalPredictionSets(alpha={self.alpha:.4g}, method={self.method!r}, "
            f"randomized={self.randomized}, {q})"
        )
