"""`tfp-seg train --head mixture --components K`: a tiny run trains, evaluates, samples and
exports (SavedModel at the end of training, ONNX by `tfp-seg export`)."""

import json

import numpy as np
import pytest

from tests.helpers import tiny_train_args
from tfp_seg import cli
from tfp_seg.layers import MixtureLowRankLogits
from tfp_seg.losses import MixtureNLL
from tfp_seg.runs import TrainConfig, load_run


def _train(tmp_path, **flags):
    args = tiny_train_args(head="mixture", components=2, epochs=1, num_images=24, **flags)
    argv = ["train", *args, "--output-dir", str(tmp_path), "--name", "mix"]
    assert cli.main(argv) == 0
    return tmp_path / "mix"


def test_a_mixture_run_trains_evaluates_and_samples(tmp_path):
    run = _train(tmp_path)
    config = json.loads((run / "config.json").read_text())
    assert config["head"] == "mixture" and config["components"] == 2
    report = json.loads((run / "report.json").read_text())
    assert report["head"] == "mixture"
    for key in ("ged", "hm_iou", "nll", "ece", "miou"):
        assert np.isfinite(report[key]), key

    model = load_run(str(run), TrainConfig(head="mixture"))
    head = model.head
    assert isinstance(head, MixtureLowRankLogits) and head.num_components == 2
    assert head.rank == 2  # --rank of the tiny run, for every component
    assert isinstance(model.loss, MixtureNLL) and model.loss.num_samples == 4
    logits = model.sample_logits(np.full((1, 32, 32, 1), 0.5, "float32"), 4, seed=0)
    assert logits.shape == (4, 1, 32, 32, 3) and np.abs(logits - logits[:1]).max() > 1e-6
    npz = tmp_path / "s.npz"
    assert cli.main(["sample", str(run), "-n", "3", "--images", "2", "--output", str(npz)]) == 0
    with np.load(npz) as f:
        assert f["samples"].shape == (3, 2, 32, 32)


@pytest.mark.slow
def test_a_mixture_run_exports_a_saved_model_and_onnx(tmp_path, capsys):
    savedmodels = tmp_path / "savedmodels"
    run = _train(tmp_path, no_export=False, savedmodels_dir=str(savedmodels))
    assert (savedmodels / "mix" / "1" / "saved_model.pb").is_file()
    onnx_path = tmp_path / "mix.onnx"
    assert cli.main(["export", str(run), "--format", "onnx", "--output", str(onnx_path)]) == 0
    assert onnx_path.is_file()
    assert "exported ONNX" in capsys.readouterr().out


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--components", "0"], "components"),
        (["--model", "prob_unet"], "does not apply"),
    ],
)
def test_bad_mixture_flags_are_clear_errors(tmp_path, capsys, extra, match):
    argv = ["train", *tiny_train_args(head="mixture"), "--output-dir", str(tmp_path), *extra]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("tfp-seg: error:") and match in err


def test_help_names_the_mixture_head_and_its_flag(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    out = capsys.readouterr().out
    assert "mixture" in out and "--components" in out
