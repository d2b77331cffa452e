"""Adapters of the sampling baselines of `tfp_seg.uncertainty`: MC dropout (dropout kept on in
the sampled signatures, in graph-safe ops) and deep ensembles (every member in one graph)."""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from tfp_seg import _seeds, protocols
from tfp_seg import distributions as dists
from tfp_seg.export import _common, adapters

__all__ = ["EnsembleAdapter", "MCDropoutAdapter"]


def _dropout_sampler(layer, seed):
    """A graph-safe replacement of a dropout layer's `call`, always active (MC dropout).

    `seed` None draws the masks with the stateful `tf.random.uniform` (fresh per run; ONNX
    `RandomUniformLike`), an int64 `[2]` seed with `tf.random.stateless_uniform`
    (reproducible): unlike Keras' own dropout, no seed-generator variable is updated, so the
    exported graph is stateless and converts to ONNX.
    """
    rate = float(layer.rate)
    gaussian = getattr(keras.layers, "GaussianDropout", None)
    is_gaussian = gaussian is not None and isinstance(layer, gaussian)

    def call(inputs, *args, training=None, **kwargs):
        del args, training, kwargs
        inputs = tf.convert_to_tensor(inputs)
        if rate <= 0.0:
            return inputs
        if is_gaussian:
            stddev = float(np.sqrt(rate / (1.0 - rate)))
            noise = dists.standard_normal(tf.shape(inputs), seed, tf.float32)
            return inputs * tf.cast(1.0 + stddev * noise, inputs.dtype)
        if rate >= 1.0:
            return tf.zeros_like(inputs)
        get_noise_shape = getattr(layer, "_get_noise_shape", None)  # SpatialDropout*
        noise_shape = get_noise_shape(inputs) if callable(get_noise_shape) else layer.noise_shape
        dynamic = tf.shape(inputs)
        if noise_shape is None:
            shape = dynamic
        else:
            shape = tf.stack(
                [
                    dynamic[i] if d is None else tf.cast(d, tf.int32)
                    for i, d in enumerate(noise_shape)
                ]
            )
        if seed is None:
            u = tf.random.uniform(shape, dtype=tf.float32)
        else:
            u = tf.random.stateless_uniform(shape, seed=seed, dtype=tf.float32)
        keep = tf.cast(u >= rate, inputs.dtype)  # Keras' rule: keep with probability 1 - rate
        return inputs * keep / tf.cast(1.0 - rate, inputs.dtype)

    return call


class _SampledDropout:
    """Context manager: every layer of `layers` runs `_dropout_sampler`, whatever `training`.

    Active while a graph is traced (and for the eager reference of the parity checks); each
    layer's bound `call` is shadowed by an instance attribute and restored on exit.
    """

    def __init__(self, layers, seed):
        self.layers = list(layers)
        self.seed = seed

    def __enter__(self):
        for layer in self.layers:
            if "call" in layer.__dict__:
                raise _common.ExportError(
                    f"Cannot export MC dropout: layer {layer.name!r} is already patched "
                    "(is a tfp_seg.models.MCDropout sampling it right now?)."
                )
        for j, layer in enumerate(self.layers):
            seed = _seeds.fold_seed(self.seed, j + 1)
            object.__setattr__(layer, "call", _dropout_sampler(layer, seed))
        return self

    def __exit__(self, *exc):
        for layer in self.layers:
            if "call" in layer.__dict__:
                object.__delattr__(layer, "call")
        return False


