"""Model wrappers that sample like a tfp_seg model: MC dropout and deep ensembles.

Both wrap plain Keras models (a `ProbabilisticSegmenter`, or any model outputting logits
`[B, *S, C]`, `S = (H, W)` for images or `(D, H, W)` for volumes) and inherit the read-outs
of `tfp_seg.models.sampling.Sampler` (`sample_logits`, `sample`, `probability_samples`,
`predict_proba`), with the same argument checks, defaults, seeds per batch and choice of
label sampler as the models.

```none
MCDropout     sample n = one forward pass with every dropout layer on (Gal & Ghahramani, 2016)
DeepEnsemble  sample n = a draw of member n mod M (Lakshminarayanan et al., 2017)
each draw     head_sampling and a distribution head: one draw of the head (its `sample_labels`
              for `sample`); otherwise the (mean) logits, and their arg max for `sample`
```

Both draw independent samples only (`antithetic=True` raises).

#### References

[1] Gal and Ghahramani. Dropout as a Bayesian Approximation. ICML 2016.
[2] Lakshminarayanan et al. Simple and Scalable Predictive Uncertainty Estimation using Deep
    Ensembles. NeurIPS 2017.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Callable, Optional, Sequence, Union

import keras
import numpy as np
import tensorflow as tf

from tfp_seg import _checks, _io, _seeds, protocols
from tfp_seg import distributions as dists
from tfp_seg.models import sampling

__all__ = ["MCDropout", "DeepEnsemble"]


def _distribution_head(model):
    """The model's distribution head (`model.head`, a `tfp_seg.protocols.Head`), or None."""
    head = getattr(model, "head", None)
    return head if isinstance(head, protocols.Head) else None


def _draws(model, output, count: int, seed, head_sampling: bool, labels: bool) -> tf.Tensor:
    """`count` draws from one forward pass's `output`: logits `[count, B, *S, C]` (float32)
    or, with `labels`, label maps `[count, B, *S]` (int32).

    With `head_sampling` and a distribution head: the head's independent draws (its exact
    label sampler for labels); otherwise the head's mean logits (the output itself for a model
    without a head), repeated, and their arg max for labels.
    """
    head = _distribution_head(model)
    if head is not None:
        if head_sampling and labels:
            return head.sample_labels(output, count, seed=seed, antithetic=False)
        if head_sampling:
            samples = head.sample_logits(output, count, seed=seed, antithetic=False)
            return tf.cast(samples, tf.float32)
        logits = head.mean_logits(output)
    else:
        logits = tf.convert_to_tensor(output)
        if logits.shape.rank is None or logits.shape.rank - 2 not in _checks.SPATIAL_DIMS:
            raise ValueError(
                "A model without a distribution `head` must output logits [B, H, W, C] or "
                f"[B, D, H, W, C]; got shape {tuple(logits.shape)}."
            )
    logits = tf.cast(logits, tf.float32)
    if labels:
        return tf.repeat(dists.argmax_classes(logits)[tf.newaxis], count, axis=0)
    return tf.repeat(logits[tf.newaxis], count, axis=0)


_DROPOUT_TYPES = tuple(
    t
    for t in (
        keras.layers.Dropout,  # includes SpatialDropout1D/2D/3D
        getattr(keras.layers, "GaussianDropout", None),
        getattr(keras.layers, "AlphaDropout", None),
    )
    if t is not None
)


def _find_dropout_layers(model) -> list:
    found, seen, stack = [], set(), [model]
    while stack:
        layer = stack.pop()
        if id(layer) in seen:
            continue
        seen.add(id(layer))
        if isinstance(layer, _DROPOUT_TYPES):
            found.append(layer)
        children = []
        for attr in ("layers", "_layers"):
            value = getattr(layer, attr, None)
            if isinstance(value, (list, tuple)):
                children.extend(value)
        stack.extend(c for c in children if isinstance(c, keras.layers.Layer))
    return found


def _model_spatial_dims(model):
    """The spatial rank of a wrapped model (`model.spatial_dims`: a `ProbabilisticSegmenter`
    has its head's), or None (the read-outs then take images or volumes)."""
    dims = getattr(model, "spatial_dims", None)
    return dims if isinstance(dims, int) and not isinstance(dims, bool) else None


