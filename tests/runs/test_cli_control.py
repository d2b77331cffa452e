"""`tfp-seg evaluate | sample | export --covariance-temperature T|auto --class-scales ...`:
post-inference control of a run's SSN samples from the command line."""

import json

import keras
import numpy as np
import pytest

from tfp_seg import cli
from tfp_seg.calibration import ControlledSampler, CovarianceTemperature
from tfp_seg.runs.config import stored_config
from tfp_seg.runs.data import make_data


def test_sample_with_a_temperature_and_class_scales_draws_the_controlled_samples(
    tiny_run, tmp_path
):
    model = keras.models.load_model(tiny_run / "model.keras", safe_mode=True)
    npz = tmp_path / "s.npz"
    argv = ["sample", str(tiny_run), "-n", "4", "--images", "2", "--output", str(npz)]
    assert cli.main(argv + ["--covariance-temperature", "2.5", "--class-scales", "1,1,0.5"]) == 0
    with np.load(npz) as f:
        samples, images = f["samples"], f["images"]
    expected = ControlledSampler(model, 2.5, [1, 1, 0.5]).sample(images, 4, seed=0)
    np.testing.assert_array_equal(samples, expected)
    assert not np.array_equal(samples, model.sample(images, 4, seed=0))


def test_evaluate_auto_fits_on_the_validation_raters_and_reports_it(tiny_run, tmp_path, capsys):
    out = tmp_path / "eval"
    argv = ["evaluate", str(tiny_run), "--num-samples", "4", "--output", str(out), "--quiet"]
    assert cli.main(argv + ["--covariance-temperature", "auto", "--no-figures"]) == 0
    report = json.loads((out / "report.json").read_text())
    # the same fit, by hand: the run's validation split against its raters, the run's seed
    config = stored_config(str(tiny_run))
    _, val, _ = make_data(config, str(tiny_run))
    model = keras.models.load_model(tiny_run / "model.keras", safe_mode=True)
    fitted = CovarianceTemperature(seed=config.seed).fit(model, val.images, val.annotations)
    assert report["covariance_temperature"] == fitted.temperature
    fit = report["covariance_temperature_fit"]
    assert fit["ged_by_temperature"] == {str(t): g for t, g in fitted.ged_by_temperature.items()}
    assert "validation split" in fit["on"] and report["class_scales"] is None
    assert "covariance temperature" in capsys.readouterr().out
    assert np.isfinite(report["ged"]) and 0 <= report["hm_iou"] <= 1


def test_export_records_the_control(tiny_run, tmp_path):
    import tensorflow as tf

    target = tmp_path / "sm"
    argv = ["export", str(tiny_run), "--output", str(target), "--num-samples", "2"]
    assert cli.main(argv + ["--covariance-temperature", "0.5"]) == 0
    (version,) = list(target.iterdir())
    loaded = tf.saved_model.load(str(version))
    images = np.zeros((1, 32, 32, 1), np.float32)
    out = loaded.signatures["params"](images=tf.constant(images))
    config = json.loads(out["head_config"].numpy().decode())
    assert config["control"] == {"temperature": 0.5, "class_scales": None}


@pytest.mark.parametrize(
    "flags, status, match",
    [
        (["--covariance-temperature", "0"], 2, "expected 'auto' or a number > 0"),
        (["--covariance-temperature", "warm"], 2, "expected 'auto' or a number > 0"),
        (["--class-scales", "1,x"], 2, "comma-separated numbers >= 0"),
        (["--class-scales", "1,-1,1"], 2, "comma-separated numbers >= 0"),
        (["--class-scales", "1,2"], 1, "--class-scales: `class_scales` must have one entry"),
    ],
)
def test_bad_control_flags_are_clear_errors(tiny_run, tmp_path, capsys, flags, status, match):
    argv = [
        "sample",
        str(tiny_run),
        "-n",
        "2",
        "--images",
        "1",
        "--output",
        str(tmp_path / "x.npz"),
    ]
    if status == 2:
        with pytest.raises(SystemExit) as exc:
            cli.main(argv + flags)
        assert exc.value.code == 2
    else:
        assert cli.main(argv + flags) == status
    assert match in capsys.readouterr().err
