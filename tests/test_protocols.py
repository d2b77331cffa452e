"""The capabilities of `tfp_seg.protocols` are what the package's classes offer, and the
default-loss registry (`tfp_seg._registry`) fails clearly.

`isinstance(obj, protocols.X)` checks only that the members exist; the signature test below
checks that they also take the arguments the protocol states, so the protocols and the classes
cannot drift apart.
"""

import inspect
import typing

import keras
import pytest

from tfp_seg import _registry, losses, protocols
from tfp_seg.layers import CategoricalLogits, HeteroscedasticLogits, LatentEncoder, LowRankLogits
from tfp_seg.models import MCDropout, ProbabilisticSegmenter, ProbabilisticUNet, UNet
from tfp_seg.models.wrappers import DeepEnsemble

C = 3

HEADS = {
    "low_rank": lambda: LowRankLogits(C, rank=2),
    "heteroscedastic": lambda: HeteroscedasticLogits(C),
    "heteroscedastic_low_rank": lambda: HeteroscedasticLogits(C, low_rank_classes=2),
    "categorical": lambda: CategoricalLogits(C),
}
COVARIANCE_HEADS = {"low_rank", "heteroscedastic", "heteroscedastic_low_rank"}
PLANAR_HEADS = {"low_rank"}  # the fused class-planar sampling-and-scoring path of the loss
DEFAULT_LOSSES = {
    "low_rank": losses.StochasticSegmentationNLL,
    "heteroscedastic": losses.HeteroscedasticNLL,
    "heteroscedastic_low_rank": losses.HeteroscedasticNLL,
    "categorical": losses.SegmentationCrossEntropy,
}


def _segmenter(head=None, dropout=0.0):
    model = ProbabilisticSegmenter(
        UNet(base_filters=4, depth=1, dropout=dropout), head or CategoricalLogits(C)
    )
    model.build((None, 8, 8, 1))
    return model


def _prob_unet():
    return ProbabilisticUNet(
        num_classes=C,
        latent_dim=2,
        backbone=UNet(base_filters=4, depth=1),
        encoder_filters=(4, 8),
        encoder_convs_per_block=1,
        num_fcomb_convs=1,
    )


MODELS = {
    "segmenter": _segmenter,
    "prob_unet": _prob_unet,
    "mc_dropout": lambda: MCDropout(_segmenter(dropout=0.2), num_samples=2),
    "ensemble": lambda: DeepEnsemble([_segmenter(), _segmenter()]),
}


# --- which class offers which capability ----------------------------------------------------
@pytest.mark.parametrize("name", sorted(HEADS))
def test_every_head_is_a_head(name):
    assert isinstance(HEADS[name](), protocols.Head)


@pytest.mark.parametrize("name", sorted(HEADS))
def test_covariance_heads_are_covariance_heads(name):
    assert isinstance(HEADS[name](), protocols.CovarianceHead) == (name in COVARIANCE_HEADS)


@pytest.mark.parametrize("name", sorted(HEADS))
def test_only_the_ssn_head_offers_the_fused_loss_path(name):
    assert isinstance(HEADS[name](), protocols.PlanarLowRankLogits) == (name in PLANAR_HEADS)


def test_a_latent_encoder_and_other_layers_are_not_heads():
    # The Prob U-Net's latent encoders parameterise p(z | x), not a distribution over logits.
    assert not isinstance(LatentEncoder(latent_dim=2), protocols.Head)
    assert not isinstance(keras.layers.Dense(C), protocols.Head)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_is_a_sampler(name):
    assert isinstance(MODELS[name](), protocols.Sampler)


def test_the_prob_unet_samples_itself_in_graph_ops():
    """`ProbabilisticUNet` is a `GraphSampler` (how `tfp_seg.export` reads it); a model with a
    distribution head is not (it exports through its head)."""
    model = _prob_unet()
    assert isinstance(model, protocols.GraphSampler)
    assert not isinstance(_segmenter(), protocols.GraphSampler)
    x = keras.random.normal((2, 8, 8, 1), seed=1)
    assert tuple(model.sample_logits_tensor(x, 3).shape) == (3, 2, 8, 8, C)
    assert tuple(model.mean_logits_tensor(x).shape) == (2, 8, 8, C)


# --- ... with the members' stated arguments ---------------------------------------------------
def _members(protocol):
    for name in sorted(typing._get_protocol_attrs(protocol)):
        member = next((k.__dict__[name] for k in protocol.__mro__ if name in k.__dict__), None)
        if inspect.isfunction(member):
            yield name, member


