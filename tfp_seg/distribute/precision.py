"""Building a model under a mixed-precision Keras dtype policy (`dtype_policy_scope`)."""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import keras

POLICIES = (None, "float32", "mixed_float16", "mixed_bfloat16")
"""The dtype policies `dtype_policy_scope` accepts (None: leave the global policy)."""


# --- mixed precision -----------------------------------------------------------------------------
@contextlib.contextmanager
def dtype_policy_scope(policy: Optional[str]) -> Iterator[None]:
    """Build layers under a Keras dtype policy, restoring the previous global policy after.

    Layers take the global policy when they are constructed, so build the model inside the
    scope and compile/fit it anywhere. `tfp_seg` heads compute their parameters, samples and
    losses in float32 under every policy; the backbone runs in float16 / bfloat16. Under
    `mixed_float16` Keras wraps the optimiser in a `LossScaleOptimizer` at `compile`.

    Args:
      policy: None or "float32" (no change), "mixed_float16" or "mixed_bfloat16".
    """
    if policy not in POLICIES:
        raise ValueError(f"`mixed_precision` policy must be one of {POLICIES}; got {policy!r}.")
    if policy in (None, "float32"):
        yield
        return
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)
