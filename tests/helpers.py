"""Shared test helpers: every public layer goes through the same checks (STYLE.md)."""

from __future__ import annotations

import functools
import importlib.util
import inspect
import json
import os
import tempfile

import keras
import numpy as np
import tensorflow as tf


def run_layer_test(
    layer_cls,
    init_kwargs: dict,
    input_shape: tuple,
    expected_output_shape: tuple,
    loss=None,
    target=None,
    atol: float = 1e-6,
):
    """Serialisation, symbolic + eager call, one fit step, `.keras` and SavedModel round trips.

    Returns the fitted model so callers can make further checks.
    """
    # Config round trip.
    layer = layer_cls(**init_kwargs)
    config = layer.get_config()
    clone = layer_cls.from_config(config)
    assert clone.get_config() == config, "get_config/from_config is not a fixed point"
    revived = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert type(revived) is layer_cls
    assert revived.get_config() == config

    # Symbolic call.
    inputs = keras.Input(shape=input_shape[1:], batch_size=None)
    symbolic = layer_cls(**init_kwargs)(inputs)
    assert tuple(symbolic.shape[1:]) == tuple(expected_output_shape[1:]), symbolic.shape

    # Eager call.
    x = np.random.default_rng(0).normal(size=input_shape).astype("float32")
    eager_layer = layer_cls(**init_kwargs)
    out = eager_layer(x)
    assert tuple(out.shape) == tuple(expected_output_shape)
    assert np.all(np.isfinite(np.asarray(out)))

    # One fit step inside a functional model (gradients must reach the layer's weights).
    outputs = layer_cls(**init_kwargs)(inputs)
    model = keras.Model(inputs, outputs)
    if loss is None:
        loss = "mse"
        target = np.zeros(expected_output_shape, "float32")
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss=loss)
    before = [w.numpy().copy() for w in model.trainable_weights]
    history = model.fit(x, target, epochs=1, batch_size=input_shape[0], verbose=0)
    assert np.isfinite(history.history["loss"][0])
    after = [w.numpy() for w in model.trainable_weights]
    moved = [np.abs(a - b).max() > 0 for a, b in zip(after, before, strict=True)]
    assert any(moved), "no weight moved"

    expected = np.asarray(model(x))
    with tempfile.TemporaryDirectory() as tmp:
        # .keras round trip.
        path = os.path.join(tmp, "model.keras")
        model.save(path)
        loaded = keras.models.load_model(path)
        np.testing.assert_allclose(np.asarray(loaded(x)), expected, atol=atol)
        # SavedModel round trip (the TF Serving artefact).
        export_dir = os.path.join(tmp, "export")
        model.export(export_dir, verbose=False)
        reloaded = tf.saved_model.load(export_dir)
        np.testing.assert_allclose(np.asarray(reloaded.serve(x)), expected, atol=atol)
    return model


@functools.lru_cache(maxsize=None)
def benchmarks_common():
    """`benchmarks/_common.py` as a module: the benchmarks' shared helpers, such as the
    peak-memory measurement `peak_rss_increase_mib` (one method for benchmarks and tests)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location(
        "_benchmarks_common", os.path.join(root, "benchmarks", "_common.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class OrderRecorder(keras.Model):
    """Trains nothing; logs a fingerprint of each batch (images and labels, in order) as the
    metric `code` (tests of the order of batches across interruptions and replicas)."""

    def __init__(self):
        super().__init__()
        self.w = self.add_weight(shape=(), initializer="zeros")

    def call(self, x):
        return x * self.w

    def train_step(self, data):
        x, y = data
        code = tf.reduce_sum(x * tf.random.stateless_uniform(tf.shape(x), [1, 2]))
        labels = tf.cast(y, "float32")
        code += tf.reduce_sum(labels * tf.random.stateless_uniform(tf.shape(y), [3, 4]))
        return {"code": code}


class RecordBatches(keras.callbacks.Callback):
    """Collects `OrderRecorder`'s `code` of every batch: `epochs[epoch] = [code, ...]`."""

    def __init__(self):
        super().__init__()
        self.epochs = {}

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch
        self.epochs[epoch] = []

    def on_train_batch_end(self, batch, logs=None):
        self.epochs[self.epoch].append(float(logs["code"]))


