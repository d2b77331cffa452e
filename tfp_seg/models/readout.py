"""`SampleReadout`: the sampling read-outs every tfp_seg model shares.

A model provides one graph function, `_sample_logits_tensor(images, N, seed, antithetic)` ->
logit samples `[N, B, H, W, C]`; this mixin turns it into the public, batched, NumPy-returning
interface (`sample_logits`, `sample`, `probability_samples`, `predict_proba`) that metrics,
plots, the CLI and the exporters rely on.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import tensorflow as tf

from tfp_seg import _checks
from tfp_seg import distributions as dists

__all__ = ["SampleReadout"]


class SampleReadout:
    """Mixin: batched sampling read-outs on top of `_sample_logits_tensor`."""

    def _sample_logits_tensor(self, images, num_samples: int, seed=None, antithetic=False):
        raise NotImplementedError

    def _sample_labels_tensor(self, images, num_samples: int, seed=None, antithetic=False):
        """Label maps `[N, B, H, W]` (int32); models with a cheaper exact sampler override it."""
        return dists.argmax_classes(
            self._sample_logits_tensor(images, num_samples, seed=seed, antithetic=antithetic)
        )

    def _batches(self, x, batch_size: Optional[int]):
        x = tf.convert_to_tensor(x)
        _checks.check_rank(x, 4, "x", "[B, H, W, channels] images")
        n = x.shape[0]
        if n == 0:
            raise ValueError("`x` is an empty batch (0 images).")
        if batch_size is None or n is None:
            yield x
            return
        for start in range(0, n, batch_size):
            yield x[start : start + batch_size]

    def sample_logits(
        self,
        x,
        num_samples: int,
        seed=None,
        batch_size: Optional[int] = 32,
        antithetic: bool = False,
    ) -> np.ndarray:
        """Logit samples `[N, B, H, W, C]` (numpy).

        Independent samples by default (what a person looking at plausible segmentations
        wants); `antithetic=True` gives mirrored pairs, a variance reduction for estimators.
        """
        out = [
            self._sample_logits_tensor(xb, num_samples, seed=seed, antithetic=antithetic).numpy()
            for xb in self._batches(x, batch_size)
        ]
        return np.concatenate(out, axis=1)

    def sample(
        self,
        x,
        num_samples: int = 16,
        seed=None,
        batch_size: Optional[int] = 32,
        antithetic: bool = False,
    ) -> np.ndarray:
        """Sampled label maps `[N, B, H, W]` (int32 numpy), distributed as the arg max of
        logit samples.

        Heads with an exact label sampler (`head.sample_labels`: SSN, heteroscedastic) draw
        the maps from the logit differences, which is cheaper; so the maps are not the arg
        max of `sample_logits` with the same seed, though they have its distribution.
        """
        out = [
            self._sample_labels_tensor(xb, num_samples, seed=seed, antithetic=antithetic).numpy()
            for xb in self._batches(x, batch_size)
        ]
        return np.concatenate(out, axis=1)

    def probability_samples(
        self, x, num_samples: int = 16, seed=None, batch_size: Optional[int] = 32
    ) -> np.ndarray:
        """Softmax of each logit sample, `[N, B, H, W, C]` (input of `tfp_seg.uncertainty`)."""
        out = [
            tf.nn.softmax(self._sample_logits_tensor(xb, num_samples, seed=seed), -1).numpy()
            for xb in self._batches(x, batch_size)
        ]
        return np.concatenate(out, axis=1)

    def predict_proba(
        self, x, num_samples: int = 16, seed=None, batch_size: Optional[int] = 32
    ) -> np.ndarray:
        """Predictive probabilities `E[softmax(eta)]` over `num_samples`, `[B, H, W, C]`."""
        batches = self._batches(x, batch_size)
        out = [self._mean_probabilities(xb, num_samples, seed) for xb in batches]
        return np.concatenate(out, axis=0)

    def _mean_probabilities(self, images, num_samples: int, seed) -> np.ndarray:
        samples = self._sample_logits_tensor(images, num_samples, seed=seed)
        return dists.mean_softmax(samples).numpy()
