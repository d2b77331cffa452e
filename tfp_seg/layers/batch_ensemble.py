"""`BatchEnsembleConv`: a convolution shared by M ensemble members, each with its own rank-1
fast weights (BatchEnsemble, Wen et al. 2020).

```none
inputs   [M*B, *S, C_in]    member j holds rows j*B .. (j+1)*B - 1 (the batch tiled M times)
weights  W [*k, C_in, F] shared;  r [M, C_in], s [M, F], b [M, F] per member (fast weights)
output   y_j = ((x_j * r_j) conv W) * s_j + b_j          [M*B, *S', F]
       = (x_j conv W_j) + b_j,   W_j = W * (r_j s_j^T)    (W_j[k, i, o] = W[k, i, o] r_j[i] s_j[o])
```

Proof of the identity: at every output position p and channel o,
`((x_j * r_j) conv W)[p, o] s_j[o] = sum_{k, i} x_j[p + k, i] r_j[i] W[k, i, o] s_j[o]
= sum_{k, i} x_j[p + k, i] W_j[k, i, o] = (x_j conv W_j)[p, o]`: a convolution is linear in
both the input channels and the kernel, so a per-channel scale of the input is a scale of the
kernel's input axis and a per-channel scale of the output one of its output axis. Zero padding
is unchanged by the scale (`0 * r = 0`), strides and dilations only select positions `p`,
so the identity holds for every `padding`, `strides` and `dilation_rate`. One convolution of
the tiled batch thus runs M members whose weights differ only in a rank-1 factor: M times the
compute of one member, `(M - 1) (C_in + 2 F)` more parameters than one convolution instead of
`(M - 1)` full kernels.

#### References

[1] Wen, Tran and Ba. BatchEnsemble: an Alternative Approach to Efficient Ensemble and
    Lifelong Learning. ICLR 2020.
[2] edward2 `Conv2DBatchEnsemble`; Uncertainty Baselines' BatchEnsemble ResNets initialise
    the fast weights from N(1, 0.5^2) (`random_sign_init=-0.5`); the paper also reports
    random-sign (+1 / -1) fast weights.
"""

from __future__ import annotations

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

__all__ = ["BatchEnsembleConv"]


def _default_scale_initializer():
    return keras.initializers.RandomNormal(mean=1.0, stddev=0.5)