class MCDropoutAdapter(adapters.ExportAdapter):
    """`tfp_seg.models.MCDropout`: dropout on in the sampled outputs, off elsewhere.

    Sample `n` is one forward pass with its own dropout masks (all N passes of a chunk run
    as one batch of `N * B` images: the masks are per example) and, with `head_sampling`,
    one independent draw of the head's distribution, as `MCDropout.sample_logits` does. The
    deterministic outputs (`params`, `mean_logits`) are the network with dropout off.
    Seeded requests are reproducible, but draw other masks than `MCDropout(seed=...)`.
    With a region of interest (`roi_mask=True`) every pass gets the request's `roi_mask`.
    """

    def __init__(self, sampler, image_shape=None):
        model = sampler.model
        self.model = model
        self.head = _common.distribution_head(model)
        self.head_sampling = bool(sampler.head_sampling)
        self.dropout_layers = list(sampler.dropout_layers)
        supported = tuple(
            t
            for t in (keras.layers.Dropout, getattr(keras.layers, "GaussianDropout", None))
            if t is not None
        )
        unsupported = [layer for layer in self.dropout_layers if not isinstance(layer, supported)]
        if unsupported:
            names = ", ".join(f"{layer.name} ({type(layer).__name__})" for layer in unsupported)
            raise _common.ExportError(
                f"Cannot export MC dropout over {type(model).__name__}: dropout layers {names} "
                "have no graph-safe export (supported: Dropout, SpatialDropout1D/2D/3D, "
                "GaussianDropout). Export the deterministic network instead: "
                "tfp_seg.export.saved_model(mc_dropout.model, ...)."
            )
        num_classes = _common.num_classes_of(model, "MC dropout")
        config = {
            "format": "tfp_seg.export/1",
            "model": "MCDropout",
            "network": type(model).__name__,
            "num_classes": num_classes,
            "head_sampling": self.head_sampling,
            "dropout_layers": [
                {"name": layer.name, "class": type(layer).__name__, "rate": float(layer.rate)}
                for layer in self.dropout_layers
            ],
            "sampling": "sample n: one forward pass with dropout on (fresh masks)"
            + (" and one draw of the head" if self.head is not None and self.head_sampling else ""),
            "params_note": "params and mean_logits: the network with dropout off",
        }
        if self.head is not None:
            config.update(_common.head_config(self.head))
        image_shape = image_shape or _common.model_image_shape(model)
        super().__init__(model, num_classes, config, image_shape)

    def prepare(self, images):
        return images, self.model(images, training=False)

    def check_roi_mask(self, images):
        _common.check_takes_roi_mask(self.model, images, "MC dropout")

    def params(self, state):
        output = state[1]
        out = {
            "params": tf.identity(output),
            "mean_logits": _common.mean_logits_of(self.model, output),
        }
        if isinstance(self.head, protocols.CovarianceHead):
            loc, factor, diag = self.head.covariance_parts(output)
            out.update(loc=loc, cov_factor=factor, cov_diag=diag)
        if isinstance(self.head, protocols.MixtureHead):
            out.update(adapters.mixture_outputs(self.head, output))
        return out

    def mean_logits(self, state):
        return _common.mean_logits_of(self.model, state[1])

    def sample_logits(self, state, num_samples, seed=None):
        inputs = state[0]  # the images, or {"images", "roi_mask"} (a region of interest)
        images = inputs["images"] if isinstance(inputs, dict) else inputs
        tiled = tf.nest.map_structure(  # pass n, image b at n * B + b
            lambda t: tf.tile(t, [num_samples] + [1] * (t.shape.rank - 1)),
            inputs,
        )
        with _SampledDropout(self.dropout_layers, seed):
            output = self.model(tiled, training=False)
        logits = _common.logit_samples_of(
            self.model, output, 1, _seeds.fold_seed(seed, 0), self.head_sampling
        )
        logits = tf.cast(logits[0], tf.float32)
        shape = tf.concat([[num_samples, tf.shape(images)[0]], tf.shape(logits)[1:]], 0)
        return tf.reshape(logits, shape)


