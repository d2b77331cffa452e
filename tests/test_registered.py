"""Registry-driven harness: every class registered under `tfp_seg>` gets the same checks.

`CASES` maps each registered name (`keras.saving.get_custom_objects()`, keys `tfp_seg>Name`)
to a small instance factory and its inputs; a registered class without an entry fails
`test_every_registered_class_has_a_case`, and `tests/registered_names.txt` (the names saved
`.keras` files refer to) guards against a class silently dropping out of the registry.

```none
kind         checks (keras-hub `run_layer_test` / `run_serialization_test`)
every        from_config(get_config()) and deserialize(serialize()) (JSON, safe_mode) give the
             same serialized config and the same dir(); weight counts equal after build
layer        symbolic (keras.Input) and eager calls agree; ONE fit step of a functional model
             around it (mse), or of the model it serves (`host`: GECO in a ProbabilisticUNet);
             `.keras` round trip (safe_mode): same weights, compiled loss and output
head         the same calls; the fit step (moving every head weight) and `.keras` round trip
             through ProbabilisticSegmenter(UNet(base_filters=4, depth=1), head), loss="auto"
model        symbolic and eager calls agree; ONE fit step; `.keras` round trip as for layers
loss         finite on random inputs; the revived losses give the same value (on parameters
             with ~0 variance for the Monte Carlo losses, which draw unseeded samples)
metric       update_state / result over two batches equal for the original and revived
initializer  the same values after both round trips
```

Factories use non-default arguments so that a `get_config` that forgets one shows up as a
config that is not a fixed point.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Optional

import keras
import numpy as np
import pytest
import tensorflow_probability as tfp

import tfp_seg
from tests import helpers

PREFIX = "tfp_seg>"
SNAPSHOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "registered_names.txt")
C = 3  # classes


def registered_names() -> set:
    """The names the library registered under the `tfp_seg` package (after `import tfp_seg`;
    a class a test module might register under that package does not count)."""
    return {
        name
        for name, obj in keras.saving.get_custom_objects().items()
        if name.startswith(PREFIX) and obj.__module__.split(".")[0] == "tfp_seg"
    }


def registered(name: str):
    """The class registered as `tfp_seg>name` (for classes without a public module name)."""
    return keras.saving.get_custom_objects()[PREFIX + name]


# --- data --------------------------------------------------------------------------------------
def _normal(shape, seed, scale=1.0):
    return (scale * np.random.default_rng(seed).normal(size=shape)).astype("float32")


def _labels(shape, seed=0, classes=C):
    return np.random.default_rng(seed).integers(0, classes, size=shape).astype("int32")


IMAGES = _normal((2, 8, 8, 3), 0)  # divisible by 2**depth of UNet(depth=1)
LABELS = _labels((2, 8, 8), 1)
FEATURES = _normal((2, 8, 8, 4), 2)


# --- the cases ---------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Case:
    """How to build and exercise one registered class.

    kind: "layer", "head", "model", "loss", "metric" or "initializer".
    make: a fresh, small instance (non-default arguments).
    data: layer: positional call arguments (a tuple of array structures);
      head: the features; model: `(x, y, compile kwargs)`; loss: `(random, stable)` inputs;
      metric: a list of `(y_true, y_pred)` batches; initializer: a shape.
    evaluate: loss only: `evaluate(loss, inputs)` -> values (default `loss(*inputs)`).
    host: layer only: `host(layer)` -> `(model, x, y, compile kwargs)`, the model that takes
      the fit step and the `.keras` round trip (default: a functional model around the layer).
    slow / xfail: marks of its tests (xfail: the reason, strict).
    """

    kind: str
    make: Callable[[], Any]
    data: Callable[[], Any]
    evaluate: Optional[Callable[[Any, Any], Any]] = None
    host: Optional[Callable[[Any], tuple]] = None
    slow: bool = False
    xfail: Optional[str] = None

    @property
    def marks(self) -> list:
        marks = [pytest.mark.slow] if self.slow else []
        if self.xfail:
            marks.append(pytest.mark.xfail(strict=True, reason=self.xfail))
        return marks


def _tiny_cnn():
    """A plain functional CNN without a feature pyramid (strides 2 and 4)."""
    inputs = keras.Input((None, None, 3))
    x = keras.layers.Conv2D(4, 3, strides=2, padding="same", name="s2_conv")(inputs)
    x = keras.layers.ReLU(name="s2_relu")(x)
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", name="s4_conv")(x)
    return keras.Model(inputs, x, name="tiny_cnn")


def _backbone_adapter():
    # The smallest keras-hub ResNet (its first stage must have 64 filters): P2 and P3, FPN.
    import keras_hub  # a test dependency: missing, it fails

    resnet = keras_hub.models.ResNetBackbone(
        input_conv_filters=[64],
        input_conv_kernel_sizes=[3],
        stackwise_num_filters=[64, 8],
        stackwise_num_blocks=[1, 1],
        stackwise_num_strides=[1, 2],
        block_type="basic_block",
        image_shape=(None, None, 3),
    )
    return tfp_seg.models.BackboneAdapter(
        resnet, feature_level="auto", fusion_filters=4, upsample="nearest", input_channels=1
    )


def _segmenter_features():
    import keras_cv  # a test dependency: missing, it fails

    resnet = keras_cv.models.ResNetBackbone(
        stackwise_filters=[64, 8, 8, 8],
        stackwise_blocks=[1, 1, 1, 1],
        stackwise_strides=[1, 2, 2, 2],
        block_type="basic_block",
        include_rescaling=False,
        input_shape=(32, 32, 3),
    )
    deeplab = keras_cv.models.DeepLabV3Plus(backbone=resnet, num_classes=2, projection_filters=4)
    return registered("SegmenterFeatures")(deeplab, name="deeplab_features")


def _small_prob_unet(**kwargs):
    return tfp_seg.models.ProbabilisticUNet(
        C,
        latent_dim=2,
        backbone=tfp_seg.models.UNet(base_filters=4, depth=1),
        encoder_filters=(4, 8),
        encoder_convs_per_block=1,
        fcomb_filters=4,
        num_fcomb_convs=1,
        **kwargs,
    )


def _fit_zeros(x, model_output_shape):
    return (x, np.zeros(model_output_shape, "float32"), {"loss": "mse"})


def _ssn_loss():
    head = tfp_seg.layers.LowRankLogits(C, rank=2, epsilon=1e-10)
    return tfp_seg.losses.StochasticSegmentationNLL(
        head,
        num_samples=4,
        antithetic=False,
        class_weights=[1.0, 2.0, 0.5],
        marginal_weight=0.5,
        chunk_size=2,
        mean_weight=0.25,
        name="ssn_nll",
    )


def _ssn_inputs():
    params = _normal((2, 4, 4, C * (2 + 2)), 3, 0.5)
    stable = params.copy()
    stable[..., C : 2 * C] = -30.0  # D = exp(-30) + 1e-10: the samples are the mean
    stable[..., 2 * C :] = 0.0
    labels = _labels((2, 4, 4), 4)
    return (labels, params), (labels, stable)


def _mixture_loss():
    head = tfp_seg.layers.MixtureLowRankLogits(C, num_components=2, rank=2, epsilon=1e-10)
    return tfp_seg.losses.MixtureNLL(
        head,
        num_samples=4,
        antithetic=False,
        class_weights=[1.0, 2.0, 0.5],
        marginal_weight=0.5,
        chunk_size=2,
        name="mixture_nll_test",
    )


def _mixture_inputs():
    k, s = 2, C * (2 + 2)
    params = _normal((2, 4, 4, k * s + k), 22, 0.5)
    stable = params.copy()
    for j in range(k):  # D = exp(-30) + 1e-10, P = 0: every sample is its component's mean
        stable[..., j * s + C : j * s + 2 * C] = -30.0
        stable[..., j * s + 2 * C : (j + 1) * s] = 0.0
    labels = _labels((2, 4, 4), 23)
    return (labels, params), (labels, stable)


def _heteroscedastic_inputs():
    params = _normal((2, 4, 4, 2 * C), 5, 0.5)
    stable = params.copy()
    stable[..., C:] = -20.0  # sigma = 4.5e-5
    labels = _labels((2, 4, 4), 6)
    return (labels, params), (labels, stable)


def _ce_inputs():
    inputs = (_labels((2, 4, 4), 7), _normal((2, 4, 4, C + 1), 8))
    return inputs, inputs


def _elbo_inputs():
    tfd = tfp.distributions
    posterior = tfd.MultivariateNormalDiag(_normal((2, 2), 9), np.exp(_normal((2, 2), 10, 0.3)))
    prior = tfd.MultivariateNormalDiag(_normal((2, 2), 11), np.exp(_normal((2, 2), 12, 0.3)))
    inputs = (_labels((2, 4, 4), 13), _normal((2, 4, 4, C), 14), posterior, prior)
    return inputs, inputs


def _metric_batches(params_size):
    return [(_labels((2, 4, 4), 20 + k), _normal((2, 4, 4, params_size), 30 + k)) for k in (0, 1)]


CASES = {
    # --- heads (tfp_seg.layers.DistributionHead) ---
    "tfp_seg>CategoricalLogits": Case(
        "head",
        lambda: tfp_seg.layers.CategoricalLogits(
            C, kernel_size=3, kernel_initializer="he_normal", validate_args=False
        ),
        lambda: FEATURES,
    ),
    "tfp_seg>HeteroscedasticLogits": Case(
        "head",
        lambda: tfp_seg.layers.HeteroscedasticLogits(
            C, low_rank_classes=2, antithetic=True, kernel_size=3, temperature=0.5
        ),
        lambda: FEATURES,
    ),
    "tfp_seg>LowRankLogits": Case(
        "head",
        lambda: tfp_seg.layers.LowRankLogits(
            C,
            rank=2,
            epsilon=1e-4,
            diagonal_transform="softplus",
            antithetic=False,
            factor_init_scale=0.1,
            initial_diagonal=0.05,
        ),
        lambda: FEATURES,
    ),
    "tfp_seg>MixtureLowRankLogits": Case(
        "head",
        lambda: tfp_seg.layers.MixtureLowRankLogits(
            C,
            num_components=2,
            rank=2,
            epsilon=1e-4,
            diagonal_transform="softplus",
            antithetic=False,
            kernel_size=3,
            factor_init_scale=0.0,
            initial_diagonal=2.0,
        ),
        lambda: FEATURES,
    ),
    # --- other layers ---
    "tfp_seg>LatentEncoder": Case(
        "layer",
        lambda: tfp_seg.layers.LatentEncoder(
            latent_dim=2,
            filters=(4, 8),
            convs_per_block=1,
            activation="tanh",
            epsilon=1e-3,
            kernel_initializer="glorot_uniform",
            validate_args=False,
        ),
        lambda: (IMAGES,),
    ),
    "tfp_seg>LatentInjection": Case(
        "layer",
        lambda: tfp_seg.layers.LatentInjection(
            C, filters=4, num_convs=2, activation="tanh", kernel_initializer="glorot_uniform"
        ),
        lambda: (FEATURES, _normal((2, 2), 15)),
    ),
    "tfp_seg>HierarchicalLatent": Case(
        "layer",
        lambda: tfp_seg.layers.HierarchicalLatent(
            latent_dim=2,
            filters=(4, 8, 8),
            latent_levels=2,
            convs_per_block=1,
            activation="tanh",
            kernel_initializer="glorot_uniform",
            epsilon=1e-3,
        ),
        lambda: (IMAGES,),
    ),
    "tfp_seg>SpatialLatentInjection": Case(
        "layer",
        lambda: tfp_seg.layers.SpatialLatentInjection(
            C, filters=4, num_convs=2, activation="tanh", kernel_initializer="glorot_uniform"
        ),
        lambda: (FEATURES, _normal((2, 8, 8, 3), 16)),
    ),
    "tfp_seg>GECO": Case(
        "layer",
        lambda: tfp_seg.losses.GECO(
            target=0.5,
            alpha=0.9,
            speed=0.05,
            initial_multiplier=2.0,
            min_multiplier=1e-3,
            max_multiplier=1e3,
            max_log_step=0.2,
        ),
        # Called on per-example values (inference: elementwise); it trains on the batch's
        # scalar reconstruction inside ProbabilisticUNet, which also saves its state.
        lambda: (np.abs(_normal((2, 1), 16)) + 1.0,),
        host=lambda geco: (_small_prob_unet(geco=geco), IMAGES, LABELS, {}),
    ),
    "tfp_seg>ResizeToReference": Case(
        "layer",
        lambda: registered("ResizeToReference")("nearest"),
        lambda: ([_normal((2, 4, 4, 3), 17), _normal((2, 8, 8, 1), 18)],),
    ),
    "tfp_seg>BatchEnsembleConv": Case(
        "layer",
        lambda: tfp_seg.layers.BatchEnsembleConv(
            4,
            (3, 1),
            ensemble_size=2,
            strides=(1, 2),
            padding="valid",
            dilation_rate=1,
            use_bias=False,
            kernel_initializer="he_normal",
            scale_initializer="ones",
            bias_initializer="ones",
        ),
        lambda: (_normal((4, 8, 8, 3), 24),),  # 2 members x 2 images
    ),
    "tfp_seg>PackedConv": Case(
        "layer",
        lambda: tfp_seg.layers.PackedConv(
            4,
            3,
            ensemble_size=2,
            alpha=1.5,
            gamma=2,
            first=False,
            strides=2,
            padding="valid",
            kernel_initializer="he_normal",
            bias_initializer="ones",
            implementation="split",
        ),
        lambda: (_normal((2, 9, 9, 8), 25),),  # 2 members x 4 channels
    ),
    # --- models ---
    "tfp_seg>UNet": Case(
        "model",
        lambda: tfp_seg.models.UNet(
            base_filters=4,
            depth=1,
            filters_multiplier=3,
            convs_per_block=1,
            norm="batch",
            activation="elu",
            dropout=0.1,
        ),
        lambda: _fit_zeros(IMAGES, (2, 8, 8, 4)),
    ),
    "tfp_seg>ProbabilisticSegmenter": Case(
        "model",
        lambda: tfp_seg.models.ProbabilisticSegmenter(
            tfp_seg.models.UNet(base_filters=4, depth=1),
            tfp_seg.layers.HeteroscedasticLogits(C),
            validate_inputs=False,
        ),
        lambda: (IMAGES, LABELS, {"loss": "auto"}),
    ),
    "tfp_seg>ProbabilisticUNet": Case(
        "model",
        lambda: tfp_seg.models.ProbabilisticUNet(
            C,
            latent_dim=2,
            beta=0.5,
            backbone=tfp_seg.models.UNet(base_filters=4, depth=1),
            encoder_filters=(4, 8),
            encoder_convs_per_block=1,
            fcomb_filters=4,
            num_fcomb_convs=1,
            reconstruction="mean",
            ignore_label=255,
            class_weights=[1.0, 2.0, 1.0],
            epsilon=1e-3,
        ),
        lambda: (IMAGES, LABELS, {}),
    ),
    "tfp_seg>HierarchicalProbabilisticUNet": Case(
        "model",
        lambda: tfp_seg.models.HierarchicalProbabilisticUNet(
            C,
            latent_dim=2,
            latent_levels=2,
            beta=0.5,
            backbone=tfp_seg.models.UNet(base_filters=4, depth=1),
            encoder_filters=(4, 8, 8),
            encoder_convs_per_block=1,
            fcomb_filters=4,
            num_fcomb_convs=1,
            reconstruction="mean",
            ignore_label=255,
            class_weights=[1.0, 2.0, 1.0],
            epsilon=1e-3,
        ),
        lambda: (IMAGES, LABELS, {}),
    ),
    "tfp_seg>EnsembleSegmenter": Case(
        "model",
        lambda: tfp_seg.models.EnsembleSegmenter(
            tfp_seg.models.UNet(
                base_filters=4,
                depth=1,
                ensemble="packed",
                ensemble_size=2,
                alpha=1.5,
                gamma=2,
            ),
            tfp_seg.layers.LowRankLogits(C, rank=2),
            validate_inputs=False,
        ),
        lambda: (IMAGES, LABELS, {"loss": "auto"}),
    ),
    "tfp_seg>BackboneAdapter": Case(
        "model", _backbone_adapter, lambda: _fit_zeros(_normal((2, 16, 16, 1), 19), (2, 16, 16, 4))
    ),
    "tfp_seg>PyramidEncoder": Case(
        "model",
        lambda: registered("PyramidEncoder")(_tiny_cnn(), name="pyramid"),
        lambda: (
            IMAGES,
            {"P1": np.zeros((2, 4, 4, 4), "float32"), "P2": np.zeros((2, 2, 2, 8), "float32")},
            {"loss": "mse"},
        ),
    ),
    "tfp_seg>SegmenterFeatures": Case(
        "model",
        _segmenter_features,
        lambda: _fit_zeros(_normal((2, 32, 32, 3), 21), (2, 32, 32, 256)),
        slow=True,
    ),
    # --- losses ---
    "tfp_seg>StochasticSegmentationNLL": Case("loss", _ssn_loss, _ssn_inputs),
    "tfp_seg>MixtureNLL": Case("loss", _mixture_loss, _mixture_inputs),
    "tfp_seg>HeteroscedasticNLL": Case(
        "loss",
        lambda: tfp_seg.losses.HeteroscedasticNLL(
            tfp_seg.layers.HeteroscedasticLogits(C),
            num_samples=6,
            antithetic=True,
            ignore_label=0,
            normalize="none",
            name="het_nll",
            temperature=2.0,
        ),
        _heteroscedastic_inputs,
    ),
    "tfp_seg>SegmentationCrossEntropy": Case(
        "loss",
        lambda: tfp_seg.losses.SegmentationCrossEntropy(
            num_classes=C, ignore_label=2, class_weights=[1.0, 0.5, 2.0], normalize="none"
        ),
        _ce_inputs,
    ),
    "tfp_seg>ELBO": Case(
        "loss",
        lambda: tfp_seg.losses.ELBO(
            beta=0.5,
            reconstruction="mean",
            geco=tfp_seg.losses.GECO(target=1.0),
            class_weights=[1.0, 2.0, 0.5],
            validate_args=False,
            name="elbo_test",
        ),
        _elbo_inputs,
        evaluate=lambda elbo, inputs: elbo(*inputs),
    ),
    # --- metrics ---
    "tfp_seg>StreamingMeanIoU": Case(
        "metric",
        lambda: tfp_seg.metrics.StreamingMeanIoU(
            C, ignore_label=0, from_logits=True, name="miou", predictive=False
        ),
        lambda: _metric_batches(C + 1),
    ),
    "tfp_seg>StreamingECE": Case(
        "metric",
        lambda: tfp_seg.metrics.StreamingECE(
            C,
            num_bins=5,
            head=tfp_seg.layers.LowRankLogits(C, rank=2),
            num_samples=4,
            seed=3,
            name="ece_low_rank",
        ),
        lambda: _metric_batches(C * (2 + 2)),
    ),
    "tfp_seg>StreamingNLL": Case(
        "metric",
        lambda: tfp_seg.metrics.StreamingNLL(
            C, eps=1e-6, head=tfp_seg.layers.HeteroscedasticLogits(C), num_samples=4, seed=5
        ),
        lambda: _metric_batches(2 * C),
    ),
    "tfp_seg>StreamingBrier": Case(
        "metric",
        lambda: tfp_seg.metrics.StreamingBrier(C, from_logits=True, ignore_label=1, name="bs"),
        lambda: _metric_batches(C),
    ),
    # --- initializers ---
    "tfp_seg>HeteroscedasticBiasInitializer": Case(
        "initializer",
        lambda: registered("HeteroscedasticBiasInitializer")(
            num_classes=C, low_rank_classes=1, log_variance=-4.0
        ),
        lambda: (C * (2 + 1),),
    ),
    "tfp_seg>LowRankBiasInitializer": Case(
        "initializer",
        lambda: registered("LowRankBiasInitializer")(
            num_classes=C, rank=2, raw_diagonal=-4.0, num_components=2
        ),
        lambda: (2 * C * (2 + 2),),
    ),
    "tfp_seg>LowRankKernelInitializer": Case(
        "initializer",
        lambda: registered("LowRankKernelInitializer")(
            keras.initializers.GlorotNormal(seed=3),
            num_classes=C,
            rank=2,
            factor_scale=0.1,
            num_components=2,
        ),
        lambda: (1, 1, 5, 2 * C * (2 + 2)),
    ),
}


def _params(*kinds):
    return [
        pytest.param(name, marks=case.marks, id=name[len(PREFIX) :])
        for name, case in sorted(CASES.items())
        if not kinds or case.kind in kinds
    ]


def _single(structure):
    flat = keras.tree.flatten(structure)
    return flat[0] if len(flat) == 1 else flat


def _call_args(case) -> tuple:
    """Positional call arguments of a layer, head or model case."""
    if case.kind == "layer":
        return case.data()
    if case.kind == "head":
        return (case.data(),)
    return (case.data()[0],)


# --- the registry ------------------------------------------------------------------------------
def test_every_registered_class_has_a_case():
    names = registered_names()
    missing, stale = sorted(names - set(CASES)), sorted(set(CASES) - names)
    assert not missing and not stale, (
        f"Registered without a case in tests/test_registered.py CASES: {missing}; "
        f"cases of names that are not registered: {stale}."
    )


def test_registered_names_match_the_snapshot():
    with open(SNAPSHOT, encoding="utf-8") as f:
        snapshot = {line.strip() for line in f if line.strip() and not line.startswith("#")}
    names = registered_names()
    removed, added = sorted(snapshot - names), sorted(names - snapshot)
    assert not removed and not added, (
        f"No longer registered: {removed} (saved .keras files that name them no longer load: "
        f"keep the registered name, or keep an alias registered). Newly registered: {added}. "
        "If the change is intended, update tests/registered_names.txt in the same change "
        "(one name per line, sorted)."
    )


# --- every class -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", _params())
def test_config_round_trip(name):
    case = CASES[name]
    instance = case.make()
    revived, deserialized = helpers.run_serialization_test(instance)
    if case.kind in ("layer", "head", "model"):
        # Weight counts after build (from the same inputs).
        args = _call_args(case)
        shapes = []
        for obj in (instance, revived, deserialized):
            obj(*args)
            shapes.append(helpers.weight_shapes(obj))
        assert shapes[1] == shapes[0] and shapes[2] == shapes[0], shapes


# --- layers and heads --------------------------------------------------------------------------
@pytest.mark.parametrize("name", _params("layer", "head"))
def test_layer_calls_fit_and_saving(name, tmp_path):
    case = CASES[name]
    args = _call_args(case)
    symbolic_in, symbolic_out, eager = helpers.run_call_test(case.make(), case.make(), args)
    if case.kind == "head":
        head = case.make()
        assert tuple(eager.shape) == FEATURES.shape[:-1] + (head.params_size,)
        model = tfp_seg.models.ProbabilisticSegmenter(
            tfp_seg.models.UNet(base_filters=4, depth=1), head
        )
        model(IMAGES)  # builds the head
        before = [np.array(w.numpy()) for w in head.trainable_weights]
        helpers.run_fit_step(model, IMAGES, LABELS, loss="auto")
        after = [w.numpy() for w in head.trainable_weights]
        moved = [not np.array_equal(a, b) for a, b in zip(after, before, strict=True)]
        assert moved and all(moved), "the fit step did not move every weight of the head"
        helpers.run_model_saving_test(model, IMAGES, tmp_path)
        return
    if case.host is not None:
        model, x, y, compile_kwargs = case.host(case.make())
    else:
        model = keras.Model(_single(symbolic_in), symbolic_out)
        x, y, compile_kwargs = _single(args), np.zeros(eager.shape, "float32"), {"loss": "mse"}
    helpers.run_fit_step(model, x, y, **compile_kwargs)
    helpers.run_model_saving_test(model, x, tmp_path)


# --- models ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", _params("model"))
def test_model_calls_fit_and_saving(name, tmp_path):
    case = CASES[name]
    x, y, compile_kwargs = case.data()
    model = case.make()
    helpers.run_call_test(case.make(), model, (x,))
    helpers.run_fit_step(model, x, y, **compile_kwargs)
    loaded = helpers.run_model_saving_test(model, x, tmp_path)
    assert loaded.count_params() == model.count_params()


# --- losses ------------------------------------------------------------------------------------
def _evaluate(case, loss, inputs):
    values = case.evaluate(loss, inputs) if case.evaluate else loss(*inputs)
    return keras.tree.map_structure(keras.ops.convert_to_numpy, values)


@pytest.mark.parametrize("name", _params("loss"))
def test_loss_values_survive_the_round_trip(name):
    case = CASES[name]
    loss = case.make()
    random_inputs, stable_inputs = case.data()
    for leaf in keras.tree.flatten(_evaluate(case, loss, random_inputs)):
        assert np.all(np.isfinite(leaf)), f"non-finite loss {leaf}"
    expected = _evaluate(case, loss, stable_inputs)
    revived = [
        type(loss).from_config(loss.get_config()),
        keras.saving.deserialize_keras_object(
            json.loads(json.dumps(keras.saving.serialize_keras_object(loss))), safe_mode=True
        ),
    ]
    for other in revived:
        actual = _evaluate(case, other, stable_inputs)
        keras.tree.map_structure(
            lambda a, e: np.testing.assert_allclose(a, e, rtol=1e-4, atol=1e-6), actual, expected
        )


# --- metrics -----------------------------------------------------------------------------------
def _metric_result(metric, batches) -> float:
    for y_true, y_pred in batches:
        metric.update_state(y_true, y_pred)
    return float(metric.result())


@pytest.mark.parametrize("name", _params("metric"))
def test_metric_results_survive_the_round_trip(name):
    case = CASES[name]
    metric = case.make()
    batches = case.data()
    expected = _metric_result(metric, batches)
    assert np.isfinite(expected)
    revived = [
        type(metric).from_config(metric.get_config()),
        keras.saving.deserialize_keras_object(
            json.loads(json.dumps(keras.saving.serialize_keras_object(metric))), safe_mode=True
        ),
    ]
    for other in revived:
        np.testing.assert_allclose(_metric_result(other, batches), expected, rtol=1e-6)
    metric.reset_state()
    np.testing.assert_allclose(_metric_result(metric, batches), expected, rtol=1e-6)


# --- initializers ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", _params("initializer"))
def test_initializer_values_survive_the_round_trip(name):
    case = CASES[name]
    initializer = case.make()
    shape = case.data()
    expected = keras.ops.convert_to_numpy(initializer(shape, dtype="float32"))
    assert expected.shape == tuple(shape) and np.all(np.isfinite(expected))
    revived = [
        type(initializer).from_config(initializer.get_config()),
        keras.initializers.get(keras.initializers.serialize(initializer)),
    ]
    for other in revived:
        assert type(other) is type(initializer)
        np.testing.assert_array_equal(
            keras.ops.convert_to_numpy(other(shape, dtype="float32")), expected
        )
