"""Streaming Keras 3 metrics (`StreamingMeanIoU`, `StreamingECE`, `StreamingNLL`,
`StreamingBrier`) for `model.compile(metrics=[...])`, and `bind_head`.

They accumulate sufficient statistics in float64 variables, so after any number of batches
`result()` equals the NumPy function of `tfp_seg.metrics` applied to the concatenated data. On a
distribution head's packed parameters they score the head's Monte Carlo predictive probabilities
`head.mean_probabilities(...)` (what `predict_proba` returns):
`tfp_seg.models.ProbabilisticSegmenter.compile` gives them the model's head (`bind_head`).
Without a head (plain Keras models, or `predictive=False`) they score the first `C` channels of
`y_pred` as probabilities or logits.
"""

from __future__ import annotations

from typing import Any, Optional

import keras
import numpy as np
import tensorflow as tf

from tfp_seg import _checks, _seeds, protocols
from tfp_seg.metrics import _common

__all__ = ["StreamingBrier", "StreamingECE", "StreamingMeanIoU", "StreamingNLL", "bind_head"]


def _metric_head(head: Any) -> Any:
    """A weightless copy of a distribution head (a metric must not own the model's layer)."""
    if head is None:
        return None
    if isinstance(head, dict):
        head = keras.saving.deserialize_keras_object(head)
    elif isinstance(head, protocols.Head):
        head = type(head).from_config(head.get_config())
    if not isinstance(head, protocols.Head):
        raise ValueError(
            "`head` must be a distribution head (tfp_seg.protocols.Head, e.g. a "
            "tfp_seg.layers.DistributionHead), its serialized config, or None; got "
            f"{type(head).__name__}."
        )
    return head


