"""What every head loss shares: configuration, the weightless head copy, the default-loss registry.

```none
HeadLoss          ignore_label, class_weights, normalize ("pixels": nats per pixel), config
SampledHeadLoss   + a head (tfp_seg.protocols.Head), num_samples, antithetic, chunk_size;
                    its joint and marginal Monte Carlo NLL come from `chunked.sampled_nll_terms`
default_loss      the loss registered for `head.likelihood` (`register_default_loss`)
```

A head declares the name of its likelihood; the loss that is its negative log-likelihood
registers under that name where it is defined (`@register_default_loss("...")`), so layers
never import losses and `model.compile(loss="auto")` / `head.default_loss()` find it.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import keras
import tensorflow as tf

from tfp_seg import _checks, _registry, protocols
from tfp_seg._registry import register_default_loss  # re-exported (an alias the docs follow)
from tfp_seg.losses import chunked, pixelwise, targets

__all__ = ["HeadLoss", "SampledHeadLoss", "default_loss", "register_default_loss"]

_NORMALIZE = ("pixels", "none")


def default_loss(head: protocols.Head, **kwargs) -> keras.losses.Loss:
    """The default loss of `head`: the loss class registered for `head.likelihood`, built by
    its `from_head(head, **kwargs)`.

    ```none
    "low_rank_normal_logits"          LowRankLogits         -> StochasticSegmentationNLL
    "heteroscedastic_normal_logits"   HeteroscedasticLogits -> HeteroscedasticNLL
    "categorical"                     CategoricalLogits     -> SegmentationCrossEntropy
    "mixture_low_rank_normal_logits"  MixtureLowRankLogits  -> MixtureNLL
    ```

    Raises `ValueError` for an object that is not a `tfp_seg.protocols.Head` or whose
    likelihood has no registered loss.
    """
    return _registry.default_loss(head, **kwargs)


class HeadLoss(keras.losses.Loss):
    """Common configuration of the heads' losses."""

    def __init__(
        self,
        ignore_label: Optional[int] = None,
        class_weights: Optional[Sequence[float]] = None,
        normalize: str = "pixels",
        validate_args: bool = True,
        num_classes: Optional[int] = None,
        name: Optional[str] = None,
        reduction: str = "sum_over_batch_size",
        dtype=None,
    ):
        super().__init__(name=name, reduction=reduction, dtype=dtype or "float32")
        if normalize not in _NORMALIZE:
            raise ValueError(f"`normalize` must be one of {_NORMALIZE}; got {normalize!r}.")
        if ignore_label is not None and (
            isinstance(ignore_label, bool) or not isinstance(ignore_label, int)
        ):
            raise ValueError(f"`ignore_label` must be an int or None; got {ignore_label!r}.")
        self.num_classes = num_classes
        self.ignore_label = ignore_label
        self.class_weights = pixelwise.check_class_weights(class_weights, num_classes)
        self.normalize = normalize
        self.validate_args = bool(validate_args)

    @classmethod
    def from_head(cls, head: protocols.Head, **kwargs) -> "HeadLoss":
        """The loss for `head`'s parameters (`default_loss`): here sized by its classes."""
        return cls(num_classes=head.num_classes, **kwargs)

    def _normalize(self, nll, labels, y_pred=None):
        """`nll [B]` per scored pixel (`normalize="pixels"`) or unchanged (`"none"`).

        The count is `targets.valid_pixel_count`: the non-ignored pixels of one label map;
        for a label set `[B, K, *S]` (told from labels by `y_pred`'s shape) those of each
        rater's map averaged over the K raters, `n_b = (1/K) sum_k n_{b,k}`, so that
        `nll_b / n_b = sum_k nll_{b,k} / sum_k n_{b,k}` with `nll_b` the mean over raters; for
        soft labels all prod(S) pixels. At least 1 (an image with every pixel ignored adds 0).
        """
        if self.normalize == "none":
            return nll
        if y_pred is None:
            count = pixelwise.valid_pixel_count(labels, self.ignore_label)
        else:
            classes = self.num_classes or tf.TensorShape(y_pred.shape)[-1]
            prepared = targets.prepare_targets(labels, y_pred, classes, validate_args=False)
            count = targets.valid_pixel_count(prepared, self.ignore_label)
        return nll / tf.maximum(count, 1.0)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "ignore_label": self.ignore_label,
                "class_weights": self.class_weights,
                "normalize": self.normalize,
                "validate_args": self.validate_args,
                "num_classes": self.num_classes,
            }
        )
        return config


def check_head(head, name: str = "head") -> protocols.Head:
    """`head` if it is a distribution head (`tfp_seg.protocols.Head`), else `ValueError`."""
    if not isinstance(head, protocols.Head):
        raise ValueError(
            f"`{name}` must be a distribution head (tfp_seg.protocols.Head, e.g. a "
            f"tfp_seg.layers.DistributionHead); got {type(head).__name__}."
        )
    return head


def head_copy(head) -> protocols.Head:
    """A weightless copy of `head` rebuilt from its config (or the head a config describes)."""
    if isinstance(head, dict):
        return check_head(keras.saving.deserialize_keras_object(head))
    head = check_head(head)
    return type(head).from_config(head.get_config())


class SampledHeadLoss(HeadLoss):
    """A loss that scores labels under `num_samples` draws from a head's distribution.

    Holds a weightless copy of the head built from its config: the loss needs only the
    parameter functions, and must not own the model's layer (saving would walk it).
    """

    def __init__(
        self,
        head,
        num_samples: int,
        antithetic: Optional[bool],
        chunk_size: Union[int, str, None] = None,
        **kwargs,
    ):
        head = head_copy(head)
        self.head = head
        self.antithetic = head.antithetic if antithetic is None else bool(antithetic)
        self.num_samples = _checks.check_num_samples(num_samples, self.antithetic)
        self.chunk_size = chunked.check_chunk_size(chunk_size, self.num_samples, self.antithetic)
        kwargs.pop("num_classes", None)
        super().__init__(num_classes=head.num_classes, **kwargs)

    @classmethod
    def from_head(cls, head: protocols.Head, **kwargs) -> "SampledHeadLoss":
        """The loss for `head` (`default_loss`): holds a weightless copy of it."""
        return cls(head, **kwargs)

    def _check_y_pred(self, y_pred) -> tf.Tensor:
        """`y_pred` as a tensor, after the check of its rank against the head's spatial rank
        (`[B, *S, params_size]`, `S` of `head.spatial_dims` axes), naming `y_pred`."""
        y_pred = tf.convert_to_tensor(y_pred)
        chunked.check_head_params(self.head, y_pred, "y_pred")
        return y_pred

    def _nll_terms(self, y_true, y_pred):
        """Joint and marginal Monte Carlo NLL `([B], [B])` (`chunked.sampled_nll_terms`): of
        label maps, or the means over the raters of a label set (one shared set of samples)."""
        y_pred = self._check_y_pred(y_pred)
        return chunked.sampled_nll_terms(
            self.head,
            y_true,
            y_pred,
            self.num_samples,
            chunk_size=self.chunk_size,
            antithetic=self.antithetic,
            ignore_label=self.ignore_label,
            class_weights=self.class_weights,
            validate_args=self.validate_args,
            name="y_true",
        )

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "head": keras.saving.serialize_keras_object(self.head),
                "num_samples": self.num_samples,
                "antithetic": self.antithetic,
                "chunk_size": self.chunk_size,
            }
        )
        return config
