"""`MixtureLowRankLogits`: K low-rank (SSN) components with image-level weights (MoSE-style)."""

from __future__ import annotations

import math
from typing import Optional

import keras
import tensorflow as tf

from tfp_seg import _checks
from tfp_seg import distributions as dists
from tfp_seg.layers import _init
from tfp_seg.layers.base import DistributionHead
from tfp_seg.layers.low_rank_logits import _MASKED_RAW_DIAG, _TRANSFORMS, LowRankLogits

__all__ = ["MixtureLowRankLogits"]


@keras.saving.register_keras_serializable(package="tfp_seg")
class MixtureLowRankLogits(DistributionHead):
    """A mixture of K low-rank multivariate normal logits distributions per image.

    Discrete ambiguity (an object present or not, one of a few boundaries) is what a single
    Gaussian over logits represents poorly; here each mode is one low-rank Gaussian "expert"
    (the SSN covariance, `LowRankLogits`) and an image-conditioned gate weighs them, as in the
    Mixture of Stochastic Experts (Gao et al., 2023).

    #### Mathematical Details

    ```none
    params[b, *s] = [ component 0 (Q) | ... | component K-1 (Q) | a (K) ],   Q = C (2 + R)
    component k   = [ mu_k (C) | d_raw_k (C) | P_k (C*R, row-major as [C, R]) ]   (SSN layout)
    a             = W_g mean_s features[b] + b_g     the gate: global average pooling of the
                                                    features and a dense layer, the same
                                                    K values written at every pixel
    mixture_logits  = mean over pixels of the last K channels;   pi = softmax(mixture_logits)
    D_k = transform(d_raw_k) + epsilon
    eta | x ~ sum_k pi_k N(mu_k, P_k P_k^T + diag(D_k))   over the flattened prod(S)*C event
    sample: k ~ Categorical(pi) per image, then eta = mu_k + P_k z + sqrt(D_k) * eps
    ```

    with `S = (H, W)` for images and `(D, H, W)` for volumes (`spatial_dims=3`). So the layer
    still maps a feature map to ONE params tensor, `[B, *S, K * C * (2 + R) + K]`. Its default
    loss (`tfp_seg.losses.MixtureNLL`, `compile(loss="auto")`) is the negative log-likelihood

    ```none
    -log p(y | x) ~= -log sum_k pi_k (1/M) sum_m prod_i softmax(eta_(k,m),i)[y_i]
    ```

    with M samples of every component (logsumexp over components and samples), so every
    component and the gate get a gradient at every step.

    With an `roi_mask` (`[B, *S]` or `[B, *S, 1]`) every component's factor is zeroed and
    its diagonal set to `epsilon` outside the region, as in `LowRankLogits`.

    Trained by the likelihood alone from its symmetric start, the gate can collapse onto one
    component: the joint likelihood of a whole label map makes the components'
    responsibilities almost one-hot. On the built-in benchmark at the README's budget
    (`examples/compare_heads.py --epochs 30`, K = 3) the weights became 0.988 / 0.009 / 0.002
    for every test image, and the head scored as an SSN (README, "compare heads").

    Args:
      num_classes: C.
      num_components: K >= 1 (K = 1 is the SSN head with a constant gate).
      rank: R, the rank of every component's covariance factor.
      epsilon: added to the diagonals (SSN uses 1e-5).
      diagonal_transform: "exp" (SSN) or "softplus" maps `d_raw` to a positive variance.
      antithetic: default of `sample_logits` and of the loss: mirrored pairs about the
        component's mean (a pair shares its component).
      kernel_size, kernel_initializer, validate_args, spatial_dims: see `DistributionHead`
        (the kernel initializer also initialises the gate; its bias starts at 0: equal
        weights).
      factor_init_scale, initial_diagonal: where every component's covariance starts, as in
        `LowRankLogits`, but by default glorot's factor and `D = 1` (1, None): the small start
        that is `LowRankLogits`' default made the mixture worse on the built-in benchmark
        (`examples/compare_heads.py --epochs 12 --num-images 640 --image-size 64`: D2_GED
        0.49 against 0.38; benchmarks/README.md, "Model quality").

    #### Examples

    ```python
    head = tfp_seg.layers.MixtureLowRankLogits(num_classes=2, num_components=3, rank=10)
    params = head(features)                    # [B, H, W, 3 * 2 * (2 + 10) + 3]
    dist = head.distribution(params)           # MixtureSameFamily: batch [B], event [H, W, 2]
    samples = head.sample_logits(params, 16)   # [16, B, H, W, 2]
    head.mixture_weights(params)               # [B, 3]
    ```

    #### References

    [1] Zhitong Gao et al. Modeling Multimodal Aleatoric Uncertainty in Segmentation with
        Mixture of Stochastic Experts. ICLR 2023. https://arxiv.org/abs/2212.07328
    [2] Monteiro et al. Stochastic Segmentation Networks: Modelling Spatially Correlated
        Aleatoric Uncertainty. NeurIPS 2020.
    """

    likelihood = "mixture_low_rank_normal_logits"

    def __init__(
        self,
        num_classes: int,
        num_components: int = 3,
        rank: int = 10,
        epsilon: float = 1e-5,
        diagonal_transform: str = "exp",
        antithetic: bool = True,
        kernel_size: int = 1,
        kernel_initializer="glorot_uniform",
        validate_args: bool = True,
        spatial_dims: int = 2,
        factor_init_scale: float = 1.0,
        initial_diagonal: Optional[float] = None,
        **kwargs,
    ):
        super().__init__(
            num_classes,
            kernel_size=kernel_size,
            kernel_initializer=kernel_initializer,
            validate_args=validate_args,
            spatial_dims=spatial_dims,
            **kwargs,
        )
        self._num_components = _checks.positive_int(num_components, "num_components")
        self._rank = _checks.positive_int(rank, "rank")
        if not float(epsilon) > 0:
            raise ValueError(f"`epsilon` must be > 0; got {epsilon!r}.")
        if diagonal_transform not in _TRANSFORMS:
            raise ValueError(
                f"`diagonal_transform` must be one of {_TRANSFORMS}; got {diagonal_transform!r}."
            )
        self.epsilon = float(epsilon)
        self.diagonal_transform = diagonal_transform
        self.antithetic = bool(antithetic)
        self.factor_init_scale = _init.check_factor_init_scale(factor_init_scale)
        self.initial_diagonal = _init.check_initial_diagonal(initial_diagonal, self.epsilon)
        # The components' parameter functions (never its weights): kept out of Keras' layer
        # tracking, so it is neither saved nor counted as a sublayer.
        component = LowRankLogits(
            num_classes,
            rank=self._rank,
            epsilon=self.epsilon,
            diagonal_transform=diagonal_transform,
            antithetic=self.antithetic,
            validate_args=False,
            spatial_dims=self.spatial_dims,
            name=f"{self.name}_component",
        )
        object.__setattr__(self, "_component_head", component)
        self.projection = self._make_projection(self.num_components * self.component_size)
        self.gate = keras.layers.Dense(
            self.num_components,
            # A copy: an unseeded initializer object draws from one fixed seed per instance.
            kernel_initializer=keras.initializers.get(
                keras.initializers.serialize(self.kernel_initializer)
            ),
            bias_initializer="zeros",
            dtype="float32",
            name="gate",
        )

    @staticmethod
    def params_size_for(num_classes: int, num_components: int, rank: int) -> int:
        """Parameter channels per pixel: `K * C * (2 + R) + K` (components, gate)."""
        return num_components * LowRankLogits.params_size_for(num_classes, rank) + num_components

    @property
    def num_components(self) -> int:
        """K, the number of mixture components."""
        return self._num_components

    @property
    def rank(self) -> int:
        """R, the rank of every component's covariance factor."""
        return self._rank

    @property
    def component_size(self) -> int:
        """S = C (2 + R), the parameter channels of one component."""
        return LowRankLogits.params_size_for(self.num_classes, self.rank)

    @property
    def params_size(self) -> int:
        """P = `K * C * (2 + R) + K`, the parameter channels per pixel."""
        return self.params_size_for(self.num_classes, self.num_components, self.rank)

    def _projection_kernel_initializer(self):
        return _init.LowRankKernelInitializer(
            self.kernel_initializer,
            self.num_classes,
            self.rank,
            self.factor_init_scale,
            num_components=self.num_components,
        )

    def _bias_initializer(self):
        raw = _init.raw_diagonal_for(self.initial_diagonal, self.epsilon, self.diagonal_transform)
        return _init.LowRankBiasInitializer(
            self.num_classes, self.rank, raw, num_components=self.num_components
        )

    @property
    def component_head(self) -> LowRankLogits:
        """A weightless `LowRankLogits` with the components' configuration: the parameter
        functions of one component (`component_params` are its params)."""
        return self._component_head

    # --- parameter packing ---------------------------------------------------------------------
    @property
    def _spatial(self) -> list:
        """The spatial axes `1..spatial_dims` of `[B, *S, ...]`."""
        return list(range(1, 1 + self.spatial_dims))

    def _split(self, params):
        """`(components [B, *S, K, Q], gate channels [B, *S, K])`, Q = `component_size`."""
        params = self.check_params(params)
        k = self.num_components
        components, gate = tf.split(params, [k * self.component_size, k], axis=-1)
        return self._by_component(components), gate

    def _by_component(self, components):
        """`[B, *S, K*Q]` -> `[B, *S, K, Q]`."""
        s, k = self.spatial_dims, self.num_components
        shape = tf.concat([tf.shape(components)[: 1 + s], [k, self.component_size]], 0)
        return tf.reshape(components, shape)

    def _components_first(self, components):
        """`[B, *S, K, Q]` -> `[B, K, *S, Q]`."""
        s = self.spatial_dims
        return tf.transpose(components, [0, s + 1, *self._spatial, s + 2])

    def mixture_logits(self, params) -> tf.Tensor:
        """Unnormalised log weights `[B, K]`: the mean over pixels of the last K channels (the
        layer writes the same gate values at every pixel)."""
        _, gate = self._split(params)
        return tf.reduce_mean(gate, axis=self._spatial)

    def mixture_weights(self, params) -> tf.Tensor:
        """The mixture weights `pi = softmax(mixture_logits)`, `[B, K]`."""
        return tf.nn.softmax(self.mixture_logits(params), axis=-1)

    def component_params(self, params) -> tf.Tensor:
        """The components' packed `LowRankLogits` params `[B*K, *S, Q]`, component `k` of
        image `b` at row `b*K + k`."""
        components, _ = self._split(params)
        moved = self._components_first(components)  # [B, K, *S, Q]
        shape = tf.shape(moved)
        return tf.reshape(moved, tf.concat([[shape[0] * shape[1]], shape[2:]], 0))

    def _gate_at_every_pixel(self, gate, like):
        """`gate [B, K]` written at every pixel of `like [B, *S, ...]`: `[B, *S, K]`."""
        s = self.spatial_dims
        shape = tf.concat([tf.shape(like)[: 1 + s], [self.num_components]], 0)
        return tf.broadcast_to(tf.reshape(gate, [-1] + [1] * s + [self.num_components]), shape)

    def pack_mixture_params(self, component_params, mixture_logits) -> tf.Tensor:
        """Packed params `[B, *S, P]` from `component_params [B*K, *S, Q]` and
        `mixture_logits [B, K]` (written at every pixel): the inverse of `component_params`
        and `mixture_logits`."""
        k, s = self.num_components, self.spatial_dims
        component_params = tf.convert_to_tensor(component_params, tf.float32)
        mixture_logits = tf.convert_to_tensor(mixture_logits, tf.float32)
        _checks.check_rank(
            component_params, 2 + s, "component_params", self.spatial_form("Q", "B*K")
        )
        _checks.check_last_dim(
            component_params, self.component_size, "component_params", "C * (2 + R)"
        )
        _checks.check_rank(mixture_logits, 2, "mixture_logits", "[B, K]")
        _checks.check_last_dim(mixture_logits, k, "mixture_logits", "num_components")
        shape = tf.shape(component_params)
        grouped = tf.reshape(component_params, tf.concat([[-1, k], shape[1:]], 0))
        moved = tf.transpose(grouped, [0, *range(2, s + 2), 1, s + 2])  # [B, *S, K, Q]
        flat = tf.reshape(moved, tf.concat([[-1], shape[1 : 1 + s], [k * self.component_size]], 0))
        return tf.concat([flat, self._gate_at_every_pixel(mixture_logits, flat)], axis=-1)

    def mixture_parts(self, params):
        """`(mixture_logits [B, K], loc [B, K, *S, C], cov_factor [B, K, *S, C, R],
        cov_diag [B, K, *S, C])` of the distribution."""
        components, gate = self._split(params)
        c, r = self.num_classes, self.rank
        moved = self._components_first(components)  # [B, K, *S, Q]
        loc, raw_diag, factor = tf.split(moved, [c, c, c * r], axis=-1)
        factor = tf.reshape(factor, tf.concat([tf.shape(factor)[:-1], [c, r]], 0))
        diag = self.component_head.diag_from_raw(raw_diag)
        return tf.reduce_mean(gate, axis=self._spatial), loc, factor, diag

    def _grouped(self, t):
        """`[B*K, ...]` -> `[B, K, ...]`."""
        return tf.reshape(t, tf.concat([[-1, self.num_components], tf.shape(t)[1:]], 0))

    # --- Keras ---------------------------------------------------------------------------------
    def build(self, input_shape):
        self._check_features(input_shape)
        self.projection.build(tuple(input_shape))
        self.gate.build((input_shape[0], input_shape[-1]))
        self.built = True

    def call(self, features, roi_mask=None):
        """Map features `[B, *S, F]` to params `[B, *S, params_size]` (float32)."""
        self._check_features(features.shape)
        features = tf.cast(features, tf.float32)
        components = self.projection(features)
        if roi_mask is not None:
            components = self._mask_components(components, roi_mask)
        gate = self.gate(tf.reduce_mean(features, axis=self._spatial))  # [B, K]
        return tf.concat([components, self._gate_at_every_pixel(gate, components)], axis=-1)

    def _mask_components(self, components, roi_mask):
        roi_mask = self.prepare_roi_mask(roi_mask, components)
        c = self.num_classes
        m = tf.cast(roi_mask, components.dtype)[..., tf.newaxis, tf.newaxis]
        grouped = self._by_component(components)
        loc, raw, factor = tf.split(grouped, [c, c, c * self.rank], axis=-1)
        raw = raw * m + (1.0 - m) * _MASKED_RAW_DIAG
        masked = tf.concat([loc, raw, factor * m], axis=-1)
        return tf.reshape(masked, tf.shape(components))

    # --- distribution interface ---------------------------------------------------------------
    def distribution(self, params):
        """`MixtureSameFamily(Categorical(mixture_logits), K LowRankLogitsDistribution)`:
        batch `[B]`, event `[*S, C]` (`tfp_seg.distributions.mixture_low_rank_logits`)."""
        logits, loc, factor, diag = self.mixture_parts(params)
        event = loc.shape[2:]
        if event.is_fully_defined() and self.rank > event.num_elements():
            raise ValueError(
                f"`rank` ({self.rank}) must not exceed prod(S)*C = {event.num_elements()} of "
                f"the components' parameters {tuple(loc.shape)}."
            )
        return dists.mixture_low_rank_logits(logits, loc, factor, diag, validate_args=False)

    def mean_logits(self, params) -> tf.Tensor:
        """The mean of the logits distribution `sum_k pi_k mu_k`, `[B, *S, C]`."""
        s, k = self.spatial_dims, self.num_components
        weights = self.mixture_weights(params)  # [B, K]
        components, _ = self._split(params)
        loc = components[..., : self.num_classes]  # [B, *S, K, C]
        return tf.reduce_sum(tf.reshape(weights, [-1] + [1] * s + [k, 1]) * loc, axis=s + 1)

    def sample_logits(
        self,
        params,
        num_samples: int,
        seed=None,
        antithetic: Optional[bool] = None,
        noise=None,
    ):
        """Samples `[N, B, *S, C]`: a component per image and sample (inverse CDF of a
        uniform), then its `mu_k + P_k z + sqrt(D_k) eps`; export-safe ops
        (`tfp_seg.distributions.sample_mixture_low_rank`).

        Args:
          params: `[B, *S, params_size]`.
          num_samples: N (even when antithetic).
          seed: None (stateful RNG) or an int / shape-[2] seed (stateless, reproducible).
          antithetic: override the head's default (mirrored pairs sharing a component).
          noise: fixed `(u [N', B], z [N', B, R], eps [N', B, *S, C])` instead of random
            draws, N' = N/2 when antithetic (u: uniforms in [0, 1) that pick the components).
        """
        antithetic = self.antithetic if antithetic is None else bool(antithetic)
        logits, loc, factor, diag = self.mixture_parts(params)
        return dists.sample_mixture_low_rank(
            logits, loc, factor, diag, num_samples, seed=seed, antithetic=antithetic, noise=noise
        )

    def sample_labels(self, params, num_samples: int, seed=None, antithetic=None):
        """Label maps `[N, B, *S]` (int32): the arg max of `sample_logits` (the same draws).

        A class-planar sampler (`tfp_seg.distributions.sample_low_rank_labels`) would first
        have to gather every sample's component parameters (`[N*B, *S, C, R]`); measured on
        CPU (64x64, B = 8, N = 16, K = 3, R = 10) that is 1.8x (2 classes) and 2.3x (3 classes)
        the time of the arg max of `sample_logits`, so it is not used.
        """
        return super().sample_labels(params, num_samples, seed=seed, antithetic=antithetic)

    def mean_probabilities(self, params, num_samples: int = 16, seed=None) -> tf.Tensor:
        """Predictive probabilities `E[softmax(eta)] = sum_k pi_k E_k[softmax(eta)]`,
        `[B, *S, C]`, stratified by component: the weights enter exactly and each component
        gets `ceil(N / K)` Monte Carlo samples (about N in all), drawn by the component head's
        own estimator (antithetic pairs when its default is antithetic and the count is even;
        class-planar up to 8 classes)."""
        params = self.check_params(params)
        num_samples = _checks.check_num_samples(num_samples, antithetic=False)
        per_component = max(1, math.ceil(num_samples / self.num_components))
        probs = self.component_head.mean_probabilities(
            self.component_params(params), num_samples=per_component, seed=seed
        )  # [B*K, *S, C]
        weights = self.mixture_weights(params)
        grouped = self._grouped(probs)  # [B, K, *S, C]
        shape = [-1, self.num_components] + [1] * (self.spatial_dims + 1)
        return tf.reduce_sum(tf.reshape(weights, shape) * grouped, axis=1)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_components": self.num_components,
                "rank": self.rank,
                "epsilon": self.epsilon,
                "diagonal_transform": self.diagonal_transform,
                "antithetic": self.antithetic,
                "factor_init_scale": self.factor_init_scale,
                "initial_diagonal": self.initial_diagonal,
            }
        )
        return config