class _StreamingSegmentationMetric(keras.metrics.Metric):
    """Shared input handling: labels `[B, *S]`; the predictive probabilities of a distribution
    `head` from `y_pred`'s packed parameters `[B, *S, P]` (the head's `spatial_dims` gives the
    rank of `S`), or without a head the first `num_classes` channels of `y_pred`. Every pixel
    (voxel) is one item of the accumulated sums, so the rank of `S` does not change a result:
    a `[B, D, H, W]` volume adds what the `[B, D*H, W]` image adds."""

    def __init__(
        self,
        num_classes: int,
        from_logits: bool = False,
        ignore_label: Optional[int] = None,
        name: Optional[str] = None,
        dtype: Any = None,
        head: Any = None,
        num_samples: int = 16,
        seed: Optional[int] = None,
        predictive: bool = True,
    ) -> None:
        super().__init__(name=name, dtype=dtype)
        self.num_classes = _checks.positive_int(num_classes, "num_classes")
        self.from_logits = bool(from_logits)
        self.ignore_label = _common.check_ignore_label(ignore_label)
        self.num_samples = _checks.positive_int(num_samples, "num_samples")
        self.seed = _seeds.check_seed(seed, pair=False)  # an int: it is saved in the config
        self.predictive = bool(predictive)
        self.head = None
        if head is not None:
            if not self.predictive:
                raise ValueError(
                    "`head` was given with predictive=False; predictive=False scores the first "
                    "num_classes channels of y_pred and takes no head."
                )
            self.bind_head(head)

    def bind_head(self, head: Any) -> bool:
        """Score the predictive distribution of `head` from now on (a weightless copy of it is
        kept). Does nothing, and returns False, if the metric already has a head or was built
        with `predictive=False`; returns True when bound."""
        if self.head is not None or not self.predictive:
            return False
        head = _metric_head(head)
        if head.num_classes != self.num_classes:
            raise ValueError(
                f"`head` has num_classes={head.num_classes} but the metric was built with "
                f"num_classes={self.num_classes}."
            )
        self.head = head
        return True

    @property
    def _scores_are_logits(self) -> bool:
        return self.from_logits and self.head is None

    def _class_scores(self, y_pred: tf.Tensor) -> tf.Tensor:
        """`[..., C]`: predictive probabilities of the head, or the first C channels."""
        if self.head is None:
            return y_pred[..., : self.num_classes]
        return self.head.mean_probabilities(y_pred, num_samples=self.num_samples, seed=self.seed)

    def _prepare(
        self, y_true: Any, y_pred: Any, sample_weight: Any
    ) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        """Returns (labels [n] int32, class scores [n, C] float32, weights [n] float64)."""
        c = self.num_classes
        y_pred = tf.convert_to_tensor(y_pred)
        y_true = tf.convert_to_tensor(y_true)
        if y_pred.shape.rank is not None:
            if self.head is not None:
                spatial = getattr(self.head, "spatial_dims", 2)
                if y_pred.shape.rank != 2 + spatial or (
                    y_pred.shape[-1] is not None and y_pred.shape[-1] != self.head.params_size
                ):
                    form = _checks.spatial_form(spatial, "B", str(self.head.params_size))
                    raise ValueError(
                        f"`y_pred` must hold the packed parameters of the metric's "
                        f"{type(self.head).__name__} head, {form} (spatial_dims={spatial}); "
                        f"got shape {tuple(y_pred.shape)}."
                    )
            if y_pred.shape.rank < 1 or (y_pred.shape[-1] is not None and y_pred.shape[-1] < c):
                raise ValueError(
                    f"`y_pred` must have at least num_classes={c} channels in its last axis "
                    f"([B, *S, P], P >= C; the first C channels are used); got shape "
                    f"{tuple(y_pred.shape)}."
                )
            if y_true.shape.rank == y_pred.shape.rank and y_true.shape[-1] == 1:
                y_true = tf.squeeze(y_true, axis=-1)
            if y_true.shape.rank is not None and not y_true.shape.is_compatible_with(
                y_pred.shape[:-1]
            ):
                raise ValueError(
                    f"`y_true` must have shape y_pred.shape[:-1] = {tuple(y_pred.shape[:-1])} "
                    f"(integer labels [B, *S]); got {tuple(y_true.shape)}."
                )
        if y_true.dtype.is_floating:
            y_true = tf.round(y_true)
        labels = tf.reshape(tf.cast(y_true, tf.int32), [-1])
        scores = tf.reshape(tf.cast(self._class_scores(y_pred), tf.float32), [-1, c])
        weights = tf.ones_like(labels, dtype=tf.float64)
        if sample_weight is not None:
            sw = tf.cast(tf.convert_to_tensor(sample_weight), tf.float64)
            target_rank = y_true.shape.rank
            if sw.shape.rank is not None and target_rank is not None:
                if sw.shape.rank == target_rank + 1 and sw.shape[-1] == 1:
                    sw = tf.squeeze(sw, axis=-1)
                for _ in range(target_rank - sw.shape.rank):
                    sw = sw[..., None]
            weights = tf.reshape(tf.broadcast_to(sw, tf.shape(y_true)), [-1])
        if self.ignore_label is not None:
            valid = tf.not_equal(labels, self.ignore_label)
            weights = tf.where(valid, weights, tf.zeros_like(weights))
            labels = tf.where(valid, labels, tf.zeros_like(labels))
        checks = [
            tf.debugging.assert_non_negative(labels, message="`y_true` has negative labels"),
            tf.debugging.assert_less(labels, c, message=f"`y_true` has labels >= num_classes={c}"),
        ]
        with tf.control_dependencies(checks):
            labels = tf.identity(labels)
        return labels, scores, weights

    def _probs(self, scores: tf.Tensor) -> tf.Tensor:
        return tf.nn.softmax(scores, axis=-1) if self._scores_are_logits else scores

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(
            {
                "num_classes": self.num_classes,
                "from_logits": self.from_logits,
                "ignore_label": self.ignore_label,
                "head": (
                    None if self.head is None else keras.saving.serialize_keras_object(self.head)
                ),
                "num_samples": self.num_samples,
                "seed": self.seed,
                "predictive": self.predictive,
            }
        )
        return config


