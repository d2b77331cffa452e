"""The Probabilistic U-Net's ELBO (Kohl et al., 2018) and the GECO constraint (Rezende & Viola).

#### Mathematical Details

```none
z ~ q(z | x, y)                          (posterior net, one reparameterised sample)
rec  = -sum_i w_i log softmax(f_comb(features(x), z)_i)[y_i]     summed over pixels i
kl   = KL( q(z | x, y) || p(z | x) )     analytic (tfd.kl_divergence, diagonal Gaussians)
loss = mean_b [ rec_b + beta * kl_b ]                             (the negative ELBO)
```

`w_i` is 0 for ignored pixels and `class_weights[y_i]` otherwise. With `reconstruction="mean"`
`rec_b` is divided by the number of non-ignored pixels of image b (nats per pixel); this makes
the KL relatively `prod(S)` times heavier, i.e. equals `"sum"` with `beta / prod(S)`.

Labels are one map per image `[B, *S]` (`S = (H, W)` for images, `(D, H, W)` for volumes,
told by the rank of the logits `[B, *S, C]`) or a label set `[B, K, *S]` of K raters scored
under the same logits, `rec_b = (1/K) sum_k rec_{b,k}` (each rater's map as one map; with
`"mean"` each divided by its own pixel count), the layouts of `tfp_seg.losses.targets`.

`beta` trades reconstruction against the KL. beta = 1 is the ELBO. A large beta (or a
reconstruction averaged over pixels) pushes the posterior onto the prior: the KL drops to ~0,
the latent carries no information and all samples look alike ("posterior collapse"; watch the
`kl` metric per epoch). A small beta lets the posterior encode the label while the prior
lags behind, so prior samples are diverse but less plausible.

With `geco=GECO(target)`, beta * KL is minimised under the constraint `rec <= target`
(Rezende & Viola, 2018; used by the Hierarchical Probabilistic U-Net, Kohl et al., 2019):

```none
loss = beta * kl + lambda * (rec - target)        lambda: a Lagrange multiplier, updated by GECO
```

#### References

[1] Kohl et al. A Probabilistic U-Net for Segmentation of Ambiguous Images. NeurIPS 2018.
[2] Rezende & Viola. Taming VAEs. arXiv:1810.00597, 2018.
[3] Kohl et al. A Hierarchical Probabilistic U-Net for Modeling Multi-Scale Ambiguities.
    arXiv:1905.13077, 2019.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import keras
import tensorflow as tf
import tensorflow_probability as tfp

from tfp_seg import _checks
from tfp_seg.losses import pixelwise, targets

tfd = tfp.distributions

__all__ = ["ELBO", "GECO"]

_RECONSTRUCTIONS = ("sum", "mean")


def _finite_float(value, name: str, low: Optional[float] = None, strict: bool = False) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"`{name}` must be a number; got {value!r}.") from None
    if not math.isfinite(value):
        raise ValueError(f"`{name}` must be finite; got {value!r}.")
    if low is not None and (value <= low if strict else value < low):
        raise ValueError(f"`{name}` must be {'>' if strict else '>='} {low}; got {value!r}.")
    return value


@keras.saving.register_keras_serializable(package="tfp_seg")
class GECO(keras.layers.Layer):
    """GECO: a Lagrange multiplier enforcing `reconstruction <= target` (Rezende & Viola, 2018).

    A stateful object (a Keras layer holding two non-trainable variables, so its state is
    saved with the model) used by `ELBO` inside `ProbabilisticUNet.train_step`:

    ```none
    C_t      = rec_t - target                              (constraint; <= 0 is satisfied)
    C_ma     = C_0                              at the first training step,
             = alpha * C_ma + (1 - alpha) * C_t  afterwards
    C_hat    = C_t + stop_gradient(C_ma - C_t)  (value of the moving average, gradient of C_t)
    loss     = beta * kl + lambda * C_hat       (lambda is a constant for the gradient)
    lambda  <- clip(lambda * exp(clip(speed * C_ma, -max_log_step, max_log_step)),
                    min_multiplier, max_multiplier)          after each training step
    ```

    While the reconstruction is worse than `target` (`C_ma > 0`) lambda grows and the
    reconstruction dominates the loss; once it is met, lambda shrinks and the KL is minimised.
    `target` is in the units of `ELBO(reconstruction=...)`: nats summed over an image's pixels
    for `"sum"`, nats per pixel for `"mean"`. `max_log_step` bounds the change of `log lambda`
    per step (summed reconstructions are in the hundreds of nats). Under `tf.distribute` the
    moving average and lambda are averaged over replicas.

    Args:
      target: kappa, the reconstruction level to reach.
      alpha: moving-average decay in [0, 1).
      speed: step size of the multiplicative lambda update (> 0).
      initial_multiplier: lambda at the start (> 0).
      min_multiplier, max_multiplier: bounds of lambda.
      max_log_step: bound on |log lambda_t - log lambda_{t-1}|.

    #### Examples

    ```python
    model = tfp_seg.models.ProbabilisticUNet(3, geco=tfp_seg.losses.GECO(target=40.0))
    model.compile("adam")
    model.fit(ds)           # logs loss, reconstruction, kl, geco_multiplier
    ```
    """

    def __init__(
        self,
        target: float,
        alpha: float = 0.99,
        speed: float = 0.01,
        initial_multiplier: float = 1.0,
        min_multiplier: float = 1e-6,
        max_multiplier: float = 1e6,
        max_log_step: float = 0.1,
        **kwargs,
    ):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.target = _finite_float(target, "target")
        self.alpha = _finite_float(alpha, "alpha", 0.0)
        if self.alpha >= 1.0:
            raise ValueError(f"`alpha` must be in [0, 1); got {alpha!r}.")
        self.speed = _finite_float(speed, "speed", 0.0, strict=True)
        self.initial_multiplier = _finite_float(
            initial_multiplier, "initial_multiplier", 0.0, strict=True
        )
        self.min_multiplier = _finite_float(min_multiplier, "min_multiplier", 0.0, strict=True)
        self.max_multiplier = _finite_float(max_multiplier, "max_multiplier", 0.0, strict=True)
        if not self.min_multiplier <= self.initial_multiplier <= self.max_multiplier:
            raise ValueError(
                "Need min_multiplier <= initial_multiplier <= max_multiplier; got "
                f"{min_multiplier!r}, {initial_multiplier!r}, {max_multiplier!r}."
            )
        self.max_log_step = _finite_float(max_log_step, "max_log_step", 0.0, strict=True)

        # === State ===
        self.multiplier = self.add_weight(
            shape=(),
            initializer=keras.initializers.Constant(self.initial_multiplier),
            trainable=False,
            aggregation="mean",
            name="multiplier",
        )
        self.constraint_ma = self.add_weight(
            shape=(),
            initializer="zeros",
            trainable=False,
            aggregation="mean",
            name="constraint_ma",
        )
        self.initialized = self.add_weight(
            shape=(),
            initializer="zeros",
            trainable=False,
            aggregation="mean",
            name="initialized",
        )
        self.built = True

    def call(self, reconstruction, training=False):
        return self.constrained_loss(reconstruction, training=training)[0]

    def constrained_loss(self, reconstruction, training: bool = False):
        """`(lambda * C_hat, lambda, C_ma)`; with `training=True` also updates the state.

        Args:
          reconstruction: scalar reconstruction loss of the batch (in `target`'s units).
          training: update the moving average and lambda (a training step).
        """
        rec = tf.cast(tf.convert_to_tensor(reconstruction), tf.float32)
        constraint = rec - self.target
        lam = tf.stop_gradient(tf.convert_to_tensor(self.multiplier))
        if not training:
            return lam * constraint, lam, tf.convert_to_tensor(self.constraint_ma)
        c_value = tf.stop_gradient(constraint)
        initialized = tf.convert_to_tensor(self.initialized) > 0.5
        ma = tf.where(
            initialized,
            self.alpha * tf.convert_to_tensor(self.constraint_ma) + (1.0 - self.alpha) * c_value,
            c_value,
        )
        self.constraint_ma.assign(ma)
        self.initialized.assign(1.0)
        # Read back: under tf.distribute the assignment averaged over replicas.
        ma = tf.convert_to_tensor(self.constraint_ma)
        c_hat = constraint + tf.stop_gradient(ma - constraint)
        log_step = tf.clip_by_value(self.speed * ma, -self.max_log_step, self.max_log_step)
        self.multiplier.assign(
            tf.clip_by_value(lam * tf.exp(log_step), self.min_multiplier, self.max_multiplier)
        )
        return lam * c_hat, lam, ma

    def reset(self):
        """Back to `initial_multiplier` and an empty moving average."""
        self.multiplier.assign(self.initial_multiplier)
        self.constraint_ma.assign(0.0)
        self.initialized.assign(0.0)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "target": self.target,
                "alpha": self.alpha,
                "speed": self.speed,
                "initial_multiplier": self.initial_multiplier,
                "min_multiplier": self.min_multiplier,
                "max_multiplier": self.max_multiplier,
                "max_log_step": self.max_log_step,
            }
        )
        return config


@keras.saving.register_keras_serializable(package="tfp_seg")
class ELBO:
    """The Probabilistic U-Net's negative ELBO: reconstruction cross-entropy + beta * KL(q || p).

    ```none
    loss = mean_b [ rec_b + beta * KL(q_b || p_b) ]                 (geco=None)
    loss = mean_b [ beta * KL(q_b || p_b) ] + lambda * (mean_b rec_b - target)   (with GECO)
    ```

    `elbo(labels, logits, posterior, prior, training=False)` returns a dict of float32 scalars
    `{"loss", "reconstruction", "kl"}` (batch means; plus `"geco_multiplier"` and
    `"geco_constraint"` with GECO). `labels` are `[B, *S]` maps or `[B, K, *S]` label sets,
    `logits` `[B, *S, C]` the reconstruction logits from a posterior sample (images or
    volumes, told by their rank); `posterior` and `prior` are distributions with batch `[B]` (e.g.
    `tfd.MultivariateNormalDiag`); the KL is analytic (`tfd.kl_divergence`).

    Args:
      beta: weight of the KL (>= 0). 1 is the ELBO; see the module docstring for its effect
        (posterior collapse when large, an uninformative prior when small).
      reconstruction: `"sum"` (default, as the reference implementation: cross-entropy summed
        over the pixels of each image, then averaged over the batch; the reference also sums
        over the batch, which equals ours with `beta * B`) or `"mean"` (per-pixel average,
        nats per pixel: the KL weighs `prod(S)` times more).
      geco: optional `GECO` (or its config) constraining the reconstruction; then `beta`
        weights the KL and GECO's multiplier the constraint.
      ignore_label: pixels with this label do not count (and are all-zero in the posterior's
        one-hot input).
      class_weights: `[C]` non-negative weights on each pixel's cross-entropy.
      validate_args: run-time checks of labels and logits.

    #### Examples

    ```python
    elbo = tfp_seg.losses.ELBO(beta=1.0)
    terms = elbo(labels, logits, posterior, prior)
    terms["loss"], terms["reconstruction"], terms["kl"]
    ```
    """

    def __init__(
        self,
        beta: float = 1.0,
        reconstruction: str = "sum",
        geco: Optional[GECO] = None,
        ignore_label: Optional[int] = None,
        class_weights: Optional[Sequence[float]] = None,
        validate_args: bool = True,
        name: str = "elbo",
    ):
        self.beta = _finite_float(beta, "beta", 0.0)
        if reconstruction not in _RECONSTRUCTIONS:
            raise ValueError(
                f"`reconstruction` must be one of {_RECONSTRUCTIONS}; got {reconstruction!r}."
            )
        self.reconstruction = reconstruction
        if isinstance(geco, dict):
            geco = keras.saving.deserialize_keras_object(geco)
        if geco is not None and not isinstance(geco, GECO):
            raise ValueError(f"`geco` must be a tfp_seg.losses.GECO or None; got {geco!r}.")
        self.geco = geco
        if ignore_label is not None and (
            isinstance(ignore_label, bool) or not isinstance(ignore_label, int)
        ):
            raise ValueError(f"`ignore_label` must be an int or None; got {ignore_label!r}.")
        self.ignore_label = ignore_label
        self.class_weights = pixelwise.check_class_weights(class_weights, None)
        self.validate_args = bool(validate_args)
        self.name = name

    def reconstruction_loss(self, labels, logits) -> tf.Tensor:
        """Per-image cross-entropy `[B]` (summed over pixels, or per pixel with `"mean"`).

        Args:
          labels: int `[B, *S]` (or `[B, *S, 1]`) label maps, or a label set `[B, K, *S]`
            (the mean over its K maps); values in `[0, C)` or `ignore_label`.
          logits: float `[B, *S, C]`; `S = (H, W)` or `(D, H, W)`, told by its rank.
        """
        logits = tf.convert_to_tensor(logits)
        if not logits.dtype.is_floating:
            raise ValueError(f"`logits` must be a float tensor; got dtype {logits.dtype.name}.")
        logits = tf.cast(logits, tf.float32)
        s = _checks.infer_spatial_dims(logits, "logits", 2, "[B, H, W, C]")
        num_classes = logits.shape[-1]
        class_weights = pixelwise.check_class_weights(self.class_weights, num_classes)
        prepared = targets.prepare_targets(
            labels,
            logits,
            num_classes,
            self.ignore_label,
            validate_args=self.validate_args,
            name="labels",
            soft=targets.soft_rejected("labels", "the ELBO's reconstruction", s),
        )
        if self.validate_args:
            logits = _checks.assert_finite(logits, "logits")
        label_set = prepared.labels  # [B, K, *S]
        rec = pixelwise.label_set_nll(  # [B, K]; one sample: the summed cross-entropy
            label_set, logits[tf.newaxis], self.ignore_label, class_weights
        )
        if self.reconstruction == "mean":
            shape = tf.shape(label_set)
            maps = tf.reshape(label_set, tf.concat([[-1], shape[2:]], 0))  # [B*K, *S]
            count = pixelwise.valid_pixel_count(maps, self.ignore_label, spatial_dims=s)
            rec = rec / tf.maximum(tf.reshape(count, shape[:2]), 1.0)
        return tf.reduce_mean(rec, axis=1)

    @staticmethod
    def kl_divergence(posterior, prior) -> tf.Tensor:
        """Analytic `KL(posterior || prior)` per example, `[B]` (float32)."""
        for name, d in (("posterior", posterior), ("prior", prior)):
            if not isinstance(d, tfd.Distribution):
                raise ValueError(
                    f"`{name}` must be a tfp distribution (e.g. LatentEncoder.distribution(...)); "
                    f"got {type(d).__name__}."
                )
        return tf.cast(tfd.kl_divergence(posterior, prior), tf.float32)

    def __call__(self, labels, logits, posterior, prior, training: bool = False) -> dict:
        rec = tf.reduce_mean(self.reconstruction_loss(labels, logits))
        kl = tf.reduce_mean(self.kl_divergence(posterior, prior))
        out = {"reconstruction": rec, "kl": kl}
        if self.geco is None:
            out["loss"] = rec + self.beta * kl
        else:
            term, lam, ma = self.geco.constrained_loss(rec, training=training)
            out["loss"] = self.beta * kl + term
            out["geco_multiplier"] = lam
            out["geco_constraint"] = ma
        return out

    def get_config(self) -> dict:
        return {
            "beta": self.beta,
            "reconstruction": self.reconstruction,
            "geco": None if self.geco is None else keras.saving.serialize_keras_object(self.geco),
            "ignore_label": self.ignore_label,
            "class_weights": self.class_weights,
            "validate_args": self.validate_args,
            "name": self.name,
        }

    @classmethod
    def from_config(cls, config: dict) -> ELBO:
        return cls(**config)

    def __repr__(self) -> str:
        return (
            f"ELBO(beta={self.beta}, reconstruction={self.reconstruction!r}, "
            f"geco={None if self.geco is None else f'GECO(target={self.geco.target})'})"
        )
