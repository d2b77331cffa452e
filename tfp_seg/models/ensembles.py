"""`EnsembleSegmenter`: an efficient ensemble backbone (BatchEnsemble, Packed-Ensembles) + a
distribution head, trained as one Keras model and sampled with the members as samples.

The backbone maps images `[B, *S, channels]` to the features of its M members, member-major
along the batch axis (`tfp_seg.models.UNet(ensemble="batch" | "packed", ensemble_size=M)`);
the head (shared by the members) turns every member's features into parameters. `S` is
`(H, W)` for images or `(D, H, W)` for volumes (the head's `spatial_dims`, one code path):

```none
model(x)              params [M*B, *S, P]        member j: rows j*B .. (j+1)*B - 1
member_params(x)      params [M, B, *S, P]
training (fit)        loss(tile(y, M), params): every member against the same labels (the
                      papers' training: each member sees the whole batch); the loss is the
                      mean over members of each member's loss
sample n of N         draw n // M of member n mod M (N = M k: k head draws per member;
                      N must be a multiple of M)
predict_proba         (1/M) sum_j head.mean_probabilities(params_j, N / M)  (the equal-weight
                      mixture of the members' predictive distributions)
```

With a deterministic head (`CategoricalLogits`) the members are the only source of samples
(k identical draws per member); with a distribution head each member also draws from its own
head distribution, as `DeepEnsemble(head_sampling=True)` does.

The head is reached as `member_head`, not `head`: `model(x)` holds M distributions per image,
so code that reads `model.head.distribution(model(x))` as one distribution per image (the
exporters' head path, `MCDropout`) does not apply. Exporters use the graph sampler instead
(`tfp_seg.protocols.GraphSampler`: `sample_logits_tensor`, `mean_logits_tensor`).

#### References

[1] Wen, Tran and Ba. BatchEnsemble: an Alternative Approach to Efficient Ensemble and
    Lifelong Learning. ICLR 2020.
[2] Laurent et al. Packed-Ensembles for Efficient Uncertainty Estimation. ICLR 2023.
"""

from __future__ import annotations

import math

import keras
import tensorflow as tf

from tfp_seg import _checks, metrics, protocols
from tfp_seg.models import _spatial, sampling

__all__ = ["EnsembleSegmenter"]


def _tile_members(value, ensemble_size: int):
    """Tile every tensor of a structure M times along the batch axis (None stays None)."""

    def tile(t):
        if t is None:
            return None
        t = tf.convert_to_tensor(t)
        if t.shape.rank == 0:
            return t
        return tf.tile(t, [ensemble_size] + [1] * (t.shape.rank - 1))

    return None if value is None else keras.tree.map_structure(tile, value)