def _seed_state(generator):
    return keras.ops.convert_to_numpy(generator.state.value)


def _set_seed_state(generator, pair, salt: int) -> None:
    """Seed a dropout layer's generator: state `[s0, s1 + salt]` (mod 2^31) for the stateless
    seed `pair = (s0, s1)` (`tfp_seg._seeds.seed_pair`: an int seed s is `(s, 0)`)."""
    s0, s1 = pair
    dtype = _seed_state(generator).dtype
    generator.state.assign(np.array([s0 % 2**31, (s1 + salt) % 2**31], dtype=dtype))


@contextlib.contextmanager
def _dropout_active(layers, keep_seed_states: bool):
    """Run every layer in `layers` with `training=True`, whatever `training` it is called with.

    Replaces each layer's bound `call` by an instance attribute for the duration, and restores
    it on exit (also on error), together with the layers' seed generator states when
    `keep_seed_states` (seeded sampling must not change the model's RNG state).
    """
    saved_states = []
    try:
        for layer in layers:
            original = layer.call

            def forced(*args, _original=original, training=None, **kwargs):
                return _original(*args, training=True, **kwargs)

            object.__setattr__(layer, "call", forced)
            generator = getattr(layer, "seed_generator", None)
            if keep_seed_states and generator is not None:
                saved_states.append((generator.state, _seed_state(generator)))
        yield
    finally:
        for layer in layers:
            if "call" in layer.__dict__:
                object.__delattr__(layer, "call")
        for state, value in saved_states:
            state.assign(value)


class MCDropout(sampling.Sampler):
    """Monte Carlo dropout: N stochastic forward passes with dropout on, everything else off.

    Each pass calls `model(x, training=False)` while every `keras.layers.Dropout` (and
    `SpatialDropout*`, `GaussianDropout`, `AlphaDropout`) layer inside the model is forced to
    run with `training=True`: their bound `call` is temporarily replaced by one that ignores the
    `training` argument (restored afterwards, also on error). So BatchNormalization keeps its
    moving statistics (inference mode) and only the dropout masks vary between passes. Passes
    run eagerly, one per sample.

    If the model has a distribution `head` (a `ProbabilisticSegmenter`), each pass contributes
    one sample of the head's logits distribution (`head_sampling=True`, the default: the
    samples then mix dropout and head noise) or the head's mean logits (`head_sampling=False`).
    A model without a head must output logits `[B, *S, C]` (images or volumes). `sample`
    takes each pass's label map from the head's `sample_labels` when the head draws, else the
    arg max of the logits.
    A seed fixes every pass's masks (`[s0, s1 + 104729 i + 7919 j]` for pass i, layer j of a
    stateless seed `[s0, s1]`) and head draw (`split_seed(seed, i)`), and the layers' seed
    generators are restored afterwards.

    Args:
      model: a Keras model with dropout layers, e.g.
        `ProbabilisticSegmenter(UNet(dropout=0.1), CategoricalLogits(3))`.
      num_samples: default N, the number of forward passes.
      head_sampling: see above.

    #### Examples

    ```python
    mc = tfp_seg.models.wrappers.MCDropout(model, num_samples=16)
    probs = mc.probability_samples(images)                 # ==> [16, B, H, W, C]
    mi = tfp_seg.uncertainty.mutual_information(probs)    # ==> [B, H, W]
    ```
    """

    _supports_antithetic = False

    def __init__(self, model, num_samples: int = 16, head_sampling: bool = True):
        if not callable(model):
            raise ValueError(f"`model` must be a callable Keras model; got {model!r}.")
        self.model = model
        self.num_samples = _checks.positive_int(num_samples, "num_samples")
        self.head_sampling = bool(head_sampling)
        self.dropout_layers = _find_dropout_layers(model)
        if not self.dropout_layers:
            raise ValueError(
                f"`model` ({type(model).__name__}) has no dropout layers; MC dropout needs "
                "some (e.g. tfp_seg.models.UNet(dropout=0.1))."
            )

    @property
    def default_num_samples(self) -> int:
        return self.num_samples

    @property
    def input_spatial_dims(self):
        return _model_spatial_dims(self.model)

    def _sample_logits_tensor(self, images, num_samples, seed=None, antithetic=False):
        return self._passes(images, num_samples, seed, labels=False)

    def _sample_labels_tensor(self, images, num_samples, seed=None, antithetic=False):
        return self._passes(images, num_samples, seed, labels=True)

    def _passes(self, images, num_samples: int, seed, labels: bool) -> tf.Tensor:
        """`num_samples` forward passes, one draw each (see `_draws`)."""
        out = []
        pair = _seeds.seed_pair(seed)
        if not getattr(self.model, "built", True):
            # Build first, outside the forced dropout: building traces the network once, which
            # would advance the seeded masks of the first pass (a seeded call would then not
            # repeat).
            self.model(images, training=False)
        with _dropout_active(self.dropout_layers, keep_seed_states=seed is not None):
            for i in range(num_samples):
                if pair is not None:
                    # Distinct, reproducible masks for every pass and layer.
                    for j, layer in enumerate(self.dropout_layers):
                        generator = getattr(layer, "seed_generator", None)
                        if generator is not None:
                            _set_seed_state(generator, pair, i * 104729 + 7919 * j)
                output = self.model(images, training=False)
                pass_seed = _seeds.split_seed(seed, i)
                out.append(_draws(self.model, output, 1, pass_seed, self.head_sampling, labels))
        return tf.concat(out, axis=0)