class EnsembleAdapter(adapters.ExportAdapter):
    """`tfp_seg.models.DeepEnsemble`: all members in one graph.

    Sample `n` of a request is a draw of member `n mod M` (its head's independent draw with
    `head_sampling`, else its mean logits), as `DeepEnsemble.sample_logits` assigns them, across
    the SavedModel's sampling chunks too. `params` concatenates the members' packed outputs
    on the last axis; `mean_logits` is the mean of the members' mean logits, i.e. the mean of
    the ensemble's logit distribution. With a region of interest (`roi_mask=True`) every
    member gets the request's `roi_mask` (each member's head must take one).
    """

    def __init__(self, ensemble, image_shape=None):
        members = list(ensemble.members)
        self.members = members
        self.head_sampling = bool(ensemble.head_sampling)
        sizes = [_common.num_classes_of(member, "the DeepEnsemble") for member in members]
        if len(set(sizes)) != 1:
            raise _common.ExportError(
                f"Cannot export a DeepEnsemble whose members predict different numbers of "
                f"classes ({sizes})."
            )
        members_config = []
        for i, member in enumerate(members):
            head = _common.distribution_head(member)
            entry = {"member": i, "model": type(member).__name__}
            if head is not None:
                entry.update(_common.head_config(head))
            members_config.append(entry)
        config = {
            "format": "tfp_seg.export/1",
            "model": "DeepEnsemble",
            "num_members": len(members),
            "num_classes": sizes[0],
            "head_sampling": self.head_sampling,
            "members": members_config,
            "sampling": "sample n: a draw of member n mod num_members",
            "params_note": "params: the members' packed outputs concatenated on the last axis; "
            "mean_logits: the mean of the members' mean logits",
        }
        shape = image_shape or _common.model_image_shape(members[0])
        super().__init__(ensemble, sizes[0], config, shape)

    def variables(self):
        seen, out = set(), []
        for member in self.members:
            for variable in _common.variables_of(member):
                if id(variable) not in seen:
                    seen.add(id(variable))
                    out.append(variable)
        return out

    def prepare(self, images):
        return tuple(member(images, training=False) for member in self.members)

    def check_roi_mask(self, images):
        for i, member in enumerate(self.members):
            _common.check_takes_roi_mask(member, images, f"the DeepEnsemble (member {i})")

    def params(self, state):
        return {
            "params": tf.concat([tf.cast(o, tf.float32) for o in state], axis=-1),
            "mean_logits": self.mean_logits(state),
        }

    def mean_logits(self, state):
        logits = [
            tf.cast(_common.mean_logits_of(member, output), tf.float32)
            for member, output in zip(self.members, state, strict=True)
        ]
        return tf.add_n(logits) / float(len(logits))

    def sample_logits(self, state, num_samples, seed=None):
        return self._draw(state, num_samples, seed, 0)

    def sample_chunk(self, state, num_samples, seed, start, for_mean=False):
        return self._draw(state, num_samples, seed, start)

    def _draw(self, state, num_samples, seed, start):
        m = len(self.members)
        per_member = -(-num_samples // m)  # any N consecutive samples hold <= ceil(N/M) per member
        draws = tf.concat(
            [
                tf.cast(
                    _common.logit_samples_of(
                        member, output, per_member, _seeds.fold_seed(seed, j), self.head_sampling
                    ),
                    tf.float32,
                )
                for j, (member, output) in enumerate(zip(self.members, state, strict=True))
            ],
            axis=0,
        )  # member j's draws at j * per_member + k
        # Global sample g = start + i comes from member g mod M, as that member's
        # (g // M - first)-th draw of this chunk.
        if isinstance(start, (int, np.integer)):
            g = np.arange(num_samples) + int(start)
            q, r = divmod(int(start), m)
            j = g % m
            index = j * per_member + g // m - q - (j < r)
            return tf.gather(draws, tf.constant(index, tf.int32))
        start = tf.cast(start, tf.int32)
        g = start + tf.range(num_samples, dtype=tf.int32)
        j = tf.math.floormod(g, m)
        local = tf.math.floordiv(g, m) - tf.math.floordiv(start, m)
        local -= tf.cast(j < tf.math.floormod(start, m), tf.int32)
        return tf.gather(draws, j * per_member + local)
