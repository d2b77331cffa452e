import keras
import numpy as np
import pytest
import tensorflow as tf

from tests.helpers import run_layer_test
from tfp_seg import protocols
from tfp_seg.layers import CategoricalLogits, HeteroscedasticLogits, LowRankLogits
from tfp_seg.models import ProbabilisticSegmenter, ProbabilisticUNet, UNet, sampling
from tfp_seg.models.wrappers import DeepEnsemble, MCDropout


def _toy(n=8, size=16, seed=0):
    """Images whose label is a thresholded bright square: learnable in a few steps."""
    rng = np.random.default_rng(seed)
    x = np.zeros((n, size, size, 1), "float32")
    y = np.zeros((n, size, size), "int32")
    for i in range(n):
        r, c = rng.integers(2, size - 8, 2)
        x[i, r : r + 6, c : c + 6] = 1.0
        y[i, r : r + 6, c : c + 6] = 1
    x += 0.05 * rng.normal(size=x.shape).astype("float32")
    return x, y


def test_unet_layer_contract():
    run_layer_test(
        UNet,
        dict(base_filters=4, depth=2),
        input_shape=(2, 16, 16, 3),
        expected_output_shape=(2, 16, 16, 4),
        atol=1e-5,
    )


@pytest.mark.parametrize("channels", [1, 5])
def test_unet_any_channel_count_and_size(channels):
    net = UNet(base_filters=4, depth=2)
    assert net(tf.zeros([1, 24, 32, channels])).shape == (1, 24, 32, 4)
    default = UNet()
    assert default.downsampling_factor == 16
    assert default(tf.zeros([1, 32, 16, channels])).shape == (1, 32, 16, 32)


def test_unet_rejects_indivisible_size_and_bad_args():
    with pytest.raises(ValueError, match="divisible by 2\\*\\*depth = 4"):
        UNet(base_filters=4, depth=2)(tf.zeros([1, 18, 16, 1]))
    with pytest.raises(ValueError, match="`inputs` must have rank 4"):
        UNet(base_filters=4, depth=1)(tf.zeros([16, 16, 1]))
    with pytest.raises(ValueError, match="`norm`"):
        UNet(norm="layer")
    with pytest.raises(ValueError, match="`depth`"):
        UNet(depth=-1)


@pytest.mark.parametrize("norm", ["group", None])
def test_unet_norm_variants(norm):
    net = UNet(base_filters=8, depth=1, norm=norm)
    assert net(tf.zeros([1, 8, 8, 2])).shape == (1, 8, 8, 8)


@pytest.mark.parametrize(
    "head_factory", [lambda: LowRankLogits(2, rank=3), lambda: CategoricalLogits(2)]
)
def test_segmenter_fit_lowers_loss_and_round_trips(tmp_path, head_factory):
    keras.utils.set_random_seed(0)
    x, y = _toy()
    model = ProbabilisticSegmenter(UNet(base_filters=8, depth=2), head_factory())
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss="auto")
    history = model.fit(x, y, batch_size=4, epochs=8, verbose=0)
    losses = history.history["loss"]
    assert losses[-1] < 0.7 * losses[0], losses

    probs = model.predict_proba(x[:2], num_samples=4, seed=1)
    assert probs.shape == (2, 16, 16, 2)
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
    maps = model.sample(x[:3], num_samples=4, seed=1)
    assert maps.shape == (4, 3, 16, 16) and maps.dtype == np.int32
    assert model.sample_logits(x[:2], 2, seed=0).shape == (2, 2, 16, 16, 2)
    dist = model.distribution(x[:2])
    assert dist.batch_shape == [2] and dist.event_shape == [16, 16, 2]

    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path, safe_mode=True)
    np.testing.assert_allclose(loaded(x[:2]).numpy(), model(x[:2]).numpy(), atol=1e-5)
    assert type(loaded.loss) is type(model.loss)
    np.testing.assert_allclose(
        loaded.predict_proba(x[:2], 4, seed=1), model.predict_proba(x[:2], 4, seed=1), atol=1e-5
    )
    loaded.fit(x, y, batch_size=4, epochs=1, verbose=0)  # compiled state restored


def test_segmenter_batching_and_seeds():
    x = np.random.default_rng(0).normal(size=(5, 8, 8, 1)).astype("float32")
    det = ProbabilisticSegmenter(UNet(base_filters=4, depth=1), CategoricalLogits(2))
    whole = det.predict_proba(x, batch_size=None)
    np.testing.assert_allclose(det.predict_proba(x, batch_size=2), whole, atol=1e-6)
    ssn = ProbabilisticSegmenter(UNet(base_filters=4, depth=1), LowRankLogits(2, rank=2))
    a = ssn.predict_proba(x, num_samples=4, seed=3, batch_size=2)
    b = ssn.predict_proba(x, num_samples=4, seed=3, batch_size=2)
    c = ssn.predict_proba(x, num_samples=4, seed=4, batch_size=2)
    assert a.shape == (5, 8, 8, 2)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-4


