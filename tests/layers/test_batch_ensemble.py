"""`BatchEnsembleConv`: M explicit convolutions with the members' kernels, gradients, shapes,
initialisation statistics and argument errors."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests.helpers import run_layer_test
from tfp_seg.layers import BatchEnsembleConv

M = 3


def _normal(shape, seed):
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


def _explicit(layer, x_members, conv_cls, **conv_kwargs):
    """Member j's output by a plain keras convolution with kernel W_j = W * (r_j s_j^T)
    (computed here in NumPy from the layer's weights) and bias b_j."""
    kernel = layer.kernel.numpy()
    r, s = layer.input_scales.numpy(), layer.output_scales.numpy()
    outputs = []
    for j, x in enumerate(x_members):
        member_kernel = kernel * np.outer(r[j], s[j])  # broadcast over the kernel positions
        conv = conv_cls(layer.filters, layer.kernel_size, **conv_kwargs)
        conv.build(x.shape)
        conv.set_weights([member_kernel, layer.bias.numpy()[j]])
        outputs.append(conv(x).numpy())
    return outputs


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(padding="same"),
        dict(padding="valid", strides=2),
        dict(padding="same", dilation_rate=2, kernel_size=(3, 1)),
    ],
    ids=["same", "valid_stride2", "dilated_3x1"],
)
def test_equals_m_explicit_convolutions_with_the_member_kernels(kwargs):
    kwargs = dict(kwargs)
    kernel_size = kwargs.pop("kernel_size", 3)
    layer = BatchEnsembleConv(
        5, kernel_size, ensemble_size=M, bias_initializer="random_normal", **kwargs
    )
    members = [_normal((2, 9, 9, 4), seed) for seed in range(M)]  # a different batch each
    y = layer(np.concatenate(members, axis=0)).numpy()
    expected = _explicit(layer, members, keras.layers.Conv2D, **kwargs)
    for j in range(M):
        np.testing.assert_allclose(y[2 * j : 2 * j + 2], expected[j], rtol=1e-5, atol=1e-5)
    # the layer's own effective kernels are these W_j
    kernel, r, s = (w.numpy() for w in (layer.kernel, layer.input_scales, layer.output_scales))
    for j in range(M):
        np.testing.assert_allclose(
            layer.member_kernels().numpy()[j], kernel * np.outer(r[j], s[j]), rtol=1e-6
        )


def test_rank_3_equals_explicit_conv3d():
    layer = BatchEnsembleConv(
        2, 3, ensemble_size=2, rank=3, bias_initializer="random_normal", padding="same"
    )
    members = [_normal((1, 4, 5, 6, 3), seed) for seed in (7, 8)]
    y = layer(np.concatenate(members, axis=0)).numpy()
    expected = _explicit(layer, members, keras.layers.Conv3D, padding="same")
    for j in range(2):
        np.testing.assert_allclose(y[j : j + 1], expected[j], rtol=1e-5, atol=1e-5)


def test_tiled_batch_members_differ_and_a_single_member_is_a_plain_conv():
    layer = BatchEnsembleConv(4, 3, ensemble_size=M)
    x = _normal((2, 8, 8, 3), 0)
    y = layer(np.tile(x, (M, 1, 1, 1))).numpy().reshape(M, 2, 8, 8, 4)
    # N(1, 0.5^2) fast weights: the members see the same images but compute different maps
    assert np.abs(y[0] - y[1]).max() > 1e-2 and np.abs(y[1] - y[2]).max() > 1e-2
    single = BatchEnsembleConv(4, 3, ensemble_size=1, scale_initializer="ones")
    plain = keras.layers.Conv2D(4, 3, padding="same")
    out = single(x)
    plain.build(x.shape)
    plain.set_weights([single.kernel.numpy(), single.bias.numpy()[0]])
    np.testing.assert_allclose(out.numpy(), plain(x).numpy(), rtol=1e-5, atol=1e-6)


