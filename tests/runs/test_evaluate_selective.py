"""Selective-prediction metrics (AURC, E-AURC, AUGRC at pixel and image level) in the evaluation
report, `report.md` and the output of `tfp-seg evaluate`."""

import json

import numpy as np
import pytest

from tfp_seg import cli, metrics
from tfp_seg.data import ambiguous_shapes
from tfp_seg.evaluation import evaluate_ambiguous, softmax

SELECTIVE = [f"{m}_{level}" for level in ("pixel", "image") for m in ("aurc", "e_aurc", "augrc")]
ORACLE = ["oracle_aurc_pixel", "oracle_e_aurc_pixel", "oracle_augrc_pixel"]


class FixedLogits:
    """A fake sampler: the same seeded random logits `[N, B, H, W, C]` for a given seed."""

    def __init__(self, data):
        self.data = data

    def sample_logits(self, x, num_samples, seed=None, batch_size=None):
        rng = np.random.default_rng(seed)
        shape = (num_samples,) + self.data.annotations.shape[:1] + x.shape[1:3]
        return 2.0 * rng.normal(size=shape + (self.data.num_classes,)).astype(np.float32)


def _check_ranges(report):
    for key in SELECTIVE + ORACLE:
        assert np.isfinite(report[key]), key
    for prefix in ("", "oracle_"):
        assert 0.0 <= report[f"{prefix}aurc_pixel"] <= 1.0
        assert report[f"{prefix}e_aurc_pixel"] >= 0.0
        assert 0.0 <= report[f"{prefix}augrc_pixel"] <= 0.5
    assert 0.0 <= report["aurc_image"] <= 1.0 and report["e_aurc_image"] >= 0.0
    assert 0.0 <= report["augrc_image"] <= 0.5


def test_evaluation_report_holds_the_selective_metrics_of_its_samples():
    data = ambiguous_shapes(num_images=6, image_size=16, num_annotations=3, seed=2)
    model = FixedLogits(data)
    report = evaluate_ambiguous(model, data, num_samples=3, seed=7)
    _check_ranges(report)
    # The same numbers from the same samples, through the public metric functions.
    probs = softmax(model.sample_logits(data.images, 3, seed=7)).mean(axis=0)
    k = data.annotations.shape[1]
    probs_k = np.repeat(probs[:, None], k, axis=1)
    pixel = metrics.selective_scores(*metrics.pixel_confidence_errors(probs_k, data.annotations))
    image = metrics.selective_scores(*metrics.image_confidence_risks(probs, data.annotations))
    marginals_k = np.repeat(data.marginals()[:, None], k, axis=1)
    oracle = metrics.selective_scores(
        *metrics.pixel_confidence_errors(marginals_k, data.annotations)
    )
    for key in ("aurc", "e_aurc", "augrc"):
        assert report[f"{key}_pixel"] == pytest.approx(pixel[key], abs=1e-9)
        assert report[f"{key}_image"] == pytest.approx(image[key], abs=1e-9)
        assert report[f"oracle_{key}_pixel"] == pytest.approx(oracle[key], abs=1e-9)
    # Random logits are a much worse predictor and ranking than the exact marginals.
    assert report["augrc_pixel"] > report["oracle_augrc_pixel"]


def test_trained_run_and_cli_evaluate_report_selective_metrics(tiny_run, tmp_path, capsys):
    _check_ranges(json.loads((tiny_run / "report.json").read_text()))  # written by train
    out = tmp_path / "eval"
    capsys.readouterr()
    argv = ["evaluate", str(tiny_run), "--num-samples", "4", "--output", str(out), "--quiet"]
    assert cli.main([*argv, "--no-figures"]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    _check_ranges(report)
    md = (out / "report.md").read_text()
    for key in SELECTIVE:
        line = next(row for row in printed.splitlines() if row.split()[:1] == [key])
        assert float(line.split()[1]) == pytest.approx(report[key], abs=1e-4)
        row = next(row for row in md.splitlines() if f"(`{key}`)" in row)
        assert f"| {report[key]:.4f} |" in row
    row = next(row for row in md.splitlines() if "(`augrc_pixel`)" in row)
    assert f"| {report['augrc_pixel']:.4f} | {report['oracle_augrc_pixel']:.4f} |" in row