@keras.saving.register_keras_serializable(package="tfp_seg")
class StreamingMeanIoU(_StreamingSegmentationMetric):
    """Streaming mean IoU of `argmax` predictions (accumulates a confusion matrix).

    `y_true`: integer labels `[B, *S]` (or `[B, *S, 1]`), `S = (H, W)` or `(D, H, W)`.
    `y_pred`: with a `head`, its packed parameters `[B, *S, head.params_size]` (`S` of the
    head's `spatial_dims`); without one, `[B, *S, P]` with `P >= num_classes`.
    `sample_weight` (broadcastable to `[B, *S]`) weights the pixel counts; pixels labelled
    `ignore_label` get weight 0.

    What is scored: with a distribution `head` (given here, or bound by
    `tfp_seg.models.ProbabilisticSegmenter.compile`, which passes the model's head to every
    streaming metric that has none), the metric scores the Monte Carlo predictive
    probabilities `probs = head.mean_probabilities(y_pred, num_samples, seed)` =
    `E[softmax(eta)]`: the distribution that `predict_proba` returns and `report.json`
    (`tfp_seg.evaluation.evaluate_ambiguous`) scores; `from_logits` is then not used. Without
    a head (a plain Keras model, or `predictive=False`) it scores the first `num_classes`
    channels, `probs = y_pred[..., :C]`, as probabilities, or as logits with
    `from_logits=True`; on a distribution head's parameters that is the softmax of the *mean
    logits*, a different (for large logit variances, very different) distribution. Here only
    the argmax of `probs` matters (so `from_logits` does not change the result), and the
    predictive argmax can differ from the argmax of the mean logits.

    `result()` equals `mean_iou(argmax(probs), y_true, C, ignore_label)` on the concatenation of
    all batches seen since the last `reset_state()` (with the same draws: a fixed `seed`).

    Args (the other streaming metrics take the same keyword arguments):
      num_classes: C.
      ignore_label: label whose pixels are not counted.
      from_logits: whether the first C channels are logits (no head; no effect on the argmax).
      name: the metric's name.
      dtype: the dtype of `result()`.
      head: a `tfp_seg.layers.DistributionHead` (a weightless copy is kept; also its
        serialized config), or None.
      num_samples: Monte Carlo samples of `head.mean_probabilities` per batch.
      seed: None (fresh noise every batch) or an int (stateless: the same noise for equally
        shaped batches, reproducible).
      predictive: False never takes a head (`ProbabilisticSegmenter.compile` binds none) and
        scores the first C channels of `y_pred`.
    """

    def __init__(
        self,
        num_classes: int,
        ignore_label: Optional[int] = None,
        from_logits: bool = False,
        name: str = "mean_iou",
        **kwargs: Any,
    ) -> None:
        super().__init__(num_classes, from_logits, ignore_label, name=name, **kwargs)
        c = self.num_classes
        self.total_cm = self.add_variable(
            shape=(c, c), initializer="zeros", dtype="float64", name="total_confusion_matrix"
        )

    def update_state(self, y_true: Any, y_pred: Any, sample_weight: Any = None) -> None:
        labels, scores, weights = self._prepare(y_true, y_pred, sample_weight)
        c = self.num_classes
        pred = tf.argmax(scores, axis=-1, output_type=tf.int32)
        counts = tf.math.unsorted_segment_sum(weights, labels * c + pred, c * c)
        self.total_cm.assign_add(tf.reshape(counts, (c, c)))

    def result(self) -> tf.Tensor:
        cm = tf.convert_to_tensor(self.total_cm)
        tp = tf.linalg.diag_part(cm)
        union = tf.reduce_sum(cm, axis=0) + tf.reduce_sum(cm, axis=1) - tp
        present = union > 0
        iou = tf.where(present, tp / tf.where(present, union, tf.ones_like(union)), 0.0)
        n_present = tf.reduce_sum(tf.cast(present, tf.float64))
        value = tf.math.divide_no_nan(tf.reduce_sum(iou), n_present)
        return tf.cast(value, self.dtype)

    def confusion_matrix(self) -> np.ndarray:
        """The accumulated `[C, C]` confusion matrix (rows truth, columns prediction)."""
        return np.asarray(keras.ops.convert_to_numpy(self.total_cm))


