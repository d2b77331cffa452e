"""`PackedConv`: the convolutions of M ensemble members as one grouped convolution
(Packed-Ensembles, Laurent et al. 2023).

A Packed-Ensemble PE(alpha, M, gamma) replaces every convolution of a network of width F by
one convolution holding M independent members of width `alpha F / M` each, kept apart by
groups: member j owns a contiguous block of channels from the input to the output of every
layer, and a grouped convolution never mixes blocks.

```none
member width   c = gamma * ceil(alpha * F / (M * gamma))        (alpha F / M, rounded up to
                                                                 a multiple of gamma)
channels       [..., M * c]: member j owns channels j*c .. (j+1)*c - 1
groups         M * gamma (gamma subgroups inside every member); the first layer of a network
               (`first=True`) reads the shared input with groups = 1: every member sees all
               input channels
parameters     k^d * (M c_in / (M gamma)) * M c = k^d c_in c M / gamma  per layer, i.e.
               alpha^2 / (M gamma) times the single network's k^d F_in F
```

With alpha = 2, M = 4, gamma = 1 (the paper's default) each member is half as wide as the
original network and the ensemble has about as many parameters as one network. The members'
outputs are separated at the end of the network (`tfp_seg.models.UNet(ensemble="packed")`
reshapes its last features from `[B, H, W, M c]` to `[M*B, H, W, c]`, the paper's
`rearrange("b (m c) h w -> (m b) c h w")`).

Anything between two packed convolutions must keep the blocks apart too: elementwise ops,
pooling and per-channel normalisation do; group normalisation needs a multiple of M groups,
and a concatenation of two packed tensors must interleave them member by member (both are
done by `tfp_seg.models.UNet`; `interleave_members` here).

#### References

[1] Laurent, Lafage, Tartaglione, Daniel, Martinez, Bursuc and Franchi. Packed-Ensembles for
    Efficient Uncertainty Estimation. ICLR 2023.
[2] TorchUncertainty `PackedConv2d` (`alpha`, `num_estimators`, `gamma`, `first`).
"""

from __future__ import annotations

import math

import keras
import tensorflow as tf

from tfp_seg import _checks
from tfp_seg.layers._conv import (
    check_conv_input,
    check_conv_rank,
    check_padding,
    conv_output_shape,
    conv_tuple,
)

try:  # whether TensorFlow runs oneDNN (its CPU kernels have grouped-convolution gradients)
    from tensorflow.python.util import _pywrap_util_port
except ImportError:  # pragma: no cover - a TensorFlow build without the helper
    _pywrap_util_port = None

__all__ = ["PackedConv", "packed_width", "interleave_members"]

IMPLEMENTATIONS = ("auto", "grouped", "split")


def packed_width(filters: int, alpha: float, ensemble_size: int, gamma: int = 1) -> int:
    """A member's channels `c = gamma * ceil(alpha * filters / (M * gamma))` (>= gamma)."""
    filters = _checks.positive_int(filters, "filters")
    m = _checks.positive_int(ensemble_size, "ensemble_size")
    gamma = _checks.positive_int(gamma, "gamma")
    alpha = check_alpha(alpha)
    return gamma * max(1, math.ceil(alpha * filters / (m * gamma) - 1e-9))


def check_alpha(alpha) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise ValueError(f"`alpha` must be a positive number (width factor); got {alpha!r}.")
    return float(alpha)


