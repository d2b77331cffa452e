"""`tfp-seg train --spatial-dims 3`: a run on volumes of the built-in benchmark, through
`evaluate` and `sample`, with the report's Dice table and slice figures; the config's checks
and volume defaults; the report's GED / diversity / Dice table."""

import json
import os

import keras
import numpy as np
import pytest

from tests.helpers import assert_png, tiny_train_args
from tfp_seg import cli, metrics
from tfp_seg.runs import TrainConfig, load_run, make_data, stored_config
from tfp_seg.runs.config import VOLUME_DEFAULTS
from tfp_seg.runs.report_tables import dice_table, render_markdown

pytestmark = pytest.mark.usefixtures("close_figures")

SIDE = 16  # the smallest side of ambiguous_shapes
# 20 volumes: 16 train / 2 val / 2 test; validation curves after the one epoch.
TINY_3D = tiny_train_args(
    spatial_dims=3,
    image_size=SIDE,
    num_images=20,
    epochs=1,
    batch_size=4,
    val_every=1,
    val_images=2,
    val_samples=2,
)
SLICE_FIGURES = ["samples_0.png", "samples_1.png", "uncertainty_0.png", "uncertainty_1.png"]
NUM_CLASSES = 3


@pytest.fixture(scope="module")
def run_3d(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs3d")
    keras.utils.set_random_seed(0)
    assert cli.main(["train", *TINY_3D, "--output-dir", str(out), "--name", "vol"]) == 0
    return out / "vol"


def _report(folder) -> dict:
    return json.loads((folder / "report.json").read_text())


def _dice_of(pred, annotations) -> np.ndarray:
    """per_class_dice of predictions [B, *S] against every annotation [B, K, *S]."""
    b, k = annotations.shape[:2]
    pred_k = np.repeat(pred[:, None], k, axis=1).reshape((b * k,) + pred.shape[1:])
    return metrics.per_class_dice(
        pred_k, annotations.reshape((b * k,) + annotations.shape[2:]), NUM_CLASSES
    )


def test_train_writes_a_volume_run_with_dice_and_slice_figures(run_3d):
    config = json.loads((run_3d / "config.json").read_text())
    assert config["spatial_dims"] == 3 and config["image_size"] == SIDE
    report = _report(run_3d)
    assert report["num_images"] == 2  # the test volumes
    for key in ("ged", "diversity", "oracle_diversity", "hm_iou", "nll", "val_ged"):
        assert np.isfinite(report[key]), key
    assert report["class_names"] == ["background", "class A", "class B"]
    for c in range(NUM_CLASSES):
        for key in (f"dice_class_{c}", f"oracle_dice_class_{c}"):
            assert 0.0 <= report[key] <= 1.0, key
    # The exact marginals' arg max is right on most voxels: a high Dice of the background.
    assert report["oracle_dice_class_0"] > 0.9
    md = (run_3d / "report.md").read_text()
    assert "## GED, diversity and Dice" in md
    header = next(line for line in md.splitlines() if line.startswith("| | D²_GED"))
    assert "Dice background ↑ | Dice class A ↑ | Dice class B ↑ |" in header
    dice = " | ".join(f"{report[f'dice_class_{c}']:.4f}" for c in range(NUM_CLASSES))
    model_row = f"| model | {report['ged']:.4f} | {report['diversity']:.4f} | {dice} |"
    assert model_row in md
    oracle = " | ".join(f"{report[f'oracle_dice_class_{c}']:.4f}" for c in range(NUM_CLASSES))
    assert f"| {report['oracle_diversity']:.4f} | {oracle} |" in md
    pngs = sorted(os.listdir(run_3d / "figures"))
    assert pngs == sorted(["curves.png", "reliability.png"] + SLICE_FIGURES)
    for name in pngs:
        assert_png(run_3d / "figures" / name)
    assert "axial slice" in md and "](figures/samples_1.png)" in md


def test_the_run_is_a_3d_u_net_with_the_head_on_3d_features(run_3d):
    model = load_run(str(run_3d))
    assert model.backbone.spatial_dims == 3 and model.head.spatial_dims == 3
    logits = model.sample_logits(np.full((1, SIDE, SIDE, SIDE, 1), 0.5, "float32"), 2, seed=0)
    assert logits.shape == (2, 1, SIDE, SIDE, SIDE, NUM_CLASSES)


def test_report_dice_is_per_class_dice_of_the_saved_samples(run_3d, tmp_path):
    npz = tmp_path / "s.npz"
    args = ["sample", str(run_3d), "-n", "4", "--images", "99", "--seed", "0"]
    assert cli.main([*args, "--output", str(npz)]) == 0
    with np.load(npz) as f:
        saved = {k: f[k] for k in f.files}
    assert saved["images"].shape == (2, SIDE, SIDE, SIDE, 1)
    assert saved["annotations"].shape == (2, 4, SIDE, SIDE, SIDE)
    assert saved["samples"].shape == (4, 2, SIDE, SIDE, SIDE)
    probs = saved["mean_probabilities"]
    assert probs.shape == (2, SIDE, SIDE, SIDE, NUM_CLASSES)
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
    report = _report(run_3d)  # train evaluated with eval_samples 4, seed 0
    dice = _dice_of(probs.argmax(-1), saved["annotations"])
    for c in range(NUM_CLASSES):
        assert report[f"dice_class_{c}"] == pytest.approx(dice[c], abs=1e-9), c
    # The oracle: the arg max of the exact marginals of the recorded test volumes.
    test = make_data(stored_config(str(run_3d)), str(run_3d))[2]
    np.testing.assert_array_equal(test.annotations, saved["annotations"])
    oracle = _dice_of(test.marginals().argmax(-1), test.annotations)
    for c in range(NUM_CLASSES):
        assert report[f"oracle_dice_class_{c}"] == pytest.approx(oracle[c], abs=1e-9), c


def test_evaluate_a_volume_run_gives_the_trained_report(run_3d, tmp_path):
    out = tmp_path / "eval"
    args = ["evaluate", str(run_3d), "--num-samples", "4", "--seed", "0", "--quiet"]
    assert cli.main([*args, "--output", str(out)]) == 0
    trained, evaluated = _report(run_3d), _report(out)
    for key in ("ged", "diversity", "hm_iou", "dice_class_0", "dice_class_1", "dice_class_2"):
        assert evaluated[key] == pytest.approx(trained[key], abs=1e-6), key
    assert sorted(os.listdir(out / "figures")) == sorted(["reliability.png"] + SLICE_FIGURES)
    assert "## GED, diversity and Dice" in (out / "report.md").read_text()


def test_volume_defaults_and_stored_configs():
    volumes = TrainConfig(spatial_dims=3)
    assert {k: getattr(volumes, k) for k in VOLUME_DEFAULTS} == VOLUME_DEFAULTS
    images = TrainConfig()
    assert (images.image_size, images.num_images, images.epochs) == (64, 640, 36)
    assert TrainConfig(spatial_dims=3, image_size=32).image_size == 32  # explicit wins
    args = cli.build_parser().parse_args(["train", "--spatial-dims", "3", "--epochs", "2"])
    config = cli._train_config(args)
    assert (config.spatial_dims, config.image_size, config.epochs) == (3, 24, 2)
    assert "spatial_dims" in cli._TRAIN_FLAGS  # test_cli: every flag is in `train --help`


def test_a_stored_config_without_spatial_dims_is_2d(tmp_path):
    fields = {"head": "low_rank", "image_size": 32, "num_images": 40, "epochs": 2}
    (tmp_path / "config.json").write_text(json.dumps(fields))
    config = stored_config(str(tmp_path))
    assert config.spatial_dims == 2 and config.image_size == 32 and config.epochs == 2


@pytest.mark.parametrize(
    "flags, match",
    [
        (["--spatial-dims", "4"], "`spatial_dims` must be 2 (images [H, W]) or 3"),
        (["--spatial-dims", "3", "--backbone", "resnet_fpn"], "takes images only"),
        (["--spatial-dims", "3", "--data", "lidc:data_lidc.pickle"], "not a volume source"),
        (["--spatial-dims", "3", "--image-size", "8", "--depth", "2"], "image_size must be"),
    ],
)
def test_bad_volume_configs_are_clear_errors(tmp_path, capsys, flags, match):
    out = tmp_path / "runs"
    assert cli.main(["train", *TINY_3D, *flags, "--output-dir", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("tfp-seg: error:") and match in err, err
    assert not out.exists()  # nothing written before the error


def test_dice_table_of_users_data_has_regions_and_the_raters_row():
    report = {
        "ged": 0.3,
        "diversity": 0.2,
        "reference_diversity": 0.25,
        "dice": 0.7,
        "dice_whole_tumour": 0.8,
        "dice_enhancing": 0.6,
        "dice_class_0": 0.99,
        "dice_class_1": 0.5,
        "class_names": ["background", "lesion"],
    }
    lines = dice_table(report)
    header = "| | D²_GED ↓ | sample diversity | Dice background ↑ | Dice lesion ↑ | "
    assert lines[2] == header + "Dice (foreground) ↑ | Dice whole tumour ↑ | Dice enhancing ↑ |"
    assert lines[4] == "| model | 0.3000 | 0.2000 | 0.9900 | 0.5000 | 0.7000 | 0.8000 | 0.6000 |"
    assert lines[5] == "| raters | — | 0.2500 | — | — | — | — | — |"
    md = render_markdown(report)
    assert md.count("0.8000") == 1  # the region Dice is in the Dice table, not in "Other values"
    assert "class_names" not in md
    assert dice_table({"ged": 0.1, "diversity": 0.2}) == []  # no Dice: no table