def test_gradients_equal_those_of_the_explicit_member_convolutions():
    layer = BatchEnsembleConv(3, 3, ensemble_size=M, bias_initializer="random_normal")
    x = tf.constant(_normal((M * 2, 6, 6, 2), 1))
    target = tf.constant(_normal((M * 2, 6, 6, 3), 2))
    layer(x)
    weights = [layer.kernel, layer.input_scales, layer.output_scales, layer.bias]
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(tf.square(layer(x) - target))
    grads = tape.gradient(loss, weights)
    # the same loss written with the member kernels W_j = W * (r_j s_j^T), per member
    with tf.GradientTape() as tape:
        total = 0.0
        for j in range(M):
            outer = layer.input_scales[j][:, None] * layer.output_scales[j][None, :]
            y = tf.nn.convolution(x[2 * j : 2 * j + 2], layer.kernel * outer, padding="SAME")
            y = y + layer.bias[j]
            total += tf.reduce_sum(tf.square(y - target[2 * j : 2 * j + 2]))
    reference = tape.gradient(total, weights)
    np.testing.assert_allclose(float(loss), float(total), rtol=1e-5)
    for g, ref, w in zip(grads, reference, weights, strict=True):
        assert g is not None, w.path
        scale = np.abs(ref.numpy()).max()
        np.testing.assert_allclose(g.numpy(), ref.numpy(), atol=1e-5 * scale, err_msg=w.path)
        assert scale > 0, w.path


def test_layer_contract_fit_and_round_trips():
    run_layer_test(
        BatchEnsembleConv,
        {"filters": 4, "kernel_size": 3, "ensemble_size": 2},
        input_shape=(4, 8, 8, 3),
        expected_output_shape=(4, 8, 8, 4),
    )


def test_symbolic_shapes_and_compute_output_shape():
    layer = BatchEnsembleConv(6, (3, 5), ensemble_size=2, padding="valid", strides=(2, 1))
    inputs = keras.Input((None, 11, 3))
    assert tuple(layer(inputs).shape) == (None, None, 7, 6)
    x = _normal((4, 9, 11, 3), 0)
    out = layer(x)
    assert tuple(out.shape) == layer.compute_output_shape(x.shape) == (4, 4, 7, 6)
    assert layer.compute_output_shape((None, None, 11, 3)) == (None, None, 7, 6)
    weights = {w.name: tuple(w.shape) for w in layer.weights}
    assert weights == {
        "kernel": (3, 5, 3, 6),
        "input_scales": (2, 3),
        "output_scales": (2, 6),
        "bias": (2, 6),
    }


def test_fast_weight_initialisation_is_normal_with_mean_1_and_sd_half():
    """Default r, s ~ N(1, 0.5^2): sample mean within 5 s.e. (0.5 / sqrt(n)) of 1, sample
    variance within 5 s.e. (0.25 sqrt(2 / (n - 1))) of 0.25."""
    keras.utils.set_random_seed(3)
    layer = BatchEnsembleConv(64, 1, ensemble_size=32)
    layer.build((None, 4, 4, 64))
    values = np.concatenate(
        [layer.input_scales.numpy().ravel(), layer.output_scales.numpy().ravel()]
    )
    n = values.size
    assert abs(values.mean() - 1.0) < 5 * 0.5 / np.sqrt(n)
    assert abs(values.var(ddof=1) - 0.25) < 5 * 0.25 * np.sqrt(2 / (n - 1))


def test_batch_must_be_a_multiple_of_the_ensemble_size():
    layer = BatchEnsembleConv(2, 3, ensemble_size=M)
    with pytest.raises(ValueError, match="multiple of ensemble_size = 3"):
        layer(_normal((4, 8, 8, 1), 0))
    fn = tf.function(layer, input_signature=[tf.TensorSpec([None, 8, 8, 1])])
    assert fn(_normal((6, 8, 8, 1), 0)).shape == (6, 8, 8, 2)
    with pytest.raises(tf.errors.InvalidArgumentError, match="multiple of ensemble_size"):
        fn(_normal((4, 8, 8, 1), 0))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(filters=0), "`filters` must be a positive int"),
        (dict(ensemble_size=0), "`ensemble_size` must be a positive int"),
        (dict(ensemble_size=True), "`ensemble_size` must be a positive int"),
        (dict(rank=4), r"`rank` must be one of \(1, 2, 3\)"),
        (dict(padding="causal"), "`padding` must be one of"),
        (dict(kernel_size=(3, 3, 3)), "`kernel_size` must be a positive int or 2"),
        (dict(strides=0), "`strides` must be a positive int"),
    ],
)
def test_bad_arguments(kwargs, match):
    args = dict(filters=4, kernel_size=3, ensemble_size=2) | kwargs
    with pytest.raises(ValueError, match=match):
        BatchEnsembleConv(**args)


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"`inputs` must have rank 4"):
        BatchEnsembleConv(4, 3, ensemble_size=2)(_normal((2, 8, 8), 0))
    with pytest.raises(ValueError, match="known channel count"):
        BatchEnsembleConv(4, 3, ensemble_size=2).build((None, 8, 8, None))