def test_segmenter_input_errors():
    model = ProbabilisticSegmenter(UNet(base_filters=4, depth=1), CategoricalLogits(2))
    with pytest.raises(ValueError, match="`inputs`"):
        model(tf.zeros([8, 8, 1]))
    bad = np.zeros((1, 8, 8, 1), "float32")
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(tf.errors.InvalidArgumentError, match="`inputs` contains NaN"):
        model(bad)
    with pytest.raises(ValueError, match="empty batch"):
        model.predict_proba(np.zeros((0, 8, 8, 1), "float32"))
    with pytest.raises(ValueError, match="`head`"):
        ProbabilisticSegmenter(UNet(), keras.layers.Dense(2))


def test_backbone_at_lower_resolution_is_rejected():
    backbone = keras.Sequential([keras.layers.Conv2D(4, 3, strides=2, padding="same")])
    model = ProbabilisticSegmenter(backbone, CategoricalLogits(2))
    with pytest.raises(ValueError, match="input resolution"):
        model(tf.zeros([1, 8, 8, 1]))


# --- the one model-level Sampler: same arguments, defaults and seeds for every model ------------
def _sampler_segmenter():
    model = ProbabilisticSegmenter(UNet(base_filters=4, depth=1), LowRankLogits(3, rank=2))
    model.build((None, 8, 8, 1))
    return model


def _sampler_prob_unet():
    model = ProbabilisticUNet(
        num_classes=3,
        latent_dim=2,
        backbone=UNet(base_filters=4, depth=1),
        encoder_convs_per_block=1,
    )
    model.build((None, 8, 8, 1))
    return model


def _sampler_mc_dropout():
    model = ProbabilisticSegmenter(
        UNet(base_filters=4, depth=1, dropout=0.5), HeteroscedasticLogits(3)
    )
    model.build((None, 8, 8, 1))
    return MCDropout(model, num_samples=3)


def _sampler_ensemble():
    members = []
    for _ in range(2):
        member = ProbabilisticSegmenter(UNet(base_filters=4, depth=1), HeteroscedasticLogits(3))
        member.build((None, 8, 8, 1))
        members.append(member)
    return DeepEnsemble(members)


SAMPLERS = {
    "segmenter": (_sampler_segmenter, 16),
    "prob_unet": (_sampler_prob_unet, 16),
    "mc_dropout": (_sampler_mc_dropout, 3),
    "ensemble": (_sampler_ensemble, 2),
}
READ_OUTS = ("sample_logits", "sample", "probability_samples", "predict_proba")


@pytest.fixture(scope="module", params=list(SAMPLERS))
def sampler(request):
    factory, default_n = SAMPLERS[request.param]
    return request.param, factory(), default_n


def _x(b=3, seed=0):
    return np.random.default_rng(seed).normal(size=(b, 8, 8, 1)).astype("float32")


def test_every_sampler_is_the_one_base_with_its_default_num_samples(sampler):
    name, model, default_n = sampler
    assert isinstance(model, sampling.Sampler)
    assert isinstance(model, protocols.Sampler)
    assert model.default_num_samples == default_n
    x = _x(2)
    assert model.sample_logits(x).shape == (default_n, 2, 8, 8, 3)
    assert model.sample(x).shape == (default_n, 2, 8, 8)
    assert model.probability_samples(x).shape == (default_n, 2, 8, 8, 3)
    assert model.predict_proba(x).shape == (2, 8, 8, 3)
    assert model.sample_logits(x, 2).dtype == np.float32
    assert model.sample(x, 2).dtype == np.int32


@pytest.mark.parametrize("method", READ_OUTS)
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_samples": 0}, "`num_samples` must be a positive int; got 0"),
        ({"num_samples": -2}, "`num_samples` must be a positive int"),
        ({"num_samples": 2.0}, "`num_samples` must be a positive int"),
        ({"num_samples": True}, "`num_samples` must be a positive int"),
        ({"num_samples": "4"}, "`num_samples` must be a positive int"),
        ({"batch_size": 0}, "`batch_size` must be None or a positive int; got 0"),
        ({"batch_size": 1.5}, "`batch_size` must be None or a positive int"),
        ({"batch_size": True}, "`batch_size` must be None or a positive int"),
        ({"seed": 1.5}, "`seed` must be None, an int or a pair of ints"),
        ({"seed": [1, 2, 3]}, "`seed` must be None, an int or a pair of ints"),
        ({"seed": "7"}, "`seed` must be None, an int or a pair of ints"),
        ({"seed": True}, "`seed` must be None, an int or a pair of ints"),
        ({"x": np.zeros((8, 8, 1), "float32")}, r"`x` must have rank 4 .*got shape \(8, 8, 1\)"),
        ({"x": np.zeros((0, 8, 8, 1), "float32")}, "`x` is an empty batch"),
    ],
)
def test_every_sampler_rejects_the_same_arguments_the_same_way(sampler, method, kwargs, match):
    _, model, _ = sampler
    kwargs = dict({"x": _x(2), "num_samples": 2}, **kwargs)
    with pytest.raises(ValueError, match=match):
        getattr(model, method)(**kwargs)