@keras.saving.register_keras_serializable(package="tfp_seg")
class BatchEnsembleConv(keras.layers.Layer):
    """A BatchEnsemble convolution (1D, 2D or 3D): M members sharing one kernel `W`, member j
    with the kernel `W_j = W * (r_j s_j^T)` and its own bias (see the module docstring).

    The input is the batch tiled M times along axis 0 (member-major: member j is rows
    `j*B .. (j+1)*B - 1`, as `tf.tile(x, [M, 1, ..., 1])` makes it; `tfp_seg.models.UNet(
    ensemble="batch")` tiles its input once and keeps the layout). The layer computes
    `((x_j * r_j) conv W) * s_j + b_j`: one convolution of the whole tiled batch.

    ```none
    inputs [M*B, *S, C_in]  ->  outputs [M*B, *S', filters]     S: `rank` spatial axes
    ```

    Args:
      filters: F, output channels.
      kernel_size: an int or `rank` ints.
      ensemble_size: M >= 1 members.
      rank: spatial dimensions: 2 (images, default), 3 (volumes) or 1.
      strides, dilation_rate: ints or `rank` ints, as `keras.layers.Conv2D`.
      padding: "same" (default) or "valid".
      use_bias: per-member biases `b_j` (`[M, F]`).
      kernel_initializer: the shared kernel `W`.
      scale_initializer: the fast weights `r` (`[M, C_in]`) and `s` (`[M, F]`); default
        N(1, 0.5^2) (Uncertainty Baselines' choice: members differ from the first step).
      bias_initializer: the biases.

    The batch must be a multiple of M (a static batch is checked when the layer is called, a
    dynamic one at run time).

    #### Examples

    ```python
    conv = tfp_seg.layers.BatchEnsembleConv(8, 3, ensemble_size=4)
    x = tf.tile(images, [4, 1, 1, 1])          # [4*B, H, W, channels]: member j = rows jB..
    y = conv(x)                                 # ==> [4*B, H, W, 8]
    ```
    """

    def __init__(
        self,
        filters: int,
        kernel_size,
        ensemble_size: int,
        rank: int = 2,
        strides=1,
        padding: str = "same",
        dilation_rate=1,
        use_bias: bool = True,
        kernel_initializer="glorot_uniform",
        scale_initializer=None,
        bias_initializer="zeros",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.rank = check_conv_rank(rank)
        self.filters = _checks.positive_int(filters, "filters")
        self.kernel_size = conv_tuple(kernel_size, self.rank, "kernel_size")
        self.ensemble_size = _checks.positive_int(ensemble_size, "ensemble_size")
        self.strides = conv_tuple(strides, self.rank, "strides")
        self.padding = check_padding(padding)
        self.dilation_rate = conv_tuple(dilation_rate, self.rank, "dilation_rate")
        self.use_bias = bool(use_bias)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.scale_initializer = keras.initializers.get(
            _default_scale_initializer() if scale_initializer is None else scale_initializer
        )
        self.bias_initializer = keras.initializers.get(bias_initializer)

    def build(self, input_shape):
        input_shape = tuple(input_shape)
        check_conv_input(input_shape, self.rank)
        channels = int(input_shape[-1])
        m = self.ensemble_size
        self.kernel = self.add_weight(
            name="kernel",
            shape=self.kernel_size + (channels, self.filters),
            initializer=self.kernel_initializer,
        )
        self.input_scales = self.add_weight(
            name="input_scales", shape=(m, channels), initializer=self.scale_initializer
        )
        self.output_scales = self.add_weight(
            name="output_scales", shape=(m, self.filters), initializer=self.scale_initializer
        )
        self.bias = None
        if self.use_bias:
            self.bias = self.add_weight(
                name="bias", shape=(m, self.filters), initializer=self.bias_initializer
            )
        self.built = True

    def member_kernels(self) -> tf.Tensor:
        """The members' effective kernels `W_j = W * (r_j s_j^T)`, `[M, *k, C_in, F]`."""
        kernel = tf.convert_to_tensor(self.kernel)
        r = tf.convert_to_tensor(self.input_scales)[:, tf.newaxis, :]  # [M, 1, C_in]
        s = tf.convert_to_tensor(self.output_scales)[:, tf.newaxis, :]  # [M, 1, F]
        outer = tf.transpose(r, [0, 2, 1]) * s  # [M, C_in, F]
        spatial = [1] * self.rank
        outer = tf.reshape(outer, [self.ensemble_size] + spatial + list(outer.shape[1:]))
        return kernel[tf.newaxis] * outer

    def _members(self, x: tf.Tensor, shape: tf.Tensor) -> tf.Tensor:
        """`x [M*B, *S, K]` viewed as `[M, B, *S, K]` (member-major rows)."""
        return tf.reshape(x, tf.concat([[self.ensemble_size, -1], shape[1:]], axis=0))

    def _member_values(self, values, dtype) -> tf.Tensor:
        """Per-member channel values `[M, K]` shaped to broadcast over `[M, B, *S, K]`."""
        values = tf.cast(tf.convert_to_tensor(values), dtype)
        return tf.reshape(values, [self.ensemble_size, 1] + [1] * self.rank + [-1])

    def call(self, inputs):
        x = tf.convert_to_tensor(inputs)
        check_conv_input(tuple(x.shape), self.rank)
        m = self.ensemble_size
        if x.shape[0] is not None and x.shape[0] % m:
            raise ValueError(
                f"`inputs` batch ({x.shape[0]}) must be a multiple of ensemble_size = {m} "
                f"(the batch tiled once per member); got shape {_checks.shape_str(x)}."
            )
        if m > 1:
            check = tf.debugging.assert_equal(
                tf.shape(x)[0] % m,
                0,
                message=f"`inputs` batch must be a multiple of ensemble_size = {m}",
            )
            with tf.control_dependencies([check]):
                x = tf.identity(x)
        shape = tf.shape(x)
        r = self._member_values(self.input_scales, x.dtype)
        x = tf.reshape(self._members(x, shape) * r, shape)
        y = tf.nn.convolution(
            x,
            tf.cast(tf.convert_to_tensor(self.kernel), x.dtype),
            strides=self.strides,
            padding=self.padding.upper(),
            dilations=self.dilation_rate,
        )
        out_shape = tf.shape(y)
        members = self._members(y, out_shape) * self._member_values(self.output_scales, y.dtype)
        if self.bias is not None:
            members = members + self._member_values(self.bias, y.dtype)
        return tf.reshape(members, out_shape)

    def compute_output_shape(self, input_shape):
        return conv_output_shape(
            input_shape, self.kernel_size, self.strides, self.dilation_rate, self.padding
        ) + (self.filters,)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "filters": self.filters,
                "kernel_size": list(self.kernel_size),
                "ensemble_size": self.ensemble_size,
                "rank": self.rank,
                "strides": list(self.strides),
                "padding": self.padding,
                "dilation_rate": list(self.dilation_rate),
                "use_bias": self.use_bias,
                "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
                "scale_initializer": keras.initializers.serialize(self.scale_initializer),
                "bias_initializer": keras.initializers.serialize(self.bias_initializer),
            }
        )
        return config
