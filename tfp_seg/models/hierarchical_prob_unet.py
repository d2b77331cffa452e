"""`HierarchicalProbabilisticUNet`: a conditional VAE with a hierarchy of spatial latents
(Kohl et al., 2019), on the training, sampling and export machinery of `ProbabilisticUNet`."""

from __future__ import annotations

from typing import Optional, Sequence

import keras
import tensorflow as tf

from tfp_seg import _checks
from tfp_seg import distributions as dists
from tfp_seg.layers.hierarchical_latent import HierarchicalLatent, SpatialLatentInjection
from tfp_seg.losses.elbo import GECO
from tfp_seg.models.prob_unet import ProbabilisticUNet, unet_levels
from tfp_seg.models.unet import UNet

__all__ = ["HierarchicalProbabilisticUNet"]

_DEFAULT_ENCODER_FILTERS = (32, 64, 128, 192, 192)


@keras.saving.register_keras_serializable(package="tfp_seg")
class HierarchicalProbabilisticUNet(ProbabilisticUNet):
    """A U-Net whose logits depend on a hierarchy of spatial Gaussian latents.

    #### Mathematical Details

    ```none
    features  = backbone(x)                                        [B, *S, F]  (once)
    prior     p(z_j | z_<j, x)     = N(mu_j, diag(sigma_j^2))      prior_net's decoder, level j
    posterior q(z_j | z_<j, x, y)  = N(...)                        posterior_net's decoder
    g(z, x)   = the prior net's decoder at the input resolution, fed z   [B, *S, filters[0]]
    logits    eta(z) = f_comb([features, g(z, x)])                 1x1 convolutions
    training  loss = mean_b [ CE(y, eta(z_q)) + beta * sum_j KL(q_j || p_j) ],  z_q ~ q
              (each level's KL analytic, at the posterior's draws of the coarser levels)
    inference z_j ~ p(z_j | z_<j, x) level by level; model(x) = eta(the mean path)
    ```

    Level j of `latent_levels` is a grid `S_j` (the input pooled `len(encoder_filters) - 1 - j`
    times, coarsest first) with `latent_dim` channels per cell; a cell's prior depends on the
    image and on every coarser draw, so neighbouring cells are not independent, and the prior
    net's 3x3 decoder convolutions after each level read a neighbourhood of latents (the
    global latent of `ProbabilisticUNet` sets every object's mode with one vector). Sampling N
    segmentations runs the backbone and the prior net's encoder once and the prior decoder and
    `f_comb` on the N draws (folded into the batch).

    Everything else is `ProbabilisticUNet`'s: `fit` on `(image, label)` pairs or label sets
    `[B, K, *S]` (each rater its own posterior draw), `compile` without a loss, logged `loss`,
    `reconstruction`, `kl` (the sum over levels), GECO, the read-outs (`sample`,
    `predict_proba`, `sample_logits`), `tfp_seg.export` (its sampling is graph-safe ops).
    `prior(x)` and `posterior(x, y)` are the levels' Gaussians packed along the mean path of
    the coarser levels (`HierarchicalLatent.distribution`); the joint is not Gaussian.

    Args:
      num_classes: C (>= 2).
      latent_dim: latent channels per cell and level (the reference: 1).
      latent_levels: levels with latents, the coarsest first (the reference: 3).
      beta: KL weight (see `ProbabilisticUNet`).
      backbone: `images [B, *S, channels] -> features [B, *S, F]`; default
        `tfp_seg.models.UNet(spatial_dims=spatial_dims)`.
      encoder_filters: channels of the prior / posterior nets' levels; default the backbone's
        levels plus one coarser level for a `UNet`, else (32, 64, 128, 192, 192). Inputs'
        spatial sizes must be multiples of `2**(len(encoder_filters) - 1)`.
      encoder_convs_per_block: 3x3 convolutions per block of those nets.
      fcomb_filters, num_fcomb_convs: the size of `f_comb` (as `ProbabilisticUNet`).
      reconstruction, geco, ignore_label, class_weights: the ELBO's (see `ProbabilisticUNet`).
      epsilon, validate_inputs, spatial_dims: as `ProbabilisticUNet`.

    #### Examples

    ```python
    model = tfp_seg.models.HierarchicalProbabilisticUNet(
        num_classes=3, backbone=tfp_seg.models.UNet(base_filters=16, depth=3))
    model.compile(optimizer="adam")
    model.fit(dataset, epochs=5)        # (image, label) pairs; logs loss, reconstruction, kl
    model.sample(images, 8)             # ==> [8, B, H, W] label maps
    ```

    #### References

    [1] Kohl et al. A Hierarchical Probabilistic U-Net for Modeling Multi-Scale Ambiguities.
        arXiv:1905.13077, 2019.
    """

    def __init__(
        self,
        num_classes: int,
        latent_dim: int = 1,
        latent_levels: int = 3,
        beta: float = 1.0,
        backbone=None,
        encoder_filters: Optional[Sequence[int]] = None,
        encoder_convs_per_block: int = 2,
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
        self.latent_levels = _checks.positive_int(latent_levels, "latent_levels")
        if encoder_filters is None:
            if backbone is None:
                backbone = UNet(spatial_dims=_checks.check_spatial_dims(spatial_dims))
            levels = unet_levels(backbone)
            encoder_filters = levels + levels[-1:] if levels else list(_DEFAULT_ENCODER_FILTERS)
        super().__init__(
            num_classes,
            latent_dim=latent_dim,
            beta=beta,
            backbone=backbone,
            encoder_filters=encoder_filters,
            encoder_convs_per_block=encoder_convs_per_block,
            fcomb_filters=fcomb_filters,
            num_fcomb_convs=num_fcomb_convs,
            reconstruction=reconstruction,
            geco=geco,
            ignore_label=ignore_label,
            class_weights=class_weights,
            epsilon=epsilon,
            validate_inputs=validate_inputs,
            spatial_dims=spatial_dims,
            **kwargs,
        )

    def _make_latent_layers(self, num_classes: int, latent_dim: int, epsilon: float) -> None:
        kwargs = dict(
            latent_dim=latent_dim,
            filters=self.encoder_filters,
            latent_levels=self.latent_levels,
            convs_per_block=self.encoder_convs_per_block,
            epsilon=epsilon,
            spatial_dims=self.spatial_dims,
        )
        self.prior_net = HierarchicalLatent(decode_to_full=True, name="prior_net", **kwargs)
        self.posterior_net = HierarchicalLatent(
            decode_to_full=False, name="posterior_net", **kwargs
        )
        self.f_comb = SpatialLatentInjection(
            num_classes,
            filters=self.fcomb_filters,
            num_convs=self.num_fcomb_convs,
            spatial_dims=self.spatial_dims,
            name="f_comb",
        )

    # --- building ------------------------------------------------------------------------------
    def _latent_shape(self, input_shape) -> tuple:
        """`f_comb` combines the features with the prior decoder's output `[B, *S, G]`."""
        return tuple(self.prior_net.compute_output_shape(input_shape))

    # --- forward pieces ------------------------------------------------------------------------
    def _prepare_images(self, images, name: str = "inputs"):
        images = super()._prepare_images(images, name)
        self.prior_net.check_input_shape(images.shape, name)
        return images

    def call(self, inputs, training=None):
        """Images `[B, *S, channels]` -> logits on the prior's mean path `[B, *S, C]`."""
        images = self._prepare_images(inputs)
        features = self._features(images, training=training)
        g = self.prior_net.decode(self.prior_net.encode(images), mean=True)[2]
        return self.f_comb(features, g)

    def elbo_terms(self, images, labels, training: bool = False, seed=None) -> dict:
        """The ELBO's terms (see `ProbabilisticUNet.elbo_terms`); `kl` sums the levels."""
        images = self._prepare_images(images, "images")
        features = self._features(images, training=training)
        prior_levels = self.prior_net.encode(images)
        labels = tf.convert_to_tensor(labels)
        if self._is_label_set(images, labels):
            labels, (images, features, prior_levels) = self._rater_pairs(
                labels, images, features, prior_levels
            )
        posterior_levels = self.posterior_net.encode(self._posterior_inputs(images, labels))
        posterior_params, z, _ = self.posterior_net.decode(posterior_levels, seed=seed)
        prior_params, _, g = self.prior_net.decode(prior_levels, z=z)
        logits = self.f_comb(features, g)
        return self.elbo(
            labels,
            logits,
            self.posterior_net.distribution(posterior_params),
            self.prior_net.distribution(prior_params),
            training=training,
        )

    # --- distributions -------------------------------------------------------------------------
    def prior(self, x):
        """The prior's levels along its mean path, packed (`HierarchicalLatent.distribution`)."""
        images = self._prepare_images(x, "x")
        params = self.prior_net.decode(self.prior_net.encode(images), mean=True)[0]
        return self.prior_net.distribution(params)

    def posterior(self, x, y):
        """The posterior's levels along its mean path, packed, for label maps `y [B, *S]`."""
        images = self._prepare_images(x, "x")
        levels = self.posterior_net.encode(self._posterior_inputs(images, y))
        return self.posterior_net.distribution(self.posterior_net.decode(levels, mean=True)[0])

    def reconstruct(self, x, y) -> tf.Tensor:
        """Logits `[B, *S, C]` with the prior decoder fed the posterior's mean path."""
        images = self._prepare_images(x, "x")
        features = self._features(images, training=False)
        levels = self.posterior_net.encode(self._posterior_inputs(images, y))
        z = self.posterior_net.decode(levels, mean=True)[1]
        g = self.prior_net.decode(self.prior_net.encode(images), z=z)[2]
        return self.f_comb(features, g)

    def _sample_logits_tensor(
        self, xb, num_samples: int, seed=None, antithetic: bool = False
    ) -> tf.Tensor:
        num_samples = dists.check_num_samples(num_samples, antithetic=antithetic)
        images = self._prepare_images(xb, "x")
        features = self._features(images, training=False)
        s = self.spatial_dims
        levels = [
            tf.tile(t, [num_samples] + [1] * (s + 1)) for t in self.prior_net.encode(images)
        ]  # rows n * B + b
        g = self.prior_net.decode(levels, seed=seed, antithetic=antithetic)[2]
        return self.f_comb.sample_logits(features, g)

    # --- config --------------------------------------------------------------------------------
    def get_config(self):
        config = super().get_config()
        config["latent_levels"] = self.latent_levels
        return config
