import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from tests.helpers import tiny_train_args
from tfp_seg import cli

TINY = tiny_train_args()


@pytest.fixture
def run_dir(tiny_run):
    return tiny_run


def test_train_writes_run_files(run_dir):
    for name in ("config.json", "history.json", "report.json", "model.keras"):
        assert (run_dir / name).is_file(), name
    report = json.loads((run_dir / "report.json").read_text())
    for key in ("nll", "miou", "pixel_accuracy", "diversity", "ged", "oracle_ged", "hm_iou", "ece"):
        assert np.isfinite(report[key]), key
    assert 0.0 <= report["miou"] <= 1.0 and 0.0 <= report["pixel_accuracy"] <= 1.0
    assert report["oracle_nll"] <= report["nll"]  # the entropy floor
    history = json.loads((run_dir / "history.json").read_text())
    assert len(history["loss"]) == 2
    config = json.loads((run_dir / "config.json").read_text())
    assert config["image_size"] == 32 and config["head"] == "low_rank"
    no_tmp = [p for p in os.listdir(run_dir) if ".tmp" in p]
    assert not no_tmp, no_tmp


def test_evaluate_and_sample_from_run(run_dir, tmp_path, capsys):
    out = tmp_path / "eval"
    assert (
        cli.main(["evaluate", str(run_dir), "--num-samples", "4", "--output", str(out), "--quiet"])
        == 0
    )
    report = json.loads((out / "report.json").read_text())
    assert report["num_samples"] == 4
    npz = tmp_path / "s.npz"
    assert cli.main(["sample", str(run_dir), "-n", "3", "--images", "2", "--output", str(npz)]) == 0
    with np.load(npz) as f:
        assert f["samples"].shape == (3, 2, 32, 32)
        assert f["images"].shape == (2, 32, 32, 1)


