"""Run reports (`tfp_seg.reporting`) and the output of `tfp-seg evaluate`."""

import json
import os

import keras
import numpy as np
import pytest

from tests.helpers import assert_png
from tfp_seg import cli, layers, models, plots, reporting
from tfp_seg.evaluation import evaluate_ambiguous

pytestmark = pytest.mark.usefixtures("close_figures")

# ================================================================================================
# reporting
# ================================================================================================


def _fake_report():
    report = {key: 0.1 + 0.01 * i for i, key in enumerate(reporting.METRICS)}
    for key in ("ged", "hm_iou", "diversity", "nll"):
        report[f"oracle_{key}"] = report[key] / 3
    report.update(
        {
            "num_images": 32,
            "num_samples": 16,
            "run": "tiny",
            "head": "low_rank",
            "custom_score": 0.4321,
            "oracle_custom_score": 0.9876,
            "params": 12345,
        }
    )
    return report


def test_render_markdown_has_every_metric_with_model_and_oracle():
    report = _fake_report()
    md = reporting.render_markdown(report, config={"epochs": 3, "head": "low_rank"})
    rows = {
        line.split("|")[1].strip(): line
        for line in md.splitlines()
        if line.startswith("| ") and "`" in line.split("|")[1]
    }
    for key in list(reporting.METRICS) + ["custom_score"]:
        row = next(r for label, r in rows.items() if f"(`{key}`)" in label or label == f"`{key}`")
        cells = [c.strip() for c in row.split("|")[1:-1]]
        assert cells[1] == f"{report[key]:.4f}", (key, cells)
        oracle = report.get(f"oracle_{key}")
        assert cells[2] == (f"{oracle:.4f}" if oracle is not None else "—"), (key, cells)
        assert len(cells[3]) > 20 or key == "custom_score"  # says what it means
    assert md.startswith("# Evaluation report: tiny")
    assert "32 held-out images, 16 samples per image" in md
    assert "| `head` | low_rank |" in md and "| `params` | 12,345 |" in md  # other values
    assert "## Configuration" in md and "| `epochs` | 3 |" in md
    assert "## Configuration" not in reporting.render_markdown(report)


def _tiny_model(shapes):
    keras.utils.set_random_seed(0)
    model = models.ProbabilisticSegmenter(
        models.UNet(base_filters=4, depth=1), layers.LowRankLogits(shapes.num_classes, rank=2)
    )
    model.build((None,) + shapes.images.shape[1:])
    return model


def test_write_report_creates_all_files(tmp_path, shapes, monkeypatch):
    model = _tiny_model(shapes)
    report = evaluate_ambiguous(model, shapes, num_samples=4, seed=3)
    report["custom"] = np.float32(0.5)  # numpy scalars are written as JSON numbers
    seen = {}
    original = plots.plot_reliability_diagram

    def spy(data, **kwargs):
        seen.update(data)
        return original(data, **kwargs)

    monkeypatch.setattr(plots, "plot_reliability_diagram", spy)
    out = tmp_path / "run"
    (out).mkdir()
    (out / "config.json").write_text(json.dumps({"name": "run", "rank": 2}))
    written = reporting.write_report(
        out, report, model, shapes, num_samples=4, seed=3, num_images=2
    )
    names = sorted(os.path.relpath(p, out) for p in written["figures"])
    assert names == sorted(
        [
            "figures/reliability.png",
            "figures/samples_0.png",
            "figures/samples_1.png",
            "figures/uncertainty_0.png",
            "figures/uncertainty_1.png",
        ]
    )
    for path in written["figures"]:
        assert_png(path)
    stored = json.loads((out / "report.json").read_text())
    assert stored["custom"] == 0.5 and stored["ged"] == pytest.approx(report["ged"])
    md = (out / "report.md").read_text()
    for rel in names:
        assert f"]({rel})" in md
    assert "| `rank` | 2 |" in md  # config.json of the run folder
    # The diagram is drawn from the evaluated samples: its ECE is the report's.
    assert seen["ece"] == pytest.approx(report["ece"], abs=1e-9)
    assert seen["counts"].sum() == shapes.annotations.size
    assert not [p for p in os.listdir(out) if ".tmp" in p]


