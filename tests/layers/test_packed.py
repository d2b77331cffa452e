"""`PackedConv`: M * gamma explicit convolutions (members kept apart), both implementations,
widths, parameter counts, member-wise concatenation and argument errors."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests.helpers import run_layer_test
from tfp_seg.layers import PackedConv
from tfp_seg.layers import packed as packed_module
from tfp_seg.layers.packed import interleave_members, packed_width


def _normal(shape, seed):
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


def _explicit_groups(layer, x):
    """The grouped convolution as `groups` plain keras convolutions: group g reads input block
    g and writes output block g with its slice of the kernel."""
    kernel, bias = layer.kernel.numpy(), layer.bias.numpy()
    g = layer.groups
    inputs = np.split(x, g, axis=-1)
    kernels = np.split(kernel, g, axis=-1)
    biases = np.split(bias, g)
    out = []
    for xi, ki, bi in zip(inputs, kernels, biases, strict=True):
        conv = keras.layers.Conv2D(ki.shape[-1], layer.kernel_size, padding=layer.padding)
        conv.build(xi.shape)
        conv.set_weights([ki, bi])
        out.append(conv(xi).numpy())
    return np.concatenate(out, axis=-1)


@pytest.mark.parametrize("implementation", ["split", "grouped"])
@pytest.mark.parametrize("gamma", [1, 2])
def test_equals_explicit_convolutions_per_group(implementation, gamma):
    layer = PackedConv(
        8,
        3,
        ensemble_size=3,
        alpha=2,
        gamma=gamma,
        bias_initializer="random_normal",
        implementation=implementation,
    )
    x = _normal((2, 7, 7, 3 * 4), 0)  # 3 members of 4 channels
    y = layer(x).numpy()
    assert layer.groups == 3 * gamma and y.shape == (2, 7, 7, 3 * layer.member_filters)
    np.testing.assert_allclose(y, _explicit_groups(layer, x), rtol=1e-5, atol=1e-5)


def test_first_layer_reads_the_whole_input_for_every_member():
    layer = PackedConv(6, 3, ensemble_size=2, alpha=2, first=True, bias_initializer="ones")
    x = _normal((2, 8, 8, 5), 1)
    y = layer(x).numpy()
    c = layer.member_filters
    assert layer.groups == 1 and c == 6 and y.shape == (2, 8, 8, 12)
    for j in range(2):  # member j = a plain convolution of the image with its kernel block
        conv = keras.layers.Conv2D(c, 3, padding="same")
        conv.build(x.shape)
        conv.set_weights(
            [
                layer.kernel.numpy()[..., j * c : (j + 1) * c],
                layer.bias.numpy()[j * c : (j + 1) * c],
            ]
        )
        np.testing.assert_allclose(y[..., j * c : (j + 1) * c], conv(x).numpy(), atol=1e-5)


def test_members_do_not_see_each_other():
    """The Jacobian of member 0's outputs with respect to member 1's inputs is zero, and
    member 1's outputs do depend on them."""
    layer = PackedConv(4, 3, ensemble_size=2, alpha=2, gamma=2, implementation="split")
    x = tf.constant(_normal((1, 6, 6, 8), 2))
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        y = layer(x)
        c = layer.member_filters
        out0, out1 = tf.reduce_sum(y[..., :c] ** 2), tf.reduce_sum(y[..., c:] ** 2)
    g0, g1 = tape.gradient(out0, x).numpy(), tape.gradient(out1, x).numpy()
    assert np.abs(g0[..., 4:]).max() == 0 and np.abs(g0[..., :4]).max() > 0
    assert np.abs(g1[..., :4]).max() == 0 and np.abs(g1[..., 4:]).max() > 0


def test_split_and_grouped_implementations_agree_in_value_and_gradient():
    split = PackedConv(8, 3, ensemble_size=4, alpha=2, implementation="split")
    x = tf.constant(_normal((2, 8, 8, 8), 3))
    split(x)
    grouped = PackedConv.from_config(split.get_config() | {"implementation": "grouped"})
    grouped.build(x.shape)
    grouped.set_weights(split.get_weights())
    np.testing.assert_allclose(grouped(x).numpy(), split(x).numpy(), rtol=1e-5, atol=1e-5)
    # TensorFlow trains one grouped convolution on GPU and oneDNN CPU kernels only; where
    # that holds ("auto" then picks it), its gradient equals the split form's.
    if packed_module._grouped_gradients_supported():
        grads = []
        for layer in (split, grouped):
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(layer(x) ** 2)
            grads.append(tape.gradient(loss, layer.kernel).numpy())
        np.testing.assert_allclose(grads[1], grads[0], rtol=1e-4, atol=1e-3)
    auto = PackedConv(8, 3, ensemble_size=4)
    assert auto._use_split() is (not packed_module._grouped_gradients_supported())