def _assert_accepts(protocol, cls):
    """Every method of `protocol` exists on `cls` and accepts its arguments: the same names
    (positional-only ones by position), and a default wherever the protocol has one."""
    for name, stated in _members(protocol):
        offered = inspect.signature(getattr(cls, name))
        params = list(offered.parameters.values())
        by_position = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        positional = [p for p in params if p.kind in by_position]
        for i, p in enumerate(list(inspect.signature(stated).parameters.values())):
            where = f"{cls.__name__}.{name}({p.name})"
            if p.kind == inspect.Parameter.POSITIONAL_ONLY:
                assert i < len(positional), f"{where}: missing"
                got = positional[i]
            else:
                assert p.name in offered.parameters, f"{where}: missing"
                got = offered.parameters[p.name]
                assert got.kind != inspect.Parameter.POSITIONAL_ONLY, f"{where}: positional-only"
            if p.default is not inspect.Parameter.empty:
                assert got.default is not inspect.Parameter.empty, f"{where}: needs a default"
        required = [
            p
            for p in params[len(inspect.signature(stated).parameters) :]
            if p.default is inspect.Parameter.empty
            and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
        ]
        assert not required, f"{cls.__name__}.{name} requires more: {required}"


@pytest.mark.parametrize(
    "protocol, cls",
    [
        (protocols.Head, LowRankLogits),
        (protocols.Head, HeteroscedasticLogits),
        (protocols.Head, CategoricalLogits),
        (protocols.CovarianceHead, LowRankLogits),
        (protocols.CovarianceHead, HeteroscedasticLogits),
        (protocols.PlanarLowRankLogits, LowRankLogits),
        (protocols.Sampler, ProbabilisticSegmenter),
        (protocols.Sampler, ProbabilisticUNet),
        (protocols.Sampler, MCDropout),
        (protocols.Sampler, DeepEnsemble),
        (protocols.GraphSampler, ProbabilisticUNet),
    ],
    ids=lambda v: v.__name__,
)
def test_members_take_the_arguments_the_protocol_states(protocol, cls):
    _assert_accepts(protocol, cls)


# --- the default-loss registry ----------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(HEADS))
def test_default_loss_is_the_loss_registered_for_the_likelihood(name):
    head = HEADS[name]()
    loss = losses.default_loss(head)
    assert type(loss) is DEFAULT_LOSSES[name]
    assert type(head.default_loss()) is DEFAULT_LOSSES[name]
    assert _registry.loss_class(head.likelihood) is DEFAULT_LOSSES[name]
    assert head.likelihood in _registry.registered_likelihoods()


class _UnregisteredHead(CategoricalLogits):
    likelihood = "tfp_seg_test_unregistered_likelihood"


class _NoLikelihoodHead(CategoricalLogits):
    likelihood = None


def test_a_likelihood_without_a_loss_is_a_clear_error():
    head = _UnregisteredHead(C)
    assert isinstance(head, protocols.Head)
    for call in (losses.default_loss, lambda h: h.default_loss()):
        with pytest.raises(ValueError, match="'tfp_seg_test_unregistered_likelihood'") as info:
            call(head)
        assert "registered: " in str(info.value) and "'categorical'" in str(info.value)
    with pytest.raises(ValueError, match="_NoLikelihoodHead declares no `likelihood`"):
        losses.default_loss(_NoLikelihoodHead(C))


@pytest.mark.parametrize(
    "call",
    [
        lambda bad: losses.default_loss(bad),
        lambda bad: losses.StochasticSegmentationNLL(bad),
        lambda bad: losses.HeteroscedasticNLL(bad),
    ],
    ids=["default_loss", "StochasticSegmentationNLL", "HeteroscedasticNLL"],
)
@pytest.mark.parametrize("bad", [keras.layers.Dense(C), "low_rank", None], ids=repr)
def test_a_loss_given_a_non_head_names_head(call, bad):
    with pytest.raises(ValueError, match="`head` must be a distribution head"):
        call(bad)


def test_one_likelihood_has_one_default_loss(monkeypatch):
    monkeypatch.setattr(_registry, "_LOSSES", dict(_registry._LOSSES))  # undone after the test

    class _OtherLoss:
        @classmethod
        def from_head(cls, head, **kwargs):
            return cls()

    with pytest.raises(ValueError, match="'categorical' already has a default loss"):
        losses.register_default_loss("categorical")(_OtherLoss)
    assert _registry.loss_class("categorical") is losses.SegmentationCrossEntropy
    # Registering the registered class again is not a conflict (e.g. a module reloaded).
    losses.register_default_loss("categorical")(losses.SegmentationCrossEntropy)
    # A new likelihood takes a class with `from_head`, and `default_loss` then builds it.
    losses.register_default_loss(_UnregisteredHead.likelihood)(_OtherLoss)
    assert isinstance(losses.default_loss(_UnregisteredHead(C)), _OtherLoss)
    with pytest.raises(TypeError, match="from_head"):
        losses.register_default_loss("tfp_seg_test_other")(type("NoFactory", (), {}))
    with pytest.raises(ValueError, match="`likelihood` must be a non-empty str"):
        losses.register_default_loss("")