# --- registry-driven harness (tests/test_registered.py) -----------------------------------------
def config_json(obj) -> str:
    """The config `obj` serializes to (what a `.keras` file stores), as canonical JSON."""
    return json.dumps(keras.saving.serialize_keras_object(obj)["config"], sort_keys=True)


def _config_diff(expected: str, actual: str) -> str:
    a, b = json.loads(expected), json.loads(actual)
    keys = sorted(k for k in set(a) | set(b) if a.get(k, "<missing>") != b.get(k, "<missing>"))
    return "; ".join(f"{k}: {a.get(k, '<missing>')!r} -> {b.get(k, '<missing>')!r}" for k in keys)


def _plain(value) -> bool:
    """A config-like value: None, bool, int, float, str, or a list / tuple of them."""
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, (bool, int, float, str))


def _as_list(value):
    return [_as_list(v) for v in value] if isinstance(value, (list, tuple)) else value


def _dir(obj) -> set:
    return set(dir(obj)) - {"__annotations__"}


def run_serialization_test(instance, check_dir: bool = True):
    """keras-hub's `run_serialization_test` for any registered object.

    Every named constructor argument is a key of `get_config()` (else `from_config` falls back
    to its default, which a fixed point cannot show: the revived object forgets it the same
    way). `cls.from_config(get_config())` and `deserialize(serialize())` (through JSON, with
    `safe_mode=True`) rebuild an object of the same class whose serialized config is the same
    JSON, whose plain attributes named like constructor arguments are equal, and
    (`check_dir`) that has the same attributes (`dir()`). Returns both revived objects.
    """
    cls = type(instance)
    arguments = [
        p.name
        for p in inspect.signature(cls.__init__).parameters.values()
        if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]
    missing = [name for name in arguments if name not in instance.get_config()]
    assert not missing, (
        f"{cls.__name__}.get_config() misses the constructor arguments {missing}: "
        "from_config would fall back to their defaults"
    )
    reference = config_json(instance)
    reference_dir = _dir(instance)
    revived = cls.from_config(instance.get_config())
    serialized = json.loads(json.dumps(keras.saving.serialize_keras_object(instance)))
    deserialized = keras.saving.deserialize_keras_object(serialized, safe_mode=True)
    for how, other in (("from_config", revived), ("deserialize_keras_object", deserialized)):
        assert type(other) is cls, f"{how} gave a {type(other).__name__}, not a {cls.__name__}"
        actual = config_json(other)
        assert actual == reference, (
            f"{cls.__name__}: the config is not a fixed point of {how}: "
            f"{_config_diff(reference, actual)}"
        )
        for name in arguments:
            value = getattr(instance, name, None)
            if _plain(value):
                revived_value = getattr(other, name, None)
                assert _as_list(revived_value) == _as_list(value), (
                    f"{cls.__name__}.{name} is {value!r} but {revived_value!r} after {how}"
                )
        if check_dir:
            new_dir = _dir(other)
            only_old, only_new = sorted(reference_dir - new_dir), sorted(new_dir - reference_dir)
            assert new_dir == reference_dir, (
                f"{cls.__name__}: attributes differ after {how}: only in the original "
                f"{only_old}, only in the revived {only_new}"
            )
    return revived, deserialized


def symbolic_inputs(arrays):
    """`keras.Input`s (batch None) with the shapes and dtypes of a structure of arrays."""
    return keras.tree.map_structure(
        lambda a: keras.Input(shape=a.shape[1:], dtype=str(a.dtype)), arrays
    )


