"""`tfp-seg train | evaluate | sample --data SPEC` on users' multi-rater data (LIDC pickle,
image folder), end to end through the CLI, with the recorded split and the papers' metrics."""

import json

import numpy as np
import pytest

from tests.helpers import fake_lidc_entries, tiny_train_args, write_image_folder, write_lidc_pickle
from tfp_seg import cli

SERIES = tuple(f"series-{j}" for j in range(8))
TINY = tiny_train_args(epochs=1, depth=2, eval_samples=4)
PAPER_KEYS = ("ged_16", "ged_100", "hm_iou_16", "hm_iou_100", "ged", "hm_iou", "diversity")
RATER_KEYS = ("reference_diversity", "nll", "ece", "brier", "miou", "dice")


@pytest.fixture(scope="module")
def lidc_parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("lidc")
    entries = fake_lidc_entries(np.random.default_rng(0), n=24, size=16, series=SERIES)
    return write_lidc_pickle(root / "parts", entries, parts=3), entries


@pytest.fixture(scope="module")
def lidc_run(lidc_parts, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    argv = ["train", *TINY, "--data", f"lidc:{lidc_parts[0]}", "--output-dir", str(out)]
    assert cli.main([*argv, "--name", "lidc"]) == 0
    return out / "lidc"


def test_train_on_lidc_records_a_series_split_and_the_papers_metrics(lidc_run, lidc_parts):
    entries = lidc_parts[1]
    split = json.loads((lidc_run / "split.json").read_text())
    assert split["data"].startswith("lidc:") and split["fractions"] == [0.6, 0.2, 0.2]
    ids = split["ids"]
    assert sorted(ids["train"] + ids["val"] + ids["test"]) == sorted(entries)
    series = {part: {entries[i]["series_uid"] for i in ids[part]} for part in ids}
    assert not (series["train"] & series["test"] or series["val"] & series["test"])
    assert not series["train"] & series["val"]
    report = json.loads((lidc_run / "report.json").read_text())
    assert report["num_images"] == len(ids["test"]) and report["num_annotations"] == 4
    for key in PAPER_KEYS + RATER_KEYS:
        assert np.isfinite(report[key]), key
    assert 0 <= report["hm_iou_16"] <= 1 and report["ged_100"] >= 0
    assert "GED (100)" in (lidc_run / "report.md").read_text()
    config = json.loads((lidc_run / "config.json").read_text())
    assert config["data"] == split["data"]


def test_evaluate_and_sample_reuse_the_runs_test_split(lidc_run, tmp_path):
    split = json.loads((lidc_run / "split.json").read_text())
    out = tmp_path / "eval"
    assert cli.main(["evaluate", str(lidc_run), "--num-samples", "4", "--output", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["num_images"] == len(split["ids"]["test"])
    assert all(np.isfinite(report[k]) for k in PAPER_KEYS)
    npz = tmp_path / "s.npz"
    assert (
        cli.main(["sample", str(lidc_run), "-n", "3", "--images", "2", "--output", str(npz)]) == 0
    )
    with np.load(npz) as f:
        assert f["samples"].shape == (3, 2, 16, 16) and f["annotations"].shape == (2, 4, 16, 16)


def test_evaluate_says_when_the_data_changed(lidc_run, lidc_parts, tmp_path, capsys):
    # the same spec now names a pickle without the run's test images
    config = json.loads((lidc_run / "config.json").read_text())
    moved = tmp_path / "run"
    moved.mkdir()
    for name in ("model.keras", "split.json"):
        (moved / name).write_bytes((lidc_run / name).read_bytes())
    smaller = write_lidc_pickle(tmp_path / "small.pickle", dict(list(lidc_parts[1].items())[:5]))
    config["data"] = f"lidc:{smaller}"
    (moved / "config.json").write_text(json.dumps(config))
    assert cli.main(["evaluate", str(moved), "--no-figures"]) == 1
    assert "was made of data" in capsys.readouterr().err


def test_image_folder_end_to_end_and_evaluate_on_another_source(tmp_path, lidc_parts):
    images, masks, _ = write_image_folder(tmp_path / "folder", np.random.default_rng(1), 10, k=3)
    spec = f"folder:{images}:{masks}"
    argv = ["train", *TINY, "--data", spec, "--output-dir", str(tmp_path), "--name", "f"]
    assert cli.main(argv) == 0
    report = json.loads((tmp_path / "f" / "report.json").read_text())
    assert report["num_annotations"] == 3 and np.isfinite(report["ged_100"])
    out = tmp_path / "other"
    lidc = f"lidc:{lidc_parts[0]}"
    assert cli.main(["evaluate", str(tmp_path / "f"), "--data", lidc, "--output", str(out)]) == 0
    assert json.loads((out / "report.json").read_text())["num_images"] == 24  # all of it


@pytest.mark.parametrize(
    "spec, match",
    [("imagenet", "unknown source 'imagenet'"), ("lidc:/nowhere/d.pickle", "/nowhere/d.pickle")],
)
def test_bad_data_specs_fail_before_a_run_folder_is_written(tmp_path, capsys, spec, match):
    argv = ["train", *TINY, "--data", spec, "--output-dir", str(tmp_path), "--name", "bad"]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("tfp-seg: error:") and match in err
    assert not (tmp_path / "bad").exists()


def test_the_lidc_recipes_run_at_a_tiny_size(tmp_path, lidc_parts):
    for recipe in ("lidc_ssn", "lidc_prob_unet"):
        argv = [
            "train",
            "--config",
            f"examples/configs/{recipe}.yaml",
            *tiny_train_args(epochs=1, depth=2, eval_samples=2, rank=2, num_samples=2),
            "--max-filters",
            "8",
            "--batch-size",
            "4",
            "--data",
            f"lidc:{lidc_parts[0]}",
            "--output-dir",
            str(tmp_path),
            "--name",
            recipe,
        ]
        assert cli.main(argv) == 0, recipe
        config = json.loads((tmp_path / recipe / "config.json").read_text())
        assert config["augment"] is True and config["norm"] == "batch"
        assert config["max_filters"] == 8


@pytest.mark.parametrize(
    "model, head, annotations",
    [
        ("segmenter", "low_rank", "all"),
        ("segmenter", "heteroscedastic", "marginal"),
        ("prob_unet", "low_rank", "all"),  # every (image, rater) pair in the ELBO
    ],
)
def test_training_over_all_raters(tmp_path, lidc_parts, model, head, annotations):
    flags = dict(epochs=1, depth=2, eval_samples=2, head=head, annotations=annotations)
    argv = [
        "train",
        *tiny_train_args(model=model, **flags),
        "--data",
        f"lidc:{lidc_parts[0]}",
        "--output-dir",
        str(tmp_path),
        "--name",
        "r",
    ]
    assert cli.main(argv) == 0
    history = json.loads((tmp_path / "r" / "history.json").read_text())
    assert np.isfinite(history["loss"]).all()
    assert json.loads((tmp_path / "r" / "config.json").read_text())["annotations"] == annotations


@pytest.mark.parametrize(
    "flags, match",
    [
        (["--annotations", "marginal"], "soft label map is not defined"),
        (
            ["--annotations", "marginal", "--model", "prob_unet"],
            "does not apply to `model` prob_unet",
        ),
        (["--annotations", "several"], "`annotations` must be one of"),
    ],
)
def test_bad_annotation_modes_are_refused(tmp_path, capsys, flags, match):
    assert cli.main(["train", *TINY, *flags, "--output-dir", str(tmp_path)]) == 1
    assert match in capsys.readouterr().err


# --- streamed from disk ----------------------------------------------------------------------
def _report(path):
    return json.loads((path / "report.json").read_text())


def test_a_streamed_run_trains_evaluates_and_samples_through_the_cli(
    lidc_parts, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("TFP_SEG_CACHE", str(tmp_path / "cache"))
    argv = ["train", *TINY, "--data", f"lidc:{lidc_parts[0]}", "--output-dir", str(tmp_path)]
    assert cli.main([*argv, "--name", "s", "--stream"]) == 0
    run = tmp_path / "s"
    assert "streamed from disk (stream=True); cache " in capsys.readouterr().out
    assert json.loads((run / "split.json").read_text())["stream"] is True
    assert json.loads((run / "config.json").read_text())["stream"] is True
    (source_dir,) = (tmp_path / "cache").iterdir()
    (cache,) = source_dir.iterdir()
    stamp = (cache / "images.npy").stat().st_mtime_ns

    # evaluate RUN streams as the run did, from the same cache (not decoded again), and
    # scores exactly what the same run scores from memory
    assert (
        cli.main(["evaluate", str(run), "--num-samples", "4", "--output", str(tmp_path / "e")]) == 0
    )
    assert (cache / "images.npy").stat().st_mtime_ns == stamp
    argv = ["evaluate", str(run), "--num-samples", "4", "--no-figures", "--no-stream"]
    assert cli.main([*argv, "--output", str(tmp_path / "m")]) == 0
    streamed, in_memory = _report(tmp_path / "e"), _report(tmp_path / "m")
    for key in PAPER_KEYS + RATER_KEYS:
        assert streamed[key] == in_memory[key], key
    npz = tmp_path / "s.npz"
    assert cli.main(["sample", str(run), "-n", "3", "--images", "2", "--output", str(npz)]) == 0
    test_ids = json.loads((run / "split.json").read_text())["ids"]["test"][:2]
    with np.load(npz) as f:
        assert f["samples"].shape == (3, 2, 16, 16)
        expected = np.stack([np.stack(lidc_parts[1][i]["masks"]) for i in test_ids])
        np.testing.assert_array_equal(f["annotations"], expected)


def test_a_streamed_image_folder_and_the_stream_flags(tmp_path, capsys):
    images, masks, _ = write_image_folder(tmp_path / "folder", np.random.default_rng(2), 10, k=2)
    spec = f"folder:{images}:{masks}"
    cache_dir = tmp_path / "my-cache"
    argv = ["train", *TINY, "--data", spec, "--output-dir", str(tmp_path), "--name", "f"]
    assert cli.main([*argv, "--stream", "--cache-dir", str(cache_dir)]) == 0
    assert json.loads((tmp_path / "f" / "config.json").read_text())["cache_dir"] == str(cache_dir)
    assert len(list(cache_dir.iterdir())) == 1
    out = tmp_path / "other"
    argv = ["evaluate", str(tmp_path / "f"), "--data", spec, "--stream", "--output", str(out)]
    assert cli.main([*argv, "--no-figures"]) == 0
    assert _report(out)["num_images"] == 10
    capsys.readouterr()
    argv = ["train", *TINY, "--stream", "--output-dir", str(tmp_path), "--name", "b"]
    assert cli.main(argv) == 1
    assert "does not apply to `data` builtin" in capsys.readouterr().err
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    argv = ["train", *TINY, "--data", spec, "--stream", "--cache-dir", str(blocker)]
    assert cli.main([*argv, "--output-dir", str(tmp_path), "--name", "u"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("tfp-seg: error: cannot write the data cache in") and "a-file" in err
    assert not (tmp_path / "u").exists()
