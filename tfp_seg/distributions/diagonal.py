"""Independent normal logits per pixel and class (heteroscedastic heads without class factors).

```none
eta_(i,c) ~ N(mu_(i,c), sigma_(i,c)^2)   independently;   sample: eta = mu + sigma * eps
```
"""

from __future__ import annotations

from typing import Optional

import tensorflow as tf
import tensorflow_probability as tfp

from tfp_seg import _checks, _seeds
from tfp_seg._seeds import SeedLike
from tfp_seg.distributions import noise as noise_lib

tfd = tfp.distributions

__all__ = ["diagonal_logits", "sample_diagonal"]


def diagonal_logits(loc, scale, validate_args: bool = False, name: str = "DiagonalLogits"):
    """Independent normal logits, `tfd.Independent(tfd.Normal(loc, scale), len(S) + 1)`.

    Args:
      loc: mean logits `[B, *S, C]`, `S = (H, W)` or `(D, H, W)` (told by the rank, 4 or 5).
      scale: positive standard deviations, same shape as `loc`.

    Returns:
      A distribution with batch shape `[B]` and event shape `[*S, C]`.
    """
    loc = tf.convert_to_tensor(loc)
    scale = tf.convert_to_tensor(scale, dtype=loc.dtype)
    s = _checks.infer_spatial_dims(loc, "loc", 2, "[B, H, W, C]")
    _checks.check_rank(scale, 2 + s, "scale", _checks.spatial_form(s, "B", "C"))
    if not loc.shape.is_compatible_with(scale.shape):
        raise ValueError(
            f"`scale` must have the shape of `loc` {_checks.shape_str(loc)}; "
            f"got {_checks.shape_str(scale)}."
        )
    return tfd.Independent(
        tfd.Normal(loc, scale, validate_args=validate_args),
        reinterpreted_batch_ndims=s + 1,
        name=name,
    )


def sample_diagonal(
    loc: tf.Tensor,
    scale: tf.Tensor,
    num_samples: int,
    seed: SeedLike = None,
    antithetic: bool = False,
    noise: Optional[tf.Tensor] = None,
) -> tf.Tensor:
    """Reparameterised samples of independent normal logits `[N, B, *S, C]`.

    `loc`, `scale`: `[B, *S, C]`; `noise`: fixed `eps [N', B, *S, C]` (N' = N/2 when
    `antithetic`); `eta = loc + scale * eps` (and `loc - scale * eps`)."""
    num_samples = _checks.check_num_samples(num_samples, antithetic)
    n = num_samples // 2 if antithetic else num_samples
    if noise is None:
        eps = noise_lib.standard_normal(
            tf.concat([[n], tf.shape(loc)], 0), _seeds.split_seed(seed, 3), loc.dtype
        )
    else:
        eps = tf.convert_to_tensor(noise, dtype=loc.dtype)
    deviation = scale[tf.newaxis] * eps
    if antithetic:
        deviation = tf.concat([deviation, -deviation], axis=0)
    return loc[tf.newaxis] + deviation
