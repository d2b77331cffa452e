"""`ProbabilisticUNet`: the Probabilistic U-Net (Kohl et al., 2018) as a Keras model."""

from __future__ import annotations

from typing import Optional, Sequence

import keras
import tensorflow as tf

from tfp_seg import _checks
from tfp_seg.layers.latent import LatentEncoder, LatentInjection, one_hot_labels
from tfp_seg.losses.elbo import ELBO, GECO
from tfp_seg.models import _spatial, sampling
from tfp_seg.models.unet import UNet

__all__ = ["ProbabilisticUNet"]

_DEFAULT_ENCODER_FILTERS = (32, 64, 128, 192)


def unet_levels(backbone) -> list:
    """The channels of a `UNet` backbone's levels (`base_filters * multiplier**l`, l = 0..depth);
    empty for any other backbone."""
    if not isinstance(backbone, UNet):
        return []
    return [
        backbone.base_filters * backbone.filters_multiplier**level
        for level in range(backbone.depth + 1)
    ]


@keras.saving.register_keras_serializable(package="tfp_seg")
class ProbabilisticUNet(sampling.Sampler, keras.Model):
    """A U-Net whose logits depend on a low-dimensional Gaussian latent: a conditional VAE.

    #### Mathematical Details

    ```none
    features  = backbone(x)                                   [B, *S, F]  (computed once)
    prior     p(z | x)    = N(mu_p(x),    diag(sigma_p^2))    prior_net(x)
    posterior q(z | x, y) = N(mu_q(x, y), diag(sigma_q^2))    posterior_net([x, onehot(y)])
    logits    eta(z)      = f_comb([features, tile_S(z)])     [B, *S, C]
    training  loss = mean_b [ CE(y, eta(z_q)) + beta * KL(q || p) ],  z_q ~ q    (losses.ELBO)
    inference samples eta(z_n), z_n ~ p(z | x); model(x) = eta(mu_p(x))
    ```

    `S = (H, W)` for images `x [B, H, W, channels]` (`spatial_dims=2`, the default) or
    `(D, H, W)` for volumes `x [B, D, H, W, channels]` (`spatial_dims=3`: the prior and
    posterior nets are 3D encoders pooled over D, H and W, z is broadcast over every voxel,
    and the default backbone is `UNet(spatial_dims=3)`); one code path serves both. A
    backbone that states another rank is a `ValueError`. Configs without `spatial_dims`
    (files saved before volumes) load as 2D.

    `fit` takes `(image, label)` pairs (labels int `[B, *S]`, or label sets `[B, K, *S]` of K
    raters per image): the model trains with its own `train_step` on the ELBO (no `loss` in
    `compile`) and logs `loss`, `reconstruction` and `kl` separately per epoch (plus
    `geco_multiplier` with GECO); validation (`test_step`) scores the same ELBO with the
    posterior, without updating GECO. A `kl` that falls to ~0 while `reconstruction` stalls
    means posterior collapse: lower `beta`, or use GECO.
    `model(images)` / `predict` return the logits at the prior mean `[B, *S, C]`. Sampling `N`
    segmentations evaluates the backbone and the prior net once and only `f_comb` on the `N`
    latents (folded into the batch). TensorFlow backend only.

    Label sets: the posterior `q(z | x, y)` is conditioned on one map, so a set `[B, K, *S]`
    is scored as the K pairs `(x_b, y_bk)`, each rater's ELBO term with its own posterior
    sample, averaged over raters and images:

    ```none
    loss = (1/B) sum_b (1/K) sum_k [ rec(y_bk | f_comb(x_b, z_bk))
                                      + beta KL(q(z | x_b, y_bk) || p(z | x_b)) ]
    z_bk ~ q(z | x_b, y_bk)
    ```

    This is the ELBO of a batch holding every (image, rater) pair, but the backbone and the
    prior net run once per image (their outputs are repeated K times), not K times. A map
    entirely `ignore_label` still adds its KL term (use label sets without missing raters).

    Args:
      num_classes: C (>= 2).
      latent_dim: L (the paper uses 6).
      beta: KL weight of the ELBO (`tfp_seg.losses.ELBO`): 1 is the ELBO; larger values
        push the posterior towards the prior (less information in z, risk of collapse), smaller
        values let the posterior encode more than the prior can predict.
      backbone: `images [B, *S, channels] -> features [B, *S, F]` at the input resolution;
        default `tfp_seg.models.UNet(spatial_dims=spatial_dims)`.
      encoder_filters: channels of the prior/posterior nets' blocks; default the backbone's
        levels (`base_filters * multiplier**l`) for a `UNet`, else (32, 64, 128, 192).
      encoder_convs_per_block: 3x3 convolutions per encoder block (reference: 3).
      fcomb_filters: channels of f_comb's hidden 1x1 convs; default the backbone's output
        channels for a `UNet`, else 32.
      num_fcomb_convs: hidden 1x1 convolutions in f_comb (reference: 3).
      reconstruction: `"sum"` (default: cross-entropy summed over pixels, as the reference)
        or `"mean"` (per pixel); see `ELBO`.
      geco: optional `tfp_seg.losses.GECO` replacing the fixed reconstruction weight by a
        Lagrange multiplier for `reconstruction <= target`.
      ignore_label, class_weights: see `ELBO`.
      epsilon: added to the latent standard deviations (`softplus(raw) + epsilon`).
      validate_inputs: fail at run time on NaN/Inf images.
      spatial_dims: 2 (images, default) or 3 (volumes).

    #### Examples

    ```python
    model = tfp_seg.models.ProbabilisticUNet(
        num_classes=3, latent_dim=6, backbone=tfp_seg.models.UNet(base_filters=16, depth=3))
    model.compile(optimizer="adam")
    model.fit(dataset, epochs=5)        # (image, label) pairs; logs loss, reconstruction, kl
    model.predict(images)               # ==> [B, H, W, 3], prior-mean logits
    model.sample(images, 8)             # ==> [8, B, H, W] label maps
    model.predict_proba(images, 16)     # ==> [B, H, W, 3]
    volumes = tfp_seg.models.ProbabilisticUNet(     # images [B, D, H, W, channels]
        num_classes=4, spatial_dims=3,
        backbone=tfp_seg.models.UNet(base_filters=8, depth=2, spatial_dims=3))
    ```

    #### References

    [1] Kohl et al. A Probabilistic U-Net for Segmentation of Ambiguous Images. NeurIPS 2018.
    """

    def __init__(
        self,
        num_classes: int,
        latent_dim: int = 6,
        beta: float = 1.0,
        backbone=None,
        encoder_filters: Optional[Sequence[int]] = None,
        encoder_convs_per_block: int = 3,
        fcomb_filters: Optional[int] = None,
        num_fcomb_convs: int = 3,
        reconstruction: str = "sum",
        geco: Optional[GECO] = None,
        ignore_label: Optional[int] = None,
        class_weights: Optional[Sequence[float]] = None,
        epsilon: float = 1e-4,
        validate_inputs: bool = True,
        spatial_dims: int = 2,
        **kwargs,
    ):
        super().__init__(**kwargs)
        num_classes = _checks.positive_int(num_classes, "num_classes", minimum=2)
        self.spatial_dims = _checks.check_spatial_dims(spatial_dims)
        if backbone is None:
            backbone = UNet(spatial_dims=self.spatial_dims)
        if not callable(backbone):
            raise ValueError(f"`backbone` must be a callable Keras model; got {backbone!r}.")
        _spatial.check_backbone_rank(backbone, self.spatial_dims, "ProbabilisticUNet")
        if encoder_filters is None:
            levels = unet_levels(backbone)
            encoder_filters = levels if levels else list(_DEFAULT_ENCODER_FILTERS)
        if fcomb_filters is None:
            fcomb_filters = backbone.output_channels if isinstance(backbone, UNet) else 32
        if isinstance(geco, dict):
            geco = keras.saving.deserialize_keras_object(geco)
        self.num_classes = num_classes
        self.latent_dim = latent_dim
        self.encoder_filters = [int(f) for f in encoder_filters]
        self.encoder_convs_per_block = encoder_convs_per_block
        self.fcomb_filters = fcomb_filters
        self.num_fcomb_convs = num_fcomb_convs
        self.epsilon = float(epsilon)
        self.validate_inputs = bool(validate_inputs)

        # === Layers ===
        self.backbone = backbone
        self._make_latent_layers(num_classes, latent_dim, epsilon)

        # === Loss (the GECO layer is an attribute so that its state is saved) ===
        self.elbo = ELBO(
            beta=beta,
            reconstruction=reconstruction,
            geco=geco,
            ignore_label=ignore_label,
            class_weights=class_weights,
        )
        self.geco = self.elbo.geco

        # === Metrics (returned by train_step / test_step, reset every epoch) ===
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.reconstruction_tracker = keras.metrics.Mean(name="reconstruction")
        self.kl_tracker = keras.metrics.Mean(name="kl")
        self.geco_tracker = (
            keras.metrics.Mean(name="geco_multiplier") if self.geco is not None else None
        )

    def _make_latent_layers(self, num_classes: int, latent_dim: int, epsilon: float) -> None:
        """Create `prior_net`, `posterior_net` and `f_comb` (a subclass's latent space)."""
        encoder_kwargs = dict(
            latent_dim=latent_dim,
            filters=self.encoder_filters,
            convs_per_block=self.encoder_convs_per_block,
            epsilon=epsilon,
            spatial_dims=self.spatial_dims,
        )
        self.prior_net = LatentEncoder(name="prior_net", **encoder_kwargs)
        self.posterior_net = LatentEncoder(name="posterior_net", **encoder_kwargs)
        self.f_comb = LatentInjection(
            num_classes,
            filters=self.fcomb_filters,
            num_convs=self.num_fcomb_convs,
            spatial_dims=self.spatial_dims,
            name="f_comb",
        )

    # --- properties ----------------------------------------------------------------------------
    @property
    def beta(self) -> float:
        """The KL weight of the ELBO (`tfp_seg.losses.ELBO.beta`)."""
        return self.elbo.beta

    @property
    def metrics(self):
        trackers = [self.loss_tracker, self.reconstruction_tracker, self.kl_tracker]
        if self.geco_tracker is not None:
            trackers.append(self.geco_tracker)
        return trackers

    # --- building ------------------------------------------------------------------------------
    def build(self, input_shape):
        input_shape = tuple(input_shape)
        _spatial.check_input_rank(input_shape, self.spatial_dims)
        if input_shape[-1] is None:
            raise ValueError("`inputs` must have a known channel count (last axis).")
        if not self.backbone.built:
            self.backbone.build(input_shape)
        feature_shape = tuple(self.backbone.compute_output_shape(input_shape))
        if not self.prior_net.built:
            self.prior_net.build(input_shape)
        if not self.posterior_net.built:
            self.posterior_net.build(input_shape[:-1] + (input_shape[-1] + self.num_classes,))
        if not self.f_comb.built:
            self.f_comb.build(feature_shape, self._latent_shape(input_shape))
        self.built = True

    def _latent_shape(self, input_shape) -> tuple:
        """The shape of what `f_comb` combines with the features: `z [B, L]`."""
        return (input_shape[0], self.latent_dim)

    # --- forward pieces ------------------------------------------------------------------------
    def _prepare_images(self, images, name: str = "inputs"):
        images = tf.convert_to_tensor(images)
        if not images.dtype.is_floating:
            images = tf.cast(images, self.compute_dtype)
        _spatial.check_input_rank(images.shape, self.spatial_dims, name)
        if self.validate_inputs:
            images = _checks.assert_finite(images, name)
        if not self.built:
            # fit() without a tf.distribute strategy defers building to the first traced
            # train_step, which calls the sublayers directly: build (and record the input
            # shape for `.keras` loading) here, eagerly (creating variables while tracing is
            # several times slower).
            with tf.init_scope():
                self.build(tuple(images.shape))
        return images

    def _features(self, images, training=None):
        features = self.backbone(images, training=training)
        _spatial.check_feature_rank(features, self.spatial_dims)
        _spatial.check_resolution(images, features, self.spatial_dims)
        return features

    def _posterior_inputs(self, images, labels):
        s = self.spatial_dims
        onehot = one_hot_labels(labels, self.num_classes, self.elbo.ignore_label, s)
        want, got = images.shape[: s + 1], onehot.shape[: s + 1]
        if want.is_fully_defined() and got.is_fully_defined() and want != got:
            raise ValueError(
                f"`labels` shape {tuple(got)} must equal the {_checks.spatial_form(s)} of the "
                f"images {tuple(images.shape)}."
            )
        return tf.concat([images, tf.cast(onehot, images.dtype)], axis=-1)

    def _is_label_set(self, images, labels) -> bool:
        """A label set `[B, K, *S]` (not maps `[B, *S]` or `[B, *S, 1]`), told by its shape:
        rank `s + 2` and trailing axes equal to the images' `S` (when static; else a last
        axis other than 1)."""
        s = self.spatial_dims
        if labels.shape.rank != s + 2:
            return False
        spatial, trailing = images.shape[1 : s + 1], labels.shape[2:]
        if spatial.is_fully_defined() and trailing.is_fully_defined():
            return tuple(trailing) == tuple(spatial)
        return labels.shape[-1] != 1

    def call(self, inputs, training=None):
        """Images `[B, *S, channels]` -> logits at the prior mean `[B, *S, C]` (float32)."""
        images = self._prepare_images(inputs)
        features = self._features(images, training=training)
        prior_params = self.prior_net(images, training=training)
        return self.f_comb(features, self.prior_net.mean(prior_params), training=training)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.num_classes,)

    def elbo_terms(self, images, labels, training: bool = False, seed=None) -> dict:
        """The ELBO's terms for a batch: `{"loss", "reconstruction", "kl", ...}` (scalars).

        One reparameterised posterior sample per image (as the reference), or per (image,
        rater) pair for label sets `[B, K, *S]` (see the class docstring). With
        `training=True` the backbone runs in training mode and GECO's state is updated.
        """
        images = self._prepare_images(images, "images")
        features = self._features(images, training=training)
        prior_params = self.prior_net(images, training=training)
        labels = tf.convert_to_tensor(labels)
        if self._is_label_set(images, labels):
            labels, (images, features, prior_params) = self._rater_pairs(
                labels, images, features, prior_params
            )
        posterior_params = self.posterior_net(
            self._posterior_inputs(images, labels), training=training
        )
        z = self.posterior_net.sample(posterior_params, 1, seed=seed)[0]
        logits = self.f_comb(features, z, training=training)
        return self.elbo(
            labels,
            logits,
            self.posterior_net.distribution(posterior_params),
            self.prior_net.distribution(prior_params),
            training=training,
        )

    @staticmethod
    def _rater_pairs(labels, *tensors):
        """A label set `[B, K, *S]` as the B*K pairs `(x_b, y_bk)`, rows `b*K + k`: the maps
        `[B*K, *S]` and each of `tensors` (or nested lists of them) repeated K times."""
        k = tf.shape(labels)[1]
        repeated = tf.nest.map_structure(lambda t: tf.repeat(t, k, axis=0), tensors)
        trailing = labels.shape[2:]
        maps = tf.reshape(labels, tf.concat([[-1], tf.shape(labels)[2:]], 0))
        maps.set_shape([None] + trailing.as_list())
        return maps, repeated

    # --- training ------------------------------------------------------------------------------
    def compile(self, optimizer="adam", loss=None, metrics=None, **kwargs):
        """Compile without a loss: the model trains on its ELBO (`beta`, `geco` at construction)."""
        if loss is not None and not (isinstance(loss, str) and loss == "auto"):
            raise ValueError(
                "ProbabilisticUNet trains on its own ELBO: call compile() without `loss` and set "
                f"`beta` / `geco` / `reconstruction` on the model; got loss={loss!r}."
            )
        if metrics:
            raise ValueError(
                "ProbabilisticUNet logs loss, reconstruction and kl itself; compile() takes no "
                f"`metrics`; got {metrics!r}."
            )
        super().compile(optimizer=optimizer, **kwargs)

    def compile_from_config(self, config):
        # `compile` is overridden, so Keras leaves restoring it to us.
        config = keras.saving.deserialize_keras_object(config)
        for key in ("loss", "metrics", "weighted_metrics", "loss_weights"):
            config.pop(key, None)
        self.compile(**config)
        if getattr(self, "optimizer", None) is not None and self.built:
            self.optimizer.build(self.trainable_variables)

    def _unpack(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        if y is None:
            raise ValueError(
                "ProbabilisticUNet trains on (image, label) pairs: the dataset must yield "
                f"(images {_spatial.input_form(self.spatial_dims)}, labels "
                f"{_checks.spatial_form(self.spatial_dims)})."
            )
        if sample_weight is not None:
            raise ValueError("ProbabilisticUNet does not support `sample_weight`.")
        return x, y

    def _record(self, terms, batch_size):
        self.loss_tracker.update_state(terms["loss"], sample_weight=batch_size)
        self.reconstruction_tracker.update_state(terms["reconstruction"], sample_weight=batch_size)
        self.kl_tracker.update_state(terms["kl"], sample_weight=batch_size)
        if self.geco_tracker is not None:
            self.geco_tracker.update_state(terms["geco_multiplier"])
        return {m.name: m.result() for m in self.metrics}

    def train_step(self, data):
        x, y = self._unpack(data)
        if not self.built:
            self._prepare_images(x)
        if self.optimizer is not None and not self.optimizer.built:
            with tf.init_scope():
                self.optimizer.build(self.trainable_variables)
        with tf.GradientTape() as tape:
            terms = self.elbo_terms(x, y, training=True)
            loss = terms["loss"]
            if self.losses:
                loss = loss + tf.add_n([tf.cast(r, tf.float32) for r in self.losses])
                terms = dict(terms, loss=loss)
            # Gradients are summed over replicas under tf.distribute: scale the batch mean.
            replicas = tf.distribute.get_strategy().num_replicas_in_sync
            scaled = loss / float(replicas) if replicas > 1 else loss
            if self.optimizer is not None:
                scaled = self.optimizer.scale_loss(scaled)
        variables = self.trainable_variables
        gradients = tape.gradient(scaled, variables)
        self.optimizer.apply(gradients, variables)
        return self._record(terms, tf.shape(x)[0])

    def test_step(self, data):
        x, y = self._unpack(data)
        terms = self.elbo_terms(x, y, training=False)
        return self._record(terms, tf.shape(x)[0])

    # --- distributions -------------------------------------------------------------------------
    def prior(self, x):
        """`p(z | x)`: `tfd.MultivariateNormalDiag`, batch `[B]`, event `[latent_dim]`."""
        images = self._prepare_images(x, "x")
        return self.prior_net.distribution(self.prior_net(images, training=False))

    def posterior(self, x, y):
        """`q(z | x, y)` for images `x` and label maps `y [B, *S]`."""
        images = self._prepare_images(x, "x")
        params = self.posterior_net(self._posterior_inputs(images, y), training=False)
        return self.posterior_net.distribution(params)

    def reconstruct(self, x, y) -> tf.Tensor:
        """Logits `[B, *S, C]` at the posterior mean `E[q(z | x, y)]` (a tf.Tensor)."""
        images = self._prepare_images(x, "x")
        features = self._features(images, training=False)
        params = self.posterior_net(self._posterior_inputs(images, y), training=False)
        return self.f_comb(features, self.posterior_net.mean(params), training=False)

    # --- probabilistic read-outs (prior samples) -----------------------------------------------
    def _sample_logits_tensor(
        self, xb, num_samples: int, seed=None, antithetic: bool = False
    ) -> tf.Tensor:
        images = self._prepare_images(xb, "x")
        features = self._features(images, training=False)
        prior_params = self.prior_net(images, training=False)
        z = self.prior_net.sample(prior_params, num_samples, seed=seed, antithetic=antithetic)
        return self.f_comb.sample_logits(features, z)

    # --- graph sampling (`tfp_seg.protocols.GraphSampler`: what `tfp_seg.export` traces) ------
    def sample_logits_tensor(self, images, num_samples: int, seed=None) -> tf.Tensor:
        """Prior samples of the logits `[N, B, *S, C]` (float32 tensor) for one batch of
        images, in graph-safe ops: independent draws, `seed` None (stateful random ops) or a
        shape-[2] int stateless seed. The read-outs (`sample_logits`, ...) batch this."""
        return self._sample_logits_tensor(images, num_samples, seed=seed)

    def mean_logits_tensor(self, images) -> tf.Tensor:
        """Logits at the prior mean `[B, *S, C]`: `model(images)` in inference mode."""
        return self(images, training=False)

    # --- config --------------------------------------------------------------------------------
    def get_config(self):
        config = super().get_config()
        elbo = self.elbo.get_config()
        config.update(
            {
                "num_classes": self.num_classes,
                "latent_dim": self.latent_dim,
                "beta": elbo["beta"],
                "backbone": keras.saving.serialize_keras_object(self.backbone),
                "encoder_filters": list(self.encoder_filters),
                "encoder_convs_per_block": self.encoder_convs_per_block,
                "fcomb_filters": self.fcomb_filters,
                "num_fcomb_convs": self.num_fcomb_convs,
                "reconstruction": elbo["reconstruction"],
                "geco": elbo["geco"],
                "ignore_label": elbo["ignore_label"],
                "class_weights": elbo["class_weights"],
                "epsilon": self.epsilon,
                "validate_inputs": self.validate_inputs,
                "spatial_dims": self.spatial_dims,
            }
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        backbone = keras.saving.deserialize_keras_object(config.pop("backbone"))
        geco = config.pop("geco", None)
        if geco is not None:
            geco = keras.saving.deserialize_keras_object(geco)
        return cls(backbone=backbone, geco=geco, **config)