def test_widths_and_parameter_count():
    # c = gamma * ceil(alpha F / (M gamma))
    assert packed_width(16, 2, 4) == 8
    assert packed_width(16, 2, 4, gamma=3) == 9
    assert packed_width(10, 1, 4) == 3
    assert packed_width(1, 0.5, 8) == 1
    layer = PackedConv(16, 3, ensemble_size=4, alpha=2, gamma=2)
    layer.build((None, 8, 8, 4 * 8))
    # k^2 (M c_in / (M gamma)) (M c) + M c  =  9 * 4 * 32 + 32
    assert layer.count_params() == 9 * (32 // 8) * 32 + 32
    plain = keras.layers.Conv2D(16, 3)
    plain.build((None, 8, 8, 16))
    # alpha^2 / (M gamma) = 1/2 of the single network's kernel
    assert layer.kernel.numpy().size == plain.kernel.numpy().size // 2


def test_interleave_members_keeps_each_members_channels_together():
    m = 3
    a = np.arange(2 * m, dtype="float32").reshape(1, 1, 1, 2 * m)  # member j: 2j, 2j+1
    b = 100 + np.arange(m, dtype="float32").reshape(1, 1, 1, m)  # member j: 100 + j
    out = interleave_members([tf.constant(a), tf.constant(b)], m).numpy().ravel()
    np.testing.assert_array_equal(out, [0, 1, 100, 2, 3, 101, 4, 5, 102])
    with pytest.raises(ValueError, match="M \\* c channels"):
        interleave_members([tf.constant(a[..., :5])], m)


def test_layer_contract_fit_and_round_trips():
    run_layer_test(
        PackedConv,
        {"filters": 4, "kernel_size": 3, "ensemble_size": 2, "first": True},
        input_shape=(2, 8, 8, 3),
        expected_output_shape=(2, 8, 8, 8),
    )
    run_layer_test(
        PackedConv,
        {"filters": 4, "kernel_size": 3, "ensemble_size": 2, "implementation": "split"},
        input_shape=(2, 8, 8, 4),
        expected_output_shape=(2, 8, 8, 8),
    )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(alpha=0), "`alpha` must be a positive number"),
        (dict(alpha=True), "`alpha` must be a positive number"),
        (dict(gamma=0), "`gamma` must be a positive int"),
        (dict(ensemble_size=0), "`ensemble_size` must be a positive int"),
        (dict(implementation="fast"), "`implementation` must be one of"),
        (dict(rank=0), "`rank` must be a positive int"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PackedConv(**(dict(filters=4, kernel_size=3, ensemble_size=2) | kwargs))


def test_unpacked_input_channels_are_an_error():
    layer = PackedConv(4, 3, ensemble_size=2, gamma=2)
    with pytest.raises(ValueError, match="multiple of 4.*first=True"):
        layer(_normal((1, 8, 8, 6), 0))


def test_rank_3_runs_per_group():
    layer = PackedConv(4, 3, ensemble_size=2, rank=3, bias_initializer="random_normal")
    x = _normal((1, 4, 4, 4, 4), 5)
    y = layer(x).numpy()
    assert layer._use_split() and y.shape == (1, 4, 4, 4, 8)
    for j in range(2):
        conv = keras.layers.Conv3D(4, 3, padding="same")
        conv.build((1, 4, 4, 4, 2))
        conv.set_weights(
            [layer.kernel.numpy()[..., 4 * j : 4 * j + 4], layer.bias.numpy()[4 * j : 4 * j + 4]]
        )
        np.testing.assert_allclose(
            y[..., 4 * j : 4 * j + 4], conv(x[..., 2 * j : 2 * j + 2]).numpy(), atol=1e-5
        )
