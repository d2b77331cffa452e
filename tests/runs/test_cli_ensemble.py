"""`tfp-seg train --ensemble batch|packed --ensemble-size M`: one model of M members, whose
members are the run's samples (evaluation, `tfp-seg sample`, the exported SavedModel)."""

import json

import numpy as np
import pytest

from tests.helpers import tiny_train_args
from tfp_seg import cli
from tfp_seg.experiment import TrainConfig, load_run
from tfp_seg.models import EnsembleSegmenter
from tfp_seg.runs.model import sampler_for


def _train(tmp_path, ensemble, **overrides):
    args = tiny_train_args(
        epochs=1,
        num_images=16,
        image_size=16,
        depth=1,
        ensemble=ensemble,
        ensemble_size=2,
        **overrides,
    )
    name = f"{ensemble}2"
    assert cli.main(["train", *args, "--output-dir", str(tmp_path), "--name", name]) == 0
    return tmp_path / name


def test_train_a_batch_ensemble_and_sample_its_members(tmp_path, capsys):
    run = _train(tmp_path, "batch")
    config = json.loads((run / "config.json").read_text())
    assert config["ensemble"] == "batch" and config["ensemble_size"] == 2
    report = json.loads((run / "report.json").read_text())
    assert report["num_samples"] == 4 and np.isfinite(report["ged"]) and report["params"] > 0
    model = load_run(str(run), TrainConfig(**config))
    assert isinstance(model, EnsembleSegmenter) and model.backbone.ensemble == "batch"
    # the run evaluates the model itself: its samples are the members' (n from member n mod 2)
    assert sampler_for(model, TrainConfig(**config)) is model
    x = np.zeros((1, 16, 16, 1), "float32") + 0.5
    logits = model.sample_logits(x, 4, seed=0)
    assert logits.shape == (4, 1, 16, 16, 3)
    assert np.abs(logits[0] - logits[1]).max() > 1e-6  # two members
    npz = tmp_path / "s.npz"
    assert cli.main(["sample", str(run), "-n", "4", "--images", "1", "--output", str(npz)]) == 0
    with np.load(npz) as f:
        assert f["samples"].shape == (4, 1, 16, 16)
    capsys.readouterr()
    assert cli.main(["sample", str(run), "-n", "3", "--images", "1", "--output", str(npz)]) == 1
    assert "multiple of ensemble_size = 2" in capsys.readouterr().err


def test_train_a_packed_ensemble_and_export_its_members(tmp_path, capsys):
    import tensorflow as tf

    saved = tmp_path / "savedmodels"
    run = _train(tmp_path, "packed", no_export=False, savedmodels_dir=str(saved))
    assert f"exported SavedModel to {saved / 'packed2' / '1'}" in capsys.readouterr().out
    model = load_run(str(run), TrainConfig(ensemble="packed", ensemble_size=2))
    assert isinstance(model, EnsembleSegmenter) and model.backbone.ensemble == "packed"
    loaded = tf.saved_model.load(str(saved / "packed2" / "1"))
    x = np.random.default_rng(0).normal(size=(2, 16, 16, 1)).astype("float32")
    params = loaded.params(tf.constant(x))
    assert '"EnsembleSegmenter"' in tf.compat.as_str(params["head_config"].numpy())
    assert params["member_params"].shape[:2] == (2, 2)
    # one sampling chunk (16, the export's default): the same draws as the Keras model
    seed = tf.constant([3, 0], tf.int64)
    samples = loaded.sample(tf.constant(x), num_samples=tf.constant(16), seed=seed)["logits"]
    expected = model.sample_logits(x, 16, seed=[3, 0])
    np.testing.assert_allclose(samples.numpy(), expected, atol=1e-4)
    assert np.abs(expected[0] - expected[1]).max() > 1e-6


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--ensemble", "deep"], "`ensemble` must be one of ('batch', 'packed')"),
        (["--ensemble", "batch", "--head", "ensemble"], "needs `model` segmenter, `backbone`"),
        (["--ensemble", "packed", "--model", "prob_unet"], "needs `model` segmenter"),
        (
            ["--ensemble", "batch", "--ensemble-size", "3"],
            "`eval_samples` (4) must be a multiple of `ensemble_size` (3)",
        ),
    ],
)
def test_bad_ensemble_flags_are_one_line_errors(tmp_path, capsys, flags, message):
    args = [*tiny_train_args(), *flags, "--output-dir", str(tmp_path)]
    assert cli.main(["train", *args]) == 1
    err = capsys.readouterr().err
    assert err.startswith("tfp-seg: error:") and message in err, err
    assert not list(tmp_path.iterdir())  # checked before anything was written
