"""`tfp-seg train | evaluate | sample | export --data nifti:DIR` on BraTS-layout volumes, end
to end through the CLI: patches in training, sliding windows over whole volumes in evaluation,
the case split, the BraTS region Dice, and the loader's errors as one CLI message."""

import json
import os
import shutil

import numpy as np
import pytest
import tensorflow as tf

from tests.data import nifti_cases
from tests.helpers import assert_png, tiny_train_args
from tfp_seg import cli, metrics
from tfp_seg.data import BRATS_CLASS_NAMES, load_nifti
from tfp_seg.runs import load_run, stored_config

pytestmark = pytest.mark.usefixtures("close_figures")

# Four cases, so that the 60/20/20 split by case leaves every part non-empty (2 / 1 / 1).
CASES = ("case_a", "case_b", "case_c", "case_d")
PATCH = 8  # windows 8^3 over volumes [D, H, W] = [8, 10, 12]
EVAL_SAMPLES = 4
TINY_NIFTI = tiny_train_args(
    epochs=1,
    batch_size=4,
    patch_size=PATCH,
    patches_per_epoch=8,
    val_every=1,
    val_images=2,
    val_samples=2,
    eval_samples=EVAL_SAMPLES,
    image_size=None,
    num_images=None,
)
REGION_KEYS = ("dice_whole_tumour", "dice_tumour_core", "dice_enhancing")
PAPER_KEYS = ("ged", "hm_iou", "diversity", "ged_16", "ged_100", "hm_iou_16", "hm_iou_100")


@pytest.fixture(scope="module")
def brats(tmp_path_factory):
    root = tmp_path_factory.mktemp("brats") / "cases"
    nifti_cases.write_cases(root, np.random.default_rng(0), cases=CASES)
    return root


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("nifti-cache")