def weight_shapes(layer) -> dict:
    """`{"trainable": [shapes], "non_trainable": [shapes]}` of a built layer or model."""
    return {
        "trainable": [tuple(w.shape) for w in layer.trainable_weights],
        "non_trainable": [tuple(w.shape) for w in layer.non_trainable_weights],
    }


def run_call_test(symbolic_obj, eager_obj, args):
    """A symbolic call of `symbolic_obj` (`keras.Input`s, batch None) and an eager call of
    `eager_obj` (a second instance of the same class) on the positional `args` (a tuple of
    array structures) give outputs of the same shapes, and the eager output is finite.
    Returns `(symbolic inputs, symbolic outputs, eager outputs)`."""
    symbolic_args = symbolic_inputs(tuple(args))
    symbolic = symbolic_obj(*symbolic_args)
    eager = eager_obj(*args)
    sym_shapes = keras.tree.map_structure(lambda t: tuple(t.shape[1:]), symbolic)
    eager_shapes = keras.tree.map_structure(lambda t: tuple(t.shape[1:]), eager)
    assert sym_shapes == eager_shapes, f"symbolic {sym_shapes} != eager {eager_shapes}"
    for leaf in keras.tree.flatten(eager):
        assert np.all(np.isfinite(keras.ops.convert_to_numpy(leaf))), "non-finite eager output"
    return symbolic_args, symbolic, eager


def run_fit_step(model, x, y, **compile_kwargs):
    """Compile (SGD unless given) and fit ONE step on `(x, y)`; the loss is finite and, if the
    model has trainable weights, some moved. Returns the history's first loss."""
    compile_kwargs.setdefault("optimizer", keras.optimizers.SGD(0.01))
    model.compile(**compile_kwargs)
    before = [np.array(w.numpy()) for w in model.trainable_weights]
    batch = keras.tree.flatten(x)[0].shape[0]
    history = model.fit(x, y, epochs=1, batch_size=batch, verbose=0)
    loss = history.history["loss"][0]
    assert np.isfinite(loss), f"non-finite loss {loss}"
    if before:
        after = [w.numpy() for w in model.trainable_weights]
        assert any(not np.array_equal(a, b) for a, b in zip(after, before, strict=True)), (
            "no trainable weight moved in one fit step"
        )
    return loss


def run_model_saving_test(model, x, directory, atol: float = 1e-6):
    """A `.keras` round trip (`load_model(..., safe_mode=True)`) gives a model of the same
    class, the same weights (shapes and values, trained and state variables alike) and the
    same output on `x`; a compiled model's loss object comes back with the same config.
    Returns the loaded model."""
    expected = keras.tree.map_structure(keras.ops.convert_to_numpy, model(x))
    path = os.path.join(os.fspath(directory), f"{model.name}.keras")
    model.save(path)
    loaded = keras.models.load_model(path, safe_mode=True)
    assert type(loaded) is type(model)
    assert weight_shapes(loaded) == weight_shapes(model)
    for saved, restored in zip(model.weights, loaded.weights, strict=True):
        np.testing.assert_array_equal(restored.numpy(), saved.numpy(), err_msg=saved.path)
    if isinstance(getattr(model, "loss", None), keras.losses.Loss):
        assert isinstance(loaded.loss, type(model.loss)), f"loaded loss {loaded.loss!r}"
        assert config_json(loaded.loss) == config_json(model.loss)
    actual = keras.tree.map_structure(keras.ops.convert_to_numpy, loaded(x))
    keras.tree.map_structure(
        lambda a, e: np.testing.assert_allclose(a, e, atol=atol, rtol=0), actual, expected
    )
    return loaded


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path) -> None:
    """`path` is a PNG file with some content (more than a blank canvas's few bytes)."""
    assert os.path.isfile(path), path
    with open(path, "rb") as f:
        head = f.read(8)
    assert head == PNG_MAGIC and os.path.getsize(path) > 2000, path