def test_config_file_and_flag_override(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("head: deterministic\nepochs: 1\nimage_size: 32\n")
    args = cli.build_parser().parse_args(["train", "--config", str(cfg), "--epochs", "3"])
    config = cli._train_config(args)
    assert config.head == "deterministic" and config.epochs == 3 and config.image_size == 32


@pytest.mark.parametrize(
    "content, match",
    [
        ("head: [unclosed", "could not parse"),
        ("nonsense_field: 1\n", "unknown fields"),
        ("head: gaussian\n", "`head`"),
    ],
)
def test_bad_config_is_a_clear_error(tmp_path, capsys, content, match):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(content)
    assert cli.main(["train", "--config", str(cfg)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("tfp-seg: error:") and match in err


def test_missing_files_and_unwritable_output(tmp_path, capsys):
    assert cli.main(["train", "--config", str(tmp_path / "nope.yaml")]) == 1
    assert "config file not found" in capsys.readouterr().err
    assert cli.main(["evaluate", str(tmp_path / "missing_run")]) == 1
    assert "no model found" in capsys.readouterr().err
    corrupt = tmp_path / "corrupt.keras"
    corrupt.write_bytes(b"not a zip file")
    assert cli.main(["evaluate", str(corrupt)]) == 1
    assert "could not load model" in capsys.readouterr().err
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert cli.main(["train", *TINY, "--output-dir", str(blocker / "sub")]) == 1
    assert "cannot write to output folder" in capsys.readouterr().err


def test_help_documents_every_flag():
    out = subprocess.run(
        [sys.executable, "-m", "tfp_seg.cli", "train", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for field in cli._TRAIN_FLAGS:
        assert "--" + field.replace("_", "-") in out, field
    assert "--no-export" in out and "--config" in out


@pytest.mark.parametrize("head", ["heteroscedastic", "mc_dropout", "ensemble"])
def test_other_heads_train_evaluate_and_sample(tmp_path, head):
    assert (
        cli.main(
            [
                "train",
                *tiny_train_args(epochs=1, num_images=24, head=head, ensemble_size=2),
                "--output-dir",
                str(tmp_path),
                "--name",
                head,
            ]
        )
        == 0
    )
    run = tmp_path / head
    report = json.loads((run / "report.json").read_text())
    assert report["head"] == head and np.isfinite(report["ged"])
    if head == "ensemble":
        assert (run / "ensemble" / "ensemble.json").is_file()
    from tfp_seg.experiment import TrainConfig, load_run

    sampler = load_run(str(run), TrainConfig(head=head))
    logits = sampler.sample_logits(np.zeros((1, 32, 32, 1), "float32") + 0.5, 4, seed=0)
    assert logits.shape == (4, 1, 32, 32, 3)
    # dropout masks / members / logit noise make the samples of one image differ
    assert np.abs(logits - logits[:1]).max() > 1e-6
    npz = tmp_path / "s.npz"
    assert cli.main(["sample", str(run), "-n", "3", "--images", "1", "--output", str(npz)]) == 0
    with np.load(npz) as f:
        assert f["samples"].shape == (3, 1, 32, 32)


def test_train_with_a_keras_hub_backbone(tmp_path):
    assert (
        cli.main(
            [
                "train",
                *tiny_train_args(
                    backbone="resnet_fpn",
                    epochs=1,
                    num_images=16,
                    image_size=64,
                    eval_samples=2,
                    num_samples=2,
                    base_filters=None,
                    depth=None,
                ),
                "--output-dir",
                str(tmp_path),
                "--name",
                "fpn",
            ]
        )
        == 0
    )
    report = json.loads((tmp_path / "fpn" / "report.json").read_text())
    assert report["backbone"] == "resnet_fpn" and np.isfinite(report["nll"])
    model = keras.models.load_model(tmp_path / "fpn" / "model.keras", safe_mode=True)
    assert model(np.zeros((1, 64, 64, 1), "float32")).shape == (1, 64, 64, 3 * (2 + 2))


def test_sample_command_hands_out_independent_draws(run_dir, tmp_path):
    """`tfp-seg sample` gives the SSN's independent draws, not antithetic (mirrored) pairs."""
    model = keras.models.load_model(run_dir / "model.keras", safe_mode=True)
    npz = tmp_path / "s.npz"
    assert cli.main(["sample", str(run_dir), "-n", "4", "--images", "2", "--output", str(npz)]) == 0
    with np.load(npz) as f:
        samples, images = f["samples"], f["images"]
    np.testing.assert_array_equal(samples, model.sample(images, 4, seed=0, antithetic=False))


EXPORT_TINY = tiny_train_args(
    epochs=1,
    num_images=16,
    image_size=16,
    depth=1,
    eval_samples=2,
    ensemble_size=2,
    rank=None,
    num_samples=None,
    no_export=False,
)


@pytest.mark.parametrize("head", ["mc_dropout", "ensemble"])
def test_export_of_mc_dropout_and_ensemble_runs_samples_like_the_run(tmp_path, capsys, head):
    """`tfp-seg train` and `tfp-seg export` export the run's sampler (dropout masks on in
    the samples / every member), not a plain deterministic network."""
    import onnxruntime
    import tensorflow as tf

    from tfp_seg.experiment import TrainConfig, load_run

    saved = tmp_path / "savedmodels"
    assert (
        cli.main(
            [
                "train",
                *EXPORT_TINY,
                "--head",
                head,
                "--output-dir",
                str(tmp_path),
                "--name",
                head,
                "--savedmodels-dir",
                str(saved),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "export skipped" not in out
    assert f"exported SavedModel to {saved / head / '1'}" in out
    run = tmp_path / head
    assert cli.main(["export", str(run), "--num-samples", "4"]) == 0  # the next version, 2
    assert cli.main(["export", str(run), "--format", "onnx", "--num-samples", "4"]) == 0
    assert f"exported ONNX to {run / 'model.onnx'}" in capsys.readouterr().out

    sampler = load_run(str(run), TrainConfig(head=head))
    x = np.random.default_rng(0).normal(size=(2, 16, 16, 1)).astype("float32")
    kind = "MCDropout" if head == "mc_dropout" else "DeepEnsemble"
    n = 64
    for version in ("1", "2"):
        loaded = tf.saved_model.load(str(saved / head / version))
        params = loaded.params(tf.constant(x))
        assert f'"{kind}"' in tf.compat.as_str(params["head_config"].numpy())
        samples = loaded.sample(tf.constant(x), num_samples=tf.constant(n))["logits"].numpy()
        assert np.abs(samples - samples[:1]).max() > 1e-6  # masks / members differ
        if head == "ensemble":  # deterministic members: sample k is member k mod 2's logits
            np.testing.assert_allclose(samples, sampler.sample_logits(x, n), atol=1e-4)
        else:
            network = sampler.model.head.mean_logits(sampler.model(x, training=False))
            np.testing.assert_allclose(params["mean_logits"], network, atol=1e-4)  # dropout off
            probs = np.asarray(tf.nn.softmax(samples, -1))
            reference = sampler.probability_samples(x, n, seed=0)
            tolerance = 5 * np.sqrt((probs.var(0) + reference.var(0)) / n) + 1e-5
            assert np.all(np.abs(probs.mean(0) - reference.mean(0)) <= tolerance)
    session = onnxruntime.InferenceSession(
        str(run / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    first = session.run(["logit_samples"], {"images": x})[0]
    if head == "ensemble":
        np.testing.assert_allclose(first, sampler.sample_logits(x, 4), atol=1e-4)
    else:
        assert np.abs(first - first[:1]).max() > 1e-6
        assert np.abs(first - session.run(["logit_samples"], {"images": x})[0]).max() > 1e-6