@pytest.fixture(scope="module")
def nifti_run(brats, cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    argv = ["train", *TINY_NIFTI, "--data", f"nifti:{brats}", "--cache-dir", str(cache)]
    assert cli.main([*argv, "--output-dir", str(out), "--name", "brats"]) == 0
    return out / "brats"


def _report(folder) -> dict:
    return json.loads((folder / "report.json").read_text())


def _pairs(pred, annotations):
    """Predictions [B, *S] against each of the K maps [B, K, *S], as [B K, *S] pairs."""
    b, k = annotations.shape[:2]
    pred_k = np.repeat(pred[:, None], k, axis=1).reshape((b * k,) + pred.shape[1:])
    return pred_k, annotations.reshape((b * k,) + annotations.shape[2:])


def test_train_records_a_case_split_and_reports_the_brats_regions(nifti_run):
    config = json.loads((nifti_run / "config.json").read_text())
    assert config["spatial_dims"] == 3  # set for nifti data
    assert (config["patch_size"], config["window_overlap"]) == (PATCH, PATCH // 4)
    split = json.loads((nifti_run / "split.json").read_text())
    assert split["fractions"] == [0.6, 0.2, 0.2] and split["stream"] is True
    ids = split["ids"]
    assert sorted(ids["train"] + ids["val"] + ids["test"]) == sorted(CASES)
    assert [len(ids[p]) for p in ("train", "val", "test")] == [2, 1, 1]
    report = _report(nifti_run)
    assert report["num_images"] == 1 and report["num_annotations"] == 1
    for key in PAPER_KEYS + REGION_KEYS + ("val_ged", "val_diversity"):
        assert np.isfinite(report[key]), key
    for key in REGION_KEYS + tuple(f"dice_class_{c}" for c in range(4)):
        assert 0.0 <= report[key] <= 1.0, key
    assert report["class_names"] == list(BRATS_CLASS_NAMES)
    assert report["reference_diversity"] == 0.0  # one rater: the label map
    md = (nifti_run / "report.md").read_text()
    assert "Dice whole tumour" in md and "Dice enhancing tumour" in md and "axial slice" in md
    figures = sorted(os.listdir(nifti_run / "figures"))
    assert figures == ["curves.png", "reliability.png", "samples_0.png", "uncertainty_0.png"]
    for name in figures:
        assert_png(nifti_run / "figures" / name)


def test_region_dice_of_the_report_is_that_of_the_saved_samples(nifti_run, brats, cache, tmp_path):
    npz = tmp_path / "s.npz"
    args = ["sample", str(nifti_run), "-n", str(EVAL_SAMPLES), "--images", "9", "--seed", "0"]
    assert cli.main([*args, "--output", str(npz)]) == 0
    with np.load(npz) as f:
        saved = {k: f[k] for k in f.files}
    (test_case,) = json.loads((nifti_run / "split.json").read_text())["ids"]["test"]
    volumes = load_nifti(str(brats), cache_dir=str(cache))
    image, label, brain = volumes.volume(volumes.ids.index(test_case))
    np.testing.assert_array_equal(saved["images"][0], image)  # whole volumes, not patches
    np.testing.assert_array_equal(saved["annotations"][0, 0], label)
    assert saved["samples"].shape == (EVAL_SAMPLES, 1, 8, 10, 12)
    probs = saved["mean_probabilities"]
    assert probs.shape == (1, 8, 10, 12, 4)
    pred_k, ann_k = _pairs(probs.argmax(-1), saved["annotations"])
    regions = metrics.region_dice(pred_k, ann_k, metrics.BRATS_REGIONS, per_image=True)
    report = _report(nifti_run)  # evaluated with eval_samples samples, seed 0
    for name, values in regions.items():
        assert report[f"dice_{name}"] == pytest.approx(values.mean(), abs=1e-9), name
    per_class = metrics.per_class_dice(pred_k, ann_k, 4)
    for c in range(4):
        assert report[f"dice_class_{c}"] == pytest.approx(per_class[c], abs=1e-9), c
    # The brain mask reached the SSN head through the sliding windows: outside it the
    # covariance is zeroed (P = 0, D = epsilon = 1e-5), so a sample there flips only where the
    # mean's top two logits are within a few sqrt(2 epsilon) = 0.0045 of each other.
    sampler = load_run(str(nifti_run), stored_config(str(nifti_run)))
    loc, factor, diag = (
        np.asarray(t)[0] for t in sampler.head.covariance_parts(sampler.params(saved["images"]))
    )
    outside = ~np.asarray(brain, bool)
    assert outside.any() and not factor[outside].any()
    np.testing.assert_allclose(diag[outside], 1e-5, rtol=1e-5)
    assert diag[~outside].min() > 1e-3
    top2 = np.sort(loc, axis=-1)[..., -2:]
    clear = outside & (top2[..., 1] - top2[..., 0] > 0.05)  # > 11 sd of the difference
    samples = saved["samples"][:, 0]
    assert clear.sum() > outside.sum() // 2
    assert (samples[:, clear] == loc.argmax(-1)[clear]).all()
    assert (samples[:, ~outside] != samples[0, ~outside]).any()  # the brain is sampled


def test_evaluate_gives_the_trained_report(nifti_run, tmp_path):
    out = tmp_path / "eval"
    args = ["evaluate", str(nifti_run), "--num-samples", str(EVAL_SAMPLES), "--quiet"]
    assert cli.main([*args, "--output", str(out), "--no-figures"]) == 0
    trained, evaluated = _report(nifti_run), _report(out)
    for key in PAPER_KEYS + REGION_KEYS + ("nll", "dice_class_3"):
        assert evaluated[key] == pytest.approx(trained[key], abs=1e-6), key


def test_export_writes_the_3d_network_with_a_roi_input(nifti_run, tmp_path):
    target = tmp_path / "savedmodels" / "brats"
    args = ["export", str(nifti_run), "--output", str(target), "--num-samples", "2"]
    assert cli.main([*args, "--roi-mask"]) == 0
    meta = json.loads((target / "1" / "assets.extra" / "tfp_seg.json").read_text())
    assert meta["inputs"] == ["images", "roi_mask"]
    assert meta["image_shape"] == [None, None, None, 4]
    # On a volume of one window, the stitched parameters of the run's sampler are one pass of
    # the network: the exported `params` signature gives them.
    sampler = load_run(str(nifti_run), stored_config(str(nifti_run)))
    x = np.random.default_rng(1).normal(size=(1, PATCH, PATCH, PATCH, 4)).astype("float32")
    roi = np.zeros(x.shape[:-1], "float32")
    roi[:, 2:6, 2:6, 2:6] = 1.0
    x *= roi[..., None]  # zero outside the "brain", as the loader normalises
    served = tf.saved_model.load(str(target / "1")).signatures["params"]
    got = served(images=tf.constant(x), roi_mask=tf.constant(roi))["params"].numpy()
    np.testing.assert_allclose(got, sampler.params(x), atol=1e-5)


def test_no_stream_with_nifti_is_a_clear_error(nifti_run, brats, tmp_path, capsys):
    out = tmp_path / "runs"
    argv = ["train", *TINY_NIFTI, "--data", f"nifti:{brats}", "--no-stream"]
    assert cli.main([*argv, "--output-dir", str(out)]) == 1
    assert "always decoded into the disk cache" in capsys.readouterr().err
    assert not out.exists()
    assert cli.main(["evaluate", str(nifti_run), "--no-stream", "--output", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("tfp-seg: error:") and "`stream=False` does not apply" in err


def test_a_bad_case_reaches_the_user_as_one_message_naming_it(brats, tmp_path, capsys):
    data = tmp_path / "cases"
    shutil.copytree(brats, data)
    bad = data / "case_c" / "case_c_t1ce.nii.gz"
    nifti_cases.write_volume(bad, np.zeros((12, 10, 8, 2), np.float32))  # a 4-D file
    out = tmp_path / "runs"
    argv = ["train", *TINY_NIFTI, "--data", f"nifti:{data}", "--cache-dir", str(tmp_path / "c")]
    assert cli.main([*argv, "--output-dir", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("tfp-seg: error:") and err.count("\n") == 1, err
    assert "case_c" in err and "case_c_t1ce.nii.gz" in err and "Traceback" not in err
    assert not out.exists()  # nothing written before the error


@pytest.mark.parametrize(
    "flags, match",
    [
        (["--spatial-dims", "2"], "`spatial_dims` must be 3"),
        (["--head", "mc_dropout"], "needs `model` segmenter, `head` one of"),
        (["--model", "prob_unet"], "needs `model` segmenter"),
        (["--patch-size", "6"], "`patch_size` (6) must be divisible by 2**depth (4)"),
        (["--window-overlap", "8"], "`window_overlap` (8) must be smaller than `patch_size`"),
        (["--foreground-fraction", "1.5"], "`foreground_fraction` must be a number in [0, 1]"),
        (["--patches-per-epoch", "0"], "`patches_per_epoch` must be a positive int"),
    ],
)
def test_bad_nifti_configs_are_clear_errors(brats, tmp_path, capsys, flags, match):
    out = tmp_path / "runs"
    argv = ["train", *TINY_NIFTI, "--data", f"nifti:{brats}", *flags]
    assert cli.main([*argv, "--output-dir", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("tfp-seg: error:") and match in err, err
    assert not out.exists()