@keras.saving.register_keras_serializable(package="tfp_seg")
class StreamingECE(_StreamingSegmentationMetric):
    """Streaming expected calibration error with `num_bins` equal-width bins.

    Accumulates per-bin pixel counts, confidence sums and accuracy sums (float64), so `result()`
    equals `expected_calibration_error(probs, labels, num_bins, "uniform", ignore_label)` on the
    concatenation of all batches, with `probs = head.mean_probabilities(y_pred, num_samples,
    seed)` given a head, else `softmax(y_pred[..., :C])` if `from_logits` else
    `y_pred[..., :C]`. Input conventions and the other arguments as in `StreamingMeanIoU`.
    Scores the predictive distribution of a distribution head when it has one (given, or bound
    by `ProbabilisticSegmenter.compile`); see "What is scored" in `StreamingMeanIoU`.
    """

    def __init__(
        self,
        num_classes: int,
        num_bins: int = 15,
        from_logits: bool = False,
        ignore_label: Optional[int] = None,
        name: str = "ece",
        **kwargs: Any,
    ) -> None:
        super().__init__(num_classes, from_logits, ignore_label, name=name, **kwargs)
        self.num_bins = _checks.positive_int(num_bins, "num_bins")
        shape = (self.num_bins,)
        self.bin_counts = self.add_variable(
            shape=shape, initializer="zeros", dtype="float64", name="bin_counts"
        )
        self.bin_conf_sums = self.add_variable(
            shape=shape, initializer="zeros", dtype="float64", name="bin_confidence_sums"
        )
        self.bin_acc_sums = self.add_variable(
            shape=shape, initializer="zeros", dtype="float64", name="bin_accuracy_sums"
        )

    def update_state(self, y_true: Any, y_pred: Any, sample_weight: Any = None) -> None:
        labels, scores, weights = self._prepare(y_true, y_pred, sample_weight)
        probs = self._probs(scores)
        conf = tf.cast(tf.reduce_max(probs, axis=-1), tf.float64)
        conf = tf.clip_by_value(conf, 0.0, 1.0)
        correct = tf.cast(
            tf.equal(tf.argmax(probs, axis=-1, output_type=tf.int32), labels), tf.float64
        )
        m = self.num_bins
        bins = tf.clip_by_value(tf.cast(tf.math.ceil(conf * m), tf.int32) - 1, 0, m - 1)
        self.bin_counts.assign_add(tf.math.unsorted_segment_sum(weights, bins, m))
        self.bin_conf_sums.assign_add(tf.math.unsorted_segment_sum(weights * conf, bins, m))
        self.bin_acc_sums.assign_add(tf.math.unsorted_segment_sum(weights * correct, bins, m))

    def result(self) -> tf.Tensor:
        gap = tf.reduce_sum(tf.abs(tf.convert_to_tensor(self.bin_acc_sums) - self.bin_conf_sums))
        value = tf.math.divide_no_nan(gap, tf.reduce_sum(self.bin_counts))
        return tf.cast(value, self.dtype)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config["num_bins"] = self.num_bins
        return config


class _StreamingMean(_StreamingSegmentationMetric):
    """Weighted running mean of a per-pixel score."""

    def __init__(
        self,
        num_classes: int,
        from_logits: bool,
        ignore_label: Optional[int],
        name: Optional[str],
        **kwargs: Any,
    ) -> None:
        super().__init__(num_classes, from_logits, ignore_label, name=name, **kwargs)
        self.total = self.add_variable(shape=(), initializer="zeros", dtype="float64", name="total")
        self.count = self.add_variable(shape=(), initializer="zeros", dtype="float64", name="count")

    def _per_pixel(self, labels: tf.Tensor, scores: tf.Tensor) -> tf.Tensor:
        raise NotImplementedError

    def update_state(self, y_true: Any, y_pred: Any, sample_weight: Any = None) -> None:
        labels, scores, weights = self._prepare(y_true, y_pred, sample_weight)
        values = tf.cast(self._per_pixel(labels, scores), tf.float64)
        self.total.assign_add(tf.reduce_sum(weights * values))
        self.count.assign_add(tf.reduce_sum(weights))

    def result(self) -> tf.Tensor:
        return tf.cast(tf.math.divide_no_nan(self.total, self.count), self.dtype)