def _members_as_samples(draws: tf.Tensor, ensemble_size: int) -> tf.Tensor:
    """Draws `[k, M*B, ...]` (member-major rows) -> samples `[k*M, B, ...]` with sample
    `n = d*M + j` the d-th draw of member j (rows are laid out [k][M][B]: a reshape)."""
    shape = tf.shape(draws)
    return tf.reshape(
        draws, tf.concat([[shape[0] * ensemble_size, shape[1] // ensemble_size], shape[2:]], 0)
    )


@keras.saving.register_keras_serializable(package="tfp_seg")
class EnsembleSegmenter(sampling.Sampler, keras.Model):
    """M ensemble members in one backbone + one distribution head (see the module docstring).

    Args:
      backbone: a Keras model/layer `images [B, *S, channels] -> features [M*B, *S, F]`
        (member-major) with an int `ensemble_size` M, e.g.
        `tfp_seg.models.UNet(ensemble="batch", ensemble_size=4)`.
      head: a distribution head layer (`tfp_seg.protocols.Head`), shared by the members.
      validate_inputs: fail at run time on NaN/Inf images.

    #### Examples

    ```python
    model = tfp_seg.models.EnsembleSegmenter(
        tfp_seg.models.UNet(base_filters=16, depth=3, ensemble="batch", ensemble_size=4),
        tfp_seg.layers.LowRankLogits(num_classes=3, rank=10))
    model.compile(optimizer="adam", loss="auto")    # the head's NLL, for every member
    model.fit(images, labels, epochs=5)
    samples = model.sample_logits(images, num_samples=8)  # ==> [8, B, H, W, 3], 2 per member
    probs = model.predict_proba(images, num_samples=16)   # ==> [B, H, W, 3]
    ```
    """

    _supports_antithetic = False

    def __init__(self, backbone, head, validate_inputs: bool = True, **kwargs):
        super().__init__(**kwargs)
        if not (isinstance(head, protocols.Head) and isinstance(head, keras.layers.Layer)):
            raise ValueError(
                "`head` must be a distribution head layer (a keras Layer that is a "
                "tfp_seg.protocols.Head, e.g. a tfp_seg.layers.DistributionHead); got "
                f"{type(head).__name__}."
            )
        if not callable(backbone):
            raise ValueError(f"`backbone` must be a callable Keras model; got {backbone!r}.")
        _spatial.check_backbone_rank(backbone, head.spatial_dims, f"The head {type(head).__name__}")
        size = getattr(backbone, "ensemble_size", None)
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(
                "`backbone` must be an ensemble backbone with an int `ensemble_size` >= 1 "
                "whose features are the members' [M*B, *S, F], e.g. "
                f"tfp_seg.models.UNet(ensemble='batch', ensemble_size=4); got "
                f"{type(backbone).__name__} with ensemble_size={size!r}."
            )
        self.backbone = backbone
        self.member_head = head
        self.validate_inputs = bool(validate_inputs)

    @property
    def num_classes(self) -> int:
        """C, the number of classes of the members' head."""
        return self.member_head.num_classes

    @property
    def ensemble_size(self) -> int:
        """M, the members (the backbone's `ensemble_size`)."""
        return int(self.backbone.ensemble_size)

    @property
    def spatial_dims(self) -> int:
        """2 (images) or 3 (volumes): the head's `spatial_dims`."""
        return self.member_head.spatial_dims

    def build(self, input_shape):
        input_shape = tuple(input_shape)
        _spatial.check_input_rank(input_shape, self.spatial_dims)
        if not self.backbone.built:
            self.backbone.build(input_shape)
        feature_shape = tuple(self.backbone.compute_output_shape(input_shape))
        if not self.member_head.built:
            self.member_head.build(feature_shape)
        self.built = True

    def call(self, inputs, training=None):
        inputs = tf.convert_to_tensor(inputs)
        if not inputs.dtype.is_floating:
            inputs = tf.cast(inputs, self.compute_dtype)
        s = self.spatial_dims
        _spatial.check_input_rank(inputs.shape, s)
        if self.validate_inputs:
            inputs = _checks.assert_finite(inputs, "inputs")
        features = self.backbone(inputs, training=training)
        form = _spatial.input_form(s, "F", "M*B")
        _spatial.check_feature_rank(features, s, f"{form} member")
        m, batch = self.ensemble_size, inputs.shape[0]
        if batch is not None and features.shape[0] is not None and features.shape[0] != m * batch:
            raise ValueError(
                f"The backbone must return the features of its {m} members, {form} "
                f"(M*B = {m * batch}); got {tuple(features.shape)}."
            )
        _spatial.check_resolution(inputs, features, s)
        return self.member_head(features)

    def member_params(self, x, training: bool = False) -> tf.Tensor:
        """Every member's head parameters for images `x`: `[M, B, *S, P]`."""
        params = self(x, training=training)
        return _members_as_samples(params[tf.newaxis], self.ensemble_size)

    # --- training ----------------------------------------------------------------------------
    def compile(self, optimizer="adam", loss="auto", **kwargs):
        """`loss="auto"` uses the head's negative log-likelihood (`head.default_loss()`),
        applied to every member against the same labels. Streaming metrics of
        `tfp_seg.metrics` get the head (`tfp_seg.metrics.bind_head`) and score each member's
        predictive distribution (averaged over members), not the ensemble's."""
        if isinstance(loss, str) and loss == "auto":
            loss = self.member_head.default_loss()
        for key in ("metrics", "weighted_metrics"):
            if kwargs.get(key) is not None:
                metrics.bind_head(kwargs[key], self.member_head)
        super().compile(optimizer=optimizer, loss=loss, **kwargs)

    def compile_from_config(self, config):
        # `compile` is overridden (loss="auto"), so Keras leaves restoring it to us.
        config = keras.saving.deserialize_keras_object(config)
        self.compile(**config)
        if getattr(self, "optimizer", None) is not None and self.built:
            self.optimizer.build(self.trainable_variables)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        """The loss of every member against the same labels: `y` and `sample_weight` tiled M
        times along the batch, as the members' rows of `y_pred`."""
        m = self.ensemble_size
        return super().compute_loss(
            x=x,
            y=_tile_members(y, m),
            y_pred=y_pred,
            sample_weight=_tile_members(sample_weight, m),
            training=training,
        )

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        m = self.ensemble_size
        return super().compute_metrics(
            x, _tile_members(y, m), y_pred, sample_weight=_tile_members(sample_weight, m)
        )

    # --- probabilistic read-outs -------------------------------------------------------------
    @property
    def default_num_samples(self) -> int:
        """The smallest multiple of M that is >= 16."""
        m = self.ensemble_size
        return m * math.ceil(sampling.DEFAULT_NUM_SAMPLES / m)

    def _num_samples_arg(self, num_samples, antithetic: bool = False) -> int:
        n = super()._num_samples_arg(num_samples, antithetic)
        m = self.ensemble_size
        if n % m:
            raise ValueError(
                f"`num_samples` must be a multiple of ensemble_size = {m} (N = M x draws per "
                f"member: sample n is draw n // M of member n mod M); got {n}."
            )
        return n

    def _sample_logits_tensor(self, images, num_samples: int, seed=None, antithetic=False):
        return self.sample_logits_tensor(images, num_samples, seed=seed)

    def _sample_labels_tensor(self, images, num_samples: int, seed=None, antithetic=False):
        m = self.ensemble_size
        draws = -(-num_samples // m)
        labels = self.member_head.sample_labels(
            self(images, training=False), draws, seed=seed, antithetic=False
        )
        return _members_as_samples(labels, m)[:num_samples]

    def _mean_probabilities(self, images, num_samples: int, seed=None) -> tf.Tensor:
        # The head's own estimator per member (antithetic pairs for SSN when N / M is even),
        # averaged over the members with equal weights.
        m = self.ensemble_size
        params = self(images, training=False)
        probs = self.member_head.mean_probabilities(
            params, num_samples=max(1, num_samples // m), seed=seed
        )
        return tf.reduce_mean(_members_as_samples(probs[tf.newaxis], m), axis=0)

    # --- graph sampler (tfp_seg.protocols.GraphSampler: what the exporters trace) -----------
    def sample_logits_tensor(self, images, num_samples: int, seed=None) -> tf.Tensor:
        """Logit samples `[N, B, *S, C]` (float32) in graph-safe ops: sample n is draw
        n // M of member n mod M (`ceil(N / M)` head draws per member, the first N kept: a
        multiple of M gives every member the same share); `seed` None or a `[2]` seed."""
        m = self.ensemble_size
        draws = -(-int(num_samples) // m)
        samples = self.member_head.sample_logits(
            self(images, training=False), draws, seed=seed, antithetic=False
        )
        return tf.cast(_members_as_samples(samples, m)[:num_samples], tf.float32)

    def mean_logits_tensor(self, images) -> tf.Tensor:
        """The mean of the members' mean logits, `[B, *S, C]` (float32)."""
        logits = self.member_head.mean_logits(self(images, training=False))
        return tf.reduce_mean(_members_as_samples(logits[tf.newaxis], self.ensemble_size), 0)

    def params_tensors(self, images) -> dict:
        """Exported `params`: `mean_logits [B, *S, C]` (as `mean_logits_tensor`) and every
        member's head parameters `member_params [B, M, *S, P]` (batch first, as every
        exported output)."""
        m = self.ensemble_size
        params = self(images, training=False)
        logits = _members_as_samples(self.member_head.mean_logits(params)[tf.newaxis], m)
        members = _members_as_samples(params[tf.newaxis], m)  # [M, B, *S, P]
        return {
            "mean_logits": tf.reduce_mean(logits, axis=0),
            "member_params": tf.transpose(members, [1, 0, *range(2, members.shape.rank)]),
        }

    # --- config ------------------------------------------------------------------------------
    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "backbone": keras.saving.serialize_keras_object(self.backbone),
                "head": keras.saving.serialize_keras_object(self.member_head),
                "validate_inputs": self.validate_inputs,
            }
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        backbone = keras.saving.deserialize_keras_object(config.pop("backbone"))
        head = keras.saving.deserialize_keras_object(config.pop("head"))
        return cls(backbone, head, **config)