def test_write_report_without_figures_and_errors(tmp_path, shapes):
    written = reporting.write_report(tmp_path / "a", _fake_report(), figures=False)
    assert written["figures"] == [] and not (tmp_path / "a" / "figures").exists()
    assert (tmp_path / "a" / "report.md").read_text().count("custom_score") == 1
    with pytest.raises(ValueError, match="pass a report dict, or `model` and `data`"):
        reporting.write_report(tmp_path / "b", None)
    with pytest.raises(ValueError, match="`num_samples` must be an int >= 1"):
        reporting.write_report(tmp_path / "b", _fake_report(), num_samples=0)


# ================================================================================================
# tfp-seg evaluate
# ================================================================================================


def test_cli_evaluate_writes_report_markdown_and_figures(tiny_run, tmp_path, capsys):
    out = tmp_path / "eval"
    assert (
        cli.main(["evaluate", str(tiny_run), "--num-samples", "4", "--output", str(out), "--quiet"])
        == 0
    )
    report = json.loads((out / "report.json").read_text())
    assert report["num_samples"] == 4 and report["run"] == "tiny"
    md = (out / "report.md").read_text()
    assert md.startswith("# Evaluation report: t")
    assert f"| {report['ged']:.4f} | {report['oracle_ged']:.4f} |" in md
    assert "| `base_filters` | 4 |" in md  # the run's config
    pngs = sorted(os.listdir(out / "figures"))
    assert pngs == [
        "reliability.png",
        "samples_0.png",
        "samples_1.png",
        "samples_2.png",
        "uncertainty_0.png",
        "uncertainty_1.png",
        "uncertainty_2.png",
    ]
    for name in pngs:
        assert_png(out / "figures" / name)
    assert "report.md" in capsys.readouterr().out

    bare = tmp_path / "bare"
    assert (
        cli.main(
            [
                "evaluate",
                str(tiny_run),
                "--num-samples",
                "2",
                "--output",
                str(bare),
                "--quiet",
                "--no-figures",
            ]
        )
        == 0
    )
    assert (bare / "report.md").is_file() and not (bare / "figures").exists()


def test_write_report_draws_the_training_curves_of_the_history(tmp_path):
    history = {
        "loss": [2.0, 1.5, 1.2],
        "val_loss": [2.1, 1.7, 1.4],
        "val_eval_epochs": [2, 3],
        "val_ged": [0.3, 0.2],
        "val_hm_iou": [0.5, 0.6],
        "val_diversity": [0.7, 0.5],
        "oracle_val_ged": 0.01,
        "oracle_val_hm_iou": 0.8,
        "oracle_val_diversity": 0.45,
    }
    report = _fake_report() | {"val_ged": 0.2, "oracle_val_ged": 0.01, "val_eval_epoch": 3}
    out = tmp_path / "run"
    written = reporting.write_report(out, report, history=history)
    assert [os.path.relpath(p, out) for p in written["figures"]] == ["figures/curves.png"]
    assert_png(out / "figures" / "curves.png")
    md = (out / "report.md").read_text()
    assert "](figures/curves.png)" in md and "(dashed: the oracle)" in md
    assert "D²_GED (validation) ↓ (`val_ged`) | 0.2000 | 0.0100 |" in md
    # No history given: the run folder's history.json; users' data: the raters' line.
    users = {k: v for k, v in history.items() if not k.startswith("oracle_")}
    (out / "history.json").write_text(json.dumps(users | {"val_reference_diversity": 0.4}))
    reporting.write_report(out, _fake_report())
    assert "(dashed: the raters)" in (out / "report.md").read_text()
    (out / "history.json").write_text(json.dumps({"val_loss": "oops"}))  # nothing to plot
    assert reporting.write_report(out, _fake_report())["figures"] == []
    with pytest.raises(ValueError, match="`history` must be a mapping of lists"):
        reporting.write_report(out, _fake_report(), history=[1, 2])