@keras.saving.register_keras_serializable(package="tfp_seg")
class StreamingNLL(_StreamingMean):
    """Streaming mean per-pixel negative log-likelihood.

    `result()` equals `negative_log_likelihood(probs, labels, ignore_label, eps)` on the
    concatenation of all batches (`probs` as in `StreamingECE`: the head's predictive
    probabilities given a head; without one and with `from_logits=True` the log-probabilities
    come from `log_softmax`, clipped below at `log(eps)`). Input conventions and the other
    arguments as in `StreamingMeanIoU`.
    Scores the predictive distribution of a distribution head when it has one (given, or bound
    by `ProbabilisticSegmenter.compile`); see "What is scored" in `StreamingMeanIoU`.
    """

    def __init__(
        self,
        num_classes: int,
        from_logits: bool = False,
        ignore_label: Optional[int] = None,
        eps: float = 1e-12,
        name: str = "nll",
        **kwargs: Any,
    ) -> None:
        super().__init__(num_classes, from_logits, ignore_label, name=name, **kwargs)
        self.eps = _common.check_eps(eps)

    def _per_pixel(self, labels: tf.Tensor, scores: tf.Tensor) -> tf.Tensor:
        if self._scores_are_logits:
            logp = tf.nn.log_softmax(scores, axis=-1)
        else:
            logp = tf.math.log(tf.maximum(tf.cast(scores, tf.float64), self.eps))
        picked = tf.gather(tf.cast(logp, tf.float64), labels, axis=1, batch_dims=1)
        return -tf.maximum(picked, float(np.log(self.eps)))

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config["eps"] = self.eps
        return config


@keras.saving.register_keras_serializable(package="tfp_seg")
class StreamingBrier(_StreamingMean):
    """Streaming mean per-pixel multi-class Brier score.

    `result()` equals `brier_score(probs, labels, ignore_label)` on the concatenation of all
    batches (`probs` as in `StreamingECE`). Input conventions and the other arguments as in
    `StreamingMeanIoU`.
    Scores the predictive distribution of a distribution head when it has one (given, or bound
    by `ProbabilisticSegmenter.compile`); see "What is scored" in `StreamingMeanIoU`.
    """

    def __init__(
        self,
        num_classes: int,
        from_logits: bool = False,
        ignore_label: Optional[int] = None,
        name: str = "brier",
        **kwargs: Any,
    ) -> None:
        super().__init__(num_classes, from_logits, ignore_label, name=name, **kwargs)

    def _per_pixel(self, labels: tf.Tensor, scores: tf.Tensor) -> tf.Tensor:
        probs = tf.cast(self._probs(scores), tf.float64)
        onehot = tf.one_hot(labels, self.num_classes, dtype=tf.float64)
        return tf.reduce_sum(tf.square(probs - onehot), axis=-1)


def bind_head(metrics: Any, head: Any) -> list:
    """Give every streaming metric in `metrics` (a metric, or nested lists / tuples / dicts of
    them, as `compile(metrics=...)` takes) that has no head, and was not built with
    `predictive=False`, the distribution `head`, so that it scores the head's predictive
    probabilities. Other entries (names, other metrics) are left alone. Returns the metrics
    that were bound. `tfp_seg.models.ProbabilisticSegmenter.compile` calls it with the model's
    head."""
    bound = []
    stack = [metrics]
    while stack:
        item = stack.pop()
        if isinstance(item, _StreamingSegmentationMetric):
            if item.bind_head(head):
                bound.append(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return bound
