"""What both evaluations share: drawing one batch's samples with the Sampler's seed per batch, and
running sums whose result equals the NumPy metric on the concatenated data.

```none
batch k of the evaluation      seed (k = 0), fold_seed(seed, k) (k > 0): the seed the Sampler
                               base gives its own batch k (`tfp_seg.models.sampling`), so
                               batch by batch equals one `sample_logits(all, N, seed, batch_size)`
CalibrationSums                per-bin counts, confidence and accuracy sums -> ECE
RiskCoverageSums               per distinct confidence: item and error counts -> AURC, E-AURC,
                               AUGRC of 0/1 errors, exactly (ties accepted together)
```
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import scipy.special

from tfp_seg import _checks, _seeds, metrics

__all__ = ["CalibrationSums", "RiskCoverageSums", "batch_seed", "draw_logits", "softmax"]


def softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax of NumPy `logits` along `axis` (max subtracted first)."""
    z = logits - logits.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)


batch_seed = _seeds.batch_seed


def draw_logits(
    model: Any,
    images: np.ndarray,
    num_samples: int,
    seed: Any,
    batch_size: Optional[int],
    index: int,
) -> np.ndarray:
    """`model.sample_logits` of one batch `images [b, *S, channels]` -> float32
    `[N, b, *S, C]`, checked (`S = (H, W)` or `(D, H, W)`, from the images' rank)."""
    logits = np.asarray(
        model.sample_logits(
            images, num_samples, seed=batch_seed(seed, index), batch_size=batch_size
        ),
        dtype=np.float32,
    )
    expected = (num_samples,) + tuple(images.shape[:-1])
    if logits.ndim != len(expected) + 1 or logits.shape[:-1] != expected:
        form = _checks.spatial_form(images.ndim - 2, "N, B", "C")
        raise ValueError(
            f"`model.sample_logits` must return {form} = {expected + ('C',)} logits for "
            f"a batch of images {tuple(images.shape)}; got shape {logits.shape}."
        )
    if not np.all(np.isfinite(logits)):
        raise ValueError(f"`model.sample_logits` returned NaN or Inf logits (batch {index}).")
    return logits


class CalibrationSums:
    """ECE with uniform bins, streamed: per-bin counts and sums of confidence and accuracy,
    from `tfp_seg.metrics.reliability_diagram_data` of every batch (so the bins are its)."""

    def __init__(self, num_bins: int):
        self.counts = np.zeros(num_bins)
        self.confidence = np.zeros(num_bins)
        self.accuracy = np.zeros(num_bins)

    def add(self, probs: np.ndarray, labels: np.ndarray) -> None:
        """`probs [..., C]` with integer labels `[...]` or soft targets `[..., C]`."""
        stats = metrics.reliability_diagram_data(probs, labels, num_bins=self.counts.size)
        counts = stats["counts"].astype(np.float64)
        self.counts += counts
        self.confidence += np.nan_to_num(stats["confidence"]) * counts
        self.accuracy += np.nan_to_num(stats["accuracy"]) * counts

    def ece(self) -> float:
        return float(np.abs(self.accuracy - self.confidence).sum() / self.counts.sum())


class RiskCoverageSums:
    """The risk-coverage curve of 0/1 errors, streamed exactly.

    The curve, and so AURC, E-AURC and AUGRC (`tfp_seg.metrics.selective`: items of equal
    confidence accepted together), depends only on the number of items and of errors at each
    distinct confidence value. Those are kept per distinct value: a sorted array of the values
    (in their own dtype: float32 for a model's probabilities) with int64 item and error counts,
    20 bytes per value, into which the batches' values are merged (collected up to
    `max(2**18, size / 16)` values, then inserted). So memory is bounded by the number of
    distinct confidences, not of items: for float32 top-label confidences at most about `2**23`
    per binade of `[1/C, 1]` (168 MB for C = 2), and in practice far fewer.
    The optimal AURC of `e_aurc` needs only the totals: with `n0` correct among `n` items,
    `AURC* = (n - n0 - n0 (H_n - H_n0)) / n` (harmonic numbers `H`, by the digamma function).
    """

    _BUFFER = 1 << 18

    def __init__(self):
        self._values: Optional[np.ndarray] = None
        self._items = np.zeros(0, np.int64)
        self._errors = np.zeros(0, np.int64)
        self._pending: list = []
        self._pending_size = 0

    def add(self, confidence: np.ndarray, errors: np.ndarray, count: int = 1) -> None:
        """`confidence [n]` of `n` groups of `count` items; `errors [n]` of them in each group."""
        values, inverse = np.unique(np.asarray(confidence).reshape(-1), return_inverse=True)
        errors = np.bincount(inverse, np.asarray(errors, np.float64).reshape(-1), values.size)
        items = int(count) * np.bincount(inverse, minlength=values.size)
        self._pending.append((values, items, np.rint(errors).astype(np.int64)))
        self._pending_size += values.size
        size = 0 if self._values is None else self._values.size
        if self._pending_size > max(self._BUFFER, size // 16):
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        values, inverse = np.unique(
            np.concatenate([p[0] for p in self._pending]), return_inverse=True
        )
        items = np.bincount(inverse, np.concatenate([p[1] for p in self._pending]), values.size)
        errors = np.bincount(inverse, np.concatenate([p[2] for p in self._pending]), values.size)
        items, errors = np.rint(items).astype(np.int64), np.rint(errors).astype(np.int64)
        self._pending, self._pending_size = [], 0
        if self._values is None:
            self._values, self._items, self._errors = values, items, errors
            return
        if values.dtype != self._values.dtype:
            dtype = np.result_type(values, self._values)
            self._values, values = self._values.astype(dtype), values.astype(dtype)
        at = np.searchsorted(self._values, values)
        known = at < self._values.size
        known[known] = self._values[at[known]] == values[known]
        self._items[at[known]] += items[known]  # distinct positions: fancy += is exact
        self._errors[at[known]] += errors[known]
        new = ~known
        if new.any():  # one array at a time: the old one is freed before the next is copied
            self._values = np.insert(self._values, at[new], values[new])
            self._items = np.insert(self._items, at[new], items[new])
            self._errors = np.insert(self._errors, at[new], errors[new])

    def scores(self) -> dict[str, float]:
        """`{"aurc", "e_aurc", "augrc"}` of everything added (as `metrics.selective_scores`)."""
        self._flush()
        items = self._items[::-1].astype(np.float64)  # decreasing confidence
        errors = self._errors[::-1].astype(np.float64)
        accepted, accepted_errors = np.cumsum(items), np.cumsum(errors)  # one point per value
        n, n_errors = accepted[-1], accepted_errors[-1]
        coverage = np.r_[0.0, accepted / n]
        generalized = np.r_[0.0, accepted_errors / n]
        aurc = float(np.sum(np.diff(coverage) * accepted_errors / accepted))
        augrc = float(np.sum(np.diff(coverage) * (generalized[1:] + generalized[:-1])) / 2.0)
        n0 = n - n_errors
        harmonic = scipy.special.digamma(n + 1.0) - scipy.special.digamma(n0 + 1.0)
        optimal = float((n_errors - n0 * harmonic) / n)
        return {"aurc": aurc, "e_aurc": aurc - optimal, "augrc": augrc}