@pytest.mark.parametrize("method", ["sample_logits", "sample"])
def test_antithetic_needs_an_even_count_and_a_sampler_that_mirrors(sampler, method):
    name, model, _ = sampler
    read_out = getattr(model, method)
    if name in ("mc_dropout", "ensemble"):
        with pytest.raises(ValueError, match="`antithetic=True` is not supported"):
            read_out(_x(2), 2, antithetic=True)
        return
    with pytest.raises(ValueError, match="must be even with antithetic=True"):
        read_out(_x(2), 3, antithetic=True)
    assert read_out(_x(2), 4, seed=0, antithetic=True).shape[0] == 4


def test_every_sampler_seeds_alike(sampler):
    """int, NumPy int and pair seeds; reproducible; batch 0 uses the seed itself and every
    later batch its own noise (`fold_seed(seed, k)`), so images in different batches differ."""
    name, model, _ = sampler
    x = np.repeat(_x(1), 3, axis=0)  # the same image three times
    a = model.sample_logits(x, 2, seed=5, batch_size=1)
    np.testing.assert_array_equal(a, model.sample_logits(x, 2, seed=5, batch_size=1))
    np.testing.assert_array_equal(a, model.sample_logits(x, 2, seed=np.int64(5), batch_size=1))
    np.testing.assert_array_equal(a[:, :1], model.sample_logits(x[:1], 2, seed=5))
    assert np.abs(a[:, 0] - a[:, 1]).max() > 1e-4 and np.abs(a[:, 1] - a[:, 2]).max() > 1e-4
    pair = model.sample_logits(x, 2, seed=[5, 1], batch_size=1)
    np.testing.assert_array_equal(pair, model.sample_logits(x, 2, seed=(5, 1), batch_size=1))
    tensor_seed = tf.constant([5, 1], tf.int64)
    np.testing.assert_array_equal(pair, model.sample_logits(x, 2, seed=tensor_seed, batch_size=1))
    assert np.abs(pair - a).max() > 1e-4
    # the same draws in probability_samples; labels from the same sampler for every seed form
    probs = model.probability_samples(x, 2, seed=5, batch_size=1)
    np.testing.assert_allclose(probs, tf.nn.softmax(a, -1).numpy(), atol=1e-6)
    labels = model.sample(x, 2, seed=5, batch_size=1)
    np.testing.assert_array_equal(labels, model.sample(x, 2, seed=5, batch_size=1))
    assert labels.min() >= 0 and labels.max() < 3
    mean = model.predict_proba(x, 4, seed=5, batch_size=2)
    np.testing.assert_array_equal(mean, model.predict_proba(x, 4, seed=5, batch_size=2))
    np.testing.assert_allclose(mean.sum(-1), 1.0, rtol=1e-5)


def test_labels_are_the_arg_max_when_no_head_draws_them():
    """The label sampler is the sampler's: the arg max of the logit samples when no distribution
    head draws them (Prob U-Net latents, mean logits under MC dropout), else the head's."""
    x = _x(2)
    prob_unet = _sampler_prob_unet()
    np.testing.assert_array_equal(
        prob_unet.sample(x, 3, seed=1), prob_unet.sample_logits(x, 3, seed=1).argmax(-1)
    )
    mc = MCDropout(_sampler_mc_dropout().model, num_samples=3, head_sampling=False)
    np.testing.assert_array_equal(mc.sample(x, seed=1), mc.sample_logits(x, seed=1).argmax(-1))


def test_segmenter_read_outs_run_compiled_with_the_eager_values():
    """`ProbabilisticSegmenter` read-outs run one cached `tf.function` per (read-out, N,
    antithetic, head settings, input signature with any batch size); seeded calls return what
    the eager head methods return for the same seed, as writable arrays."""
    model = ProbabilisticSegmenter(UNet(base_filters=4, depth=1), LowRankLogits(3, rank=2))
    x = _x(3)
    first = model.sample(x, 4, seed=7)  # unbuilt: eager once, building the model
    params = model(x, training=False)
    eager = model.head.sample_labels(params, 4, seed=7, antithetic=False).numpy()
    np.testing.assert_array_equal(first, eager)
    np.testing.assert_array_equal(model.sample(x, 4, seed=7), eager)
    np.testing.assert_allclose(
        model.predict_proba(x, 4, seed=7),
        model.head.mean_probabilities(params, 4, seed=7).numpy(),
        atol=1e-6,
    )
    np.testing.assert_allclose(
        model.sample_logits(x, 4, seed=7),
        model.head.sample_logits(params, 4, seed=7, antithetic=False).numpy(),
        atol=1e-5,
    )
    out = model.sample(x, 4, seed=7)
    assert out.flags.writeable
    keys = set(model._read_out_cache)
    model.sample(x[:2], 4, seed=1)  # another batch size: the same trace
    model.sample(x, 4)  # seed=None: a fresh stateless seed, the same trace
    assert set(model._read_out_cache) == keys
    unseeded = [model.sample(x, 4) for _ in range(2)]
    assert (unseeded[0] != unseeded[1]).any()
    model.head.antithetic = False  # a head changed in place gets a fresh trace
    model.predict_proba(x, 4, seed=7)
    assert len(model._read_out_cache) == len(keys) + 1