# --- tiny `tfp-seg train` runs -------------------------------------------------------------------
#: The flags of a `tfp-seg train` run that takes seconds (every CLI test starts from these).
TINY_TRAIN = {
    "epochs": 2,
    "num_images": 40,
    "image_size": 32,
    "base_filters": 4,
    "depth": 2,
    "eval_samples": 4,
    "rank": 2,
    "num_samples": 4,
    "no_export": True,
    "quiet": True,
}


def tiny_train_args(**overrides) -> list:
    """`tfp-seg train` arguments: `TINY_TRAIN` updated by `overrides` (`flag_name=value`;
    `True` gives a switch, `None` or `False` drops the flag), e.g.
    `tiny_train_args(head="heteroscedastic", epochs=1)`."""
    args = []
    for key, value in {**TINY_TRAIN, **overrides}.items():
        if value is None or value is False:
            continue
        args.append("--" + key.replace("_", "-"))
        if value is not True:
            args.append(str(value))
    return args


# --- users' data on disk ---------------------------------------------------------------------
def fake_lidc_entries(rng, n=5, size=16, k=4, series=("s1", "s1", "s2", "s3", "s3")) -> dict:
    """Entries in the exact layout of `data_lidc.pickle`: `{id: {"image": float32 [H, W],
    "masks": [K x uint8 [H, W]], "series_uid": str}}`, with a lesion-like disc per image
    whose radius differs between raters (so the raters disagree at its boundary)."""
    yy, xx = np.mgrid[:size, :size]
    data = {}
    for i in range(n):
        cy, cx = rng.uniform(size * 0.3, size * 0.7, size=2)
        radius = rng.uniform(size * 0.1, size * 0.25)
        dist = np.hypot(yy - cy, xx - cx)
        image = np.clip(1.0 - dist / (2 * radius), 0, 1) + 0.1 * rng.random((size, size))
        masks = [(dist <= radius * rng.uniform(0.8, 1.2)).astype(np.uint8) for _ in range(k)]
        data[f"LIDC-IDRI-{i:04d}_slice_{i}"] = {
            "image": image.astype(np.float32),
            "masks": masks,
            "series_uid": series[i % len(series)],
        }
    return data


def write_lidc_pickle(path, entries: dict, parts: int = 1):
    """Write `entries` as one pickle file (`parts=1`, returns its path) or as `parts` files
    `part_<j>.pickle` in the folder `path` (returns the folder), as the data are shipped."""
    import pickle

    path = str(path)
    if parts == 1:
        with open(path, "wb") as f:
            pickle.dump(entries, f)
        return path
    os.makedirs(path, exist_ok=True)
    keys = sorted(entries)
    for j in range(parts):
        with open(os.path.join(path, f"part_{j}.pickle"), "wb") as f:
            pickle.dump({key: entries[key] for key in keys[j::parts]}, f)
    return path


def write_image_folder(root, rng, num_images=6, k=3, size=16) -> tuple:
    """`root/images/case<i>.png` and `root/masks/case<i>_<j>.png` (K binary masks, 0/255);
    returns `(images_dir, masks_dir, {stem: [K masks]})`."""
    from PIL import Image

    images, masks = os.path.join(str(root), "images"), os.path.join(str(root), "masks")
    os.makedirs(images, exist_ok=True)
    os.makedirs(masks, exist_ok=True)
    entries = fake_lidc_entries(rng, n=num_images, size=size, k=k)
    truth = {}
    for i, entry in enumerate(entries.values()):
        stem = f"case{i}"
        Image.fromarray((entry["image"] * 200).astype(np.uint8)).save(f"{images}/{stem}.png")
        truth[stem] = entry["masks"]
        for j, m in enumerate(entry["masks"]):
            Image.fromarray(m * 255).save(f"{masks}/{stem}_{j}.png")
    return images, masks, truth