def interleave_members(tensors, ensemble_size: int) -> tf.Tensor:
    """Concatenate packed tensors `[..., M * c_t]` member by member: `[..., M * sum_t c_t]`
    with member j's channels of every tensor in its block j (a plain concatenation would give
    the first member's block channels of two members)."""
    m = ensemble_size
    parts = []
    for t in tensors:
        channels = t.shape[-1]
        if channels is None or channels % m:
            raise ValueError(
                f"packed tensors must have M * c channels (M = {m}); got shape "
                f"{_checks.shape_str(t)}."
            )
        parts.append(tf.reshape(t, tf.concat([tf.shape(t)[:-1], [m, channels // m]], axis=0)))
    joined = tf.concat(parts, axis=-1)
    total = sum(int(t.shape[-1]) for t in tensors)
    return tf.reshape(joined, tf.concat([tf.shape(joined)[:-2], [total]], axis=0))


def _grouped_gradients_supported() -> bool:
    """Whether one grouped `tf.nn.convolution` can be trained here: on a GPU (cuDNN), or on
    a CPU with oneDNN kernels. TensorFlow's default CPU kernels run it forward but have no
    gradient ("Gradients for grouped convolutions are not supported on CPU")."""
    if tf.config.list_logical_devices("GPU"):
        return True
    try:
        return bool(_pywrap_util_port is not None and _pywrap_util_port.IsMklEnabled())
    except AttributeError:  # pragma: no cover - a TensorFlow build without the helper
        return False


@keras.saving.register_keras_serializable(package="tfp_seg")
class PackedConv(keras.layers.Layer):
    """A Packed-Ensembles convolution (1D, 2D or 3D): M members' convolutions of width
    `packed_width(filters, alpha, M, gamma)` in one grouped convolution (see the module
    docstring).

    ```none
    first=False  inputs [B, *S, M * c_in] (member j: channels j*c_in ..), c_in % gamma == 0
    first=True   inputs [B, *S, C_in] shared by all members (groups = 1)
    outputs      [B, *S', M * c],  c = packed_width(filters, alpha, M, gamma)
    ```

    Args:
      filters: F, the width of the convolution in the single network the ensemble replaces.
      kernel_size: an int or `rank` ints.
      ensemble_size: M >= 1 members.
      alpha: width factor (> 0): a member has `alpha F / M` channels (paper default 2).
      gamma: subgroups inside every member (>= 1; paper default 1).
      first: the first layer of the network (reads an input that is not packed).
      rank: spatial dimensions: 2 (images, default), 3 (volumes) or 1.
      strides, padding, dilation_rate: as `keras.layers.Conv2D`.
      use_bias: a bias per output channel (per member).
      kernel_initializer, bias_initializer: as `keras.layers.Conv2D`.
      implementation: how the grouped convolution runs. "grouped": one
        `tf.nn.convolution` (fastest, ~2x the "split" form with oneDNN; trains on GPU and on
        oneDNN CPU kernels only); "split": one convolution per group, concatenated (trains
        everywhere); "auto" (default): "grouped" where it trains (a GPU is visible or
        TensorFlow runs oneDNN), else "split". All give the same values.

    #### Examples

    ```python
    conv = tfp_seg.layers.PackedConv(32, 3, ensemble_size=4, alpha=2, first=True)
    y = conv(images)                       # ==> [B, H, W, 4 * 16]
    conv2 = tfp_seg.layers.PackedConv(32, 3, ensemble_size=4, alpha=2)
    z = conv2(y)                           # ==> [B, H, W, 4 * 16], members kept apart
    ```
    """

    def __init__(
        self,
        filters: int,
        kernel_size,
        ensemble_size: int,
        alpha: float = 2.0,
        gamma: int = 1,
        first: bool = False,
        rank: int = 2,
        strides=1,
        padding: str = "same",
        dilation_rate=1,
        use_bias: bool = True,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        implementation: str = "auto",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.rank = check_conv_rank(rank)
        self.filters = _checks.positive_int(filters, "filters")
        self.kernel_size = conv_tuple(kernel_size, self.rank, "kernel_size")
        self.ensemble_size = _checks.positive_int(ensemble_size, "ensemble_size")
        self.alpha = check_alpha(alpha)
        self.gamma = _checks.positive_int(gamma, "gamma")
        self.first = bool(first)
        self.strides = conv_tuple(strides, self.rank, "strides")
        self.padding = check_padding(padding)
        self.dilation_rate = conv_tuple(dilation_rate, self.rank, "dilation_rate")
        self.use_bias = bool(use_bias)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        if implementation not in IMPLEMENTATIONS:
            raise ValueError(
                f"`implementation` must be one of {IMPLEMENTATIONS}; got {implementation!r}."
            )
        self.implementation = implementation
        self.member_filters = packed_width(self.filters, self.alpha, self.ensemble_size, self.gamma)

    @property
    def groups(self) -> int:
        """Groups of the convolution: 1 for the first layer, else M * gamma."""
        return 1 if self.first else self.ensemble_size * self.gamma

    @property
    def output_channels(self) -> int:
        """M * c: every member's channels, member-major."""
        return self.ensemble_size * self.member_filters

    def build(self, input_shape):
        input_shape = tuple(input_shape)
        check_conv_input(input_shape, self.rank)
        channels = int(input_shape[-1])
        if channels % self.groups:
            raise ValueError(
                f"`inputs` of a PackedConv with first=False must have M * c_in channels with "
                f"c_in a multiple of gamma (M = {self.ensemble_size}, gamma = {self.gamma}: a "
                f"multiple of {self.groups}); got shape {input_shape}. Use first=True for the "
                "network's (unpacked) input."
            )
        self.kernel = self.add_weight(
            name="kernel",
            shape=self.kernel_size + (channels // self.groups, self.output_channels),
            initializer=self.kernel_initializer,
        )
        self.bias = None
        if self.use_bias:
            self.bias = self.add_weight(
                name="bias", shape=(self.output_channels,), initializer=self.bias_initializer
            )
        self.built = True

    def _use_split(self) -> bool:
        if self.groups == 1 or self.implementation == "grouped":
            return False
        if self.implementation == "split" or self.rank != 2:
            return True  # TensorFlow's CPU kernels have no grouped 1D / 3D convolutions
        return not _grouped_gradients_supported()

    def call(self, inputs):
        x = tf.convert_to_tensor(inputs)
        check_conv_input(tuple(x.shape), self.rank)
        kernel = tf.cast(tf.convert_to_tensor(self.kernel), x.dtype)

        def conv(a, k):
            return tf.nn.convolution(
                a,
                k,
                strides=self.strides,
                padding=self.padding.upper(),
                dilations=self.dilation_rate,
            )

        if self._use_split():
            pairs = zip(
                tf.split(x, self.groups, axis=-1),
                tf.split(kernel, self.groups, axis=-1),
                strict=True,
            )
            y = tf.concat([conv(a, k) for a, k in pairs], axis=-1)
        else:
            y = conv(x, kernel)
        if self.bias is not None:
            y = y + tf.cast(tf.convert_to_tensor(self.bias), y.dtype)
        return y

    def compute_output_shape(self, input_shape):
        return conv_output_shape(
            input_shape, self.kernel_size, self.strides, self.dilation_rate, self.padding
        ) + (self.output_channels,)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "filters": self.filters,
                "kernel_size": list(self.kernel_size),
                "ensemble_size": self.ensemble_size,
                "alpha": self.alpha,
                "gamma": self.gamma,
                "first": self.first,
                "rank": self.rank,
                "strides": list(self.strides),
                "padding": self.padding,
                "dilation_rate": list(self.dilation_rate),
                "use_bias": self.use_bias,
                "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
                "bias_initializer": keras.initializers.serialize(self.bias_initializer),
                "implementation": self.implementation,
            }
        )
        return config
