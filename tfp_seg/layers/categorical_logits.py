"""`CategoricalLogits`: the deterministic baseline head."""

from __future__ import annotations

import keras
import tensorflow as tf
import tensorflow_probability as tfp

from tfp_seg import _checks
from tfp_seg import distributions as dists
from tfp_seg.layers.base import DistributionHead

tfd = tfp.distributions

__all__ = ["CategoricalLogits"]


@keras.saving.register_keras_serializable(package="tfp_seg")
class CategoricalLogits(DistributionHead):
    """Deterministic per-pixel logits: a point mass over logits, softmax likelihood.

    ```none
    params = logits in R^(S x C),   S = (H, W) or (D, H, W)   (spatial_dims = 2 or 3)
    p(y | x) = prod_i softmax(logits_i)[y_i]                  over the pixels (voxels) i
    ```

    `distribution(params)` is `Independent(Deterministic(logits), spatial_dims + 1)` (batch
    `[B]`, event `[*S, C]`) so that every head shares one interface; `sample_logits` repeats
    the logits, and the loss is the pixel-wise cross-entropy (`SegmentationCrossEntropy`,
    registered for the likelihood `"categorical"`).

    #### Examples

    ```python
    head = tfp_seg.layers.CategoricalLogits(num_classes=3)
    params = head(tf.zeros([2, 16, 16, 8]))       # [2, 16, 16, 3]
    head.sample_logits(params, 4).shape           # ==> [4, 2, 16, 16, 3]
    volume = tfp_seg.layers.CategoricalLogits(3, spatial_dims=3)
    volume(tf.zeros([2, 4, 16, 16, 8])).shape     # ==> [2, 4, 16, 16, 3]
    ```
    """

    likelihood = "categorical"

    def __init__(self, num_classes: int, **kwargs):
        super().__init__(num_classes, **kwargs)
        self.projection = self._make_projection()

    @property
    def params_size(self) -> int:
        return self.num_classes

    @staticmethod
    def params_size_for(num_classes: int) -> int:
        """Parameter channels per pixel for `num_classes` classes: C."""
        return num_classes

    def distribution(self, params):
        logits = self.mean_logits(params)
        return tfd.Independent(
            tfd.Deterministic(logits), reinterpreted_batch_ndims=self.spatial_dims + 1
        )

    def sample_logits(self, params, num_samples: int, seed=None, antithetic=None, noise=None):
        num_samples = _checks.check_num_samples(num_samples, antithetic=False)
        logits = self.mean_logits(params)
        return tf.repeat(logits[tf.newaxis], num_samples, axis=0)

    def sample_labels(self, params, num_samples: int, seed=None, antithetic=None):
        """The arg max of the logits, repeated: `[N, B, *S]` (int32)."""
        num_samples = _checks.check_num_samples(num_samples, antithetic=False)
        labels = dists.argmax_classes(self.mean_logits(params))
        return tf.repeat(labels[tf.newaxis], num_samples, axis=0)

    def mean_probabilities(self, params, num_samples: int = 1, seed=None) -> tf.Tensor:
        return tf.nn.softmax(self.mean_logits(params), axis=-1)