class DeepEnsemble(sampling.Sampler):
    """An ensemble of independently initialised (and trained) segmentation models.

    Sample `n` comes from member `n mod M` (so `num_samples = M` gives one per member, the
    default). For members with a distribution `head`, `head_sampling=True` draws that
    member's samples from its head (mixing ensemble and head noise); otherwise the member's
    (mean) logits are used. Members without a head must output logits `[B, *S, C]`; all
    members take the same spatial rank (images or volumes). A seed gives member j the head
    seed `split_seed(seed, j)`.

    Args:
      members: M >= 1 Keras models (for example `ProbabilisticSegmenter`s), each built from its
        own random initialisation.
      num_samples: default N (`None`: M).
      head_sampling: see above.

    #### Examples

    ```python
    ensemble = tfp_seg.models.wrappers.DeepEnsemble.from_factory(
        lambda: tfp_seg.models.ProbabilisticSegmenter(
            tfp_seg.models.UNet(base_filters=8, depth=2),
            tfp_seg.layers.CategoricalLogits(3)),
        num_members=5)
    ensemble.compile(optimizer="adam")          # loss="auto" for ProbabilisticSegmenter
    ensemble.fit(images, labels, epochs=5)      # trains each member in turn
    ensemble.save("runs/ensemble")              # member_00.keras ... + ensemble.json
    ensemble = tfp_seg.models.wrappers.DeepEnsemble.load("runs/ensemble")
    ensemble.predict_proba(images)              # ==> [B, H, W, C]
    ```
    """

    _INDEX_FILE = "ensemble.json"
    _supports_antithetic = False

    def __init__(
        self, members: Sequence, num_samples: Optional[int] = None, head_sampling: bool = True
    ):
        members = list(members) if members is not None else []
        if not members:
            raise ValueError("`members` must hold at least one model; got none.")
        for i, m in enumerate(members):
            if not callable(m):
                raise ValueError(f"`members[{i}]` must be a callable Keras model; got {m!r}.")
        if len({id(m) for m in members}) != len(members):
            raise ValueError("`members` must be distinct model objects (one per member).")
        ranks = [_model_spatial_dims(m) for m in members]
        if len({r for r in ranks if r is not None}) > 1:
            raise ValueError(
                f"`members` must all take the same spatial rank; got spatial_dims {ranks}."
            )
        self.members = members
        self.num_samples = (
            len(members)
            if num_samples is None
            else _checks.positive_int(num_samples, "num_samples")
        )
        self.head_sampling = bool(head_sampling)

    @classmethod
    def from_factory(
        cls, factory: Callable[[], keras.Model], num_members: int, **kwargs
    ) -> "DeepEnsemble":
        """`num_members` models from `factory()` (each call draws a fresh initialisation)."""
        num_members = _checks.positive_int(num_members, "num_members")
        if not callable(factory):
            raise ValueError(f"`factory` must be callable; got {factory!r}.")
        return cls([factory() for _ in range(num_members)], **kwargs)

    def __len__(self) -> int:
        return len(self.members)

    @property
    def num_members(self) -> int:
        """M, the number of member models."""
        return len(self.members)

    def compile(self, optimizer="adam", **kwargs) -> "DeepEnsemble":
        """Compile every member with the same arguments (and its own optimizer instance)."""
        for member in self.members:
            opt = optimizer
            if isinstance(optimizer, keras.optimizers.Optimizer):
                opt = type(optimizer).from_config(optimizer.get_config())
            member.compile(optimizer=opt, **kwargs)
        return self

    def fit(self, *args, **kwargs) -> list:
        """Train each member in turn with `member.fit(*args, **kwargs)`; returns the histories.

        The data must be re-iterable (arrays or a `tf.data.Dataset`, not a one-shot generator).
        """
        histories = []
        for i, member in enumerate(self.members):
            if getattr(member, "optimizer", None) is None:
                raise ValueError(
                    f"`members[{i}]` is not compiled; call `ensemble.compile(...)` first."
                )
            histories.append(member.fit(*args, **kwargs))
        return histories

    @property
    def default_num_samples(self) -> int:
        return self.num_samples

    @property
    def input_spatial_dims(self):
        return _model_spatial_dims(self.members[0])

    def _sample_logits_tensor(self, images, num_samples, seed=None, antithetic=False):
        return self._member_draws(images, num_samples, seed, labels=False)

    def _sample_labels_tensor(self, images, num_samples, seed=None, antithetic=False):
        return self._member_draws(images, num_samples, seed, labels=True)

    def _member_draws(self, images, num_samples: int, seed, labels: bool) -> tf.Tensor:
        """Sample n <- member n mod M, that member's (n // M)-th draw (see `_draws`)."""
        m = len(self.members)
        per_member, offsets = [], []
        for j, member in enumerate(self.members[:num_samples]):
            count = len(range(j, num_samples, m))
            output = member(images, training=False)
            member_seed = _seeds.split_seed(seed, j)
            offsets.append(sum(int(d.shape[0]) for d in per_member))
            per_member.append(
                _draws(member, output, count, member_seed, self.head_sampling, labels)
            )
        order = [offsets[n % m] + n // m for n in range(num_samples)]
        return tf.gather(tf.concat(per_member, axis=0), order)

    def save(self, folder: Union[str, os.PathLike]) -> str:
        """Save every member as `member_XX.keras` plus an `ensemble.json` index in `folder`.

        Each file is written atomically (`tfp_seg._io.atomic_path`), the index last, and other
        files in `folder` are left alone. To replace a whole ensemble folder atomically, save
        into `tfp_seg._io.atomic_dir(folder)`'s temporary folder (as `tfp_seg.runs` does).
        """
        folder = os.fspath(folder)
        os.makedirs(folder, exist_ok=True)
        files = []
        for i, member in enumerate(self.members):
            name = f"member_{i:02d}.keras"
            with _io.atomic_path(os.path.join(folder, name)) as tmp:
                member.save(tmp)
            files.append(name)
        index = {
            "format": "tfp_seg.uncertainty.DeepEnsemble",  # the file format's id: unchanged
            "version": 1,
            "members": files,
            "num_samples": self.num_samples,
            "head_sampling": self.head_sampling,
        }
        _io.atomic_write_json(
            os.path.join(folder, self._INDEX_FILE), index, indent=2, sort_keys=False
        )
        return folder

    @classmethod
    def load(cls, folder: Union[str, os.PathLike], compile: bool = True) -> "DeepEnsemble":
        """Load an ensemble written by `save`."""
        folder = os.fspath(folder)
        path = os.path.join(folder, cls._INDEX_FILE)
        if not os.path.isfile(path):
            raise ValueError(
                f"`folder` {folder!r} holds no {cls._INDEX_FILE} (not a saved ensemble)."
            )
        with open(path) as f:
            index = json.load(f)
        members = [
            keras.models.load_model(os.path.join(folder, name), compile=compile)
            for name in index["members"]
        ]
        return cls(
            members, num_samples=index.get("num_samples"), head_sampling=index["head_sampling"]
        )
