"""Figures (`tfp_seg.plots`), reports (`tfp_seg.reporting`) and `tfp-seg evaluate` output."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from tfp_seg import cli, layers, metrics, models, plots, reporting
from tfp_seg.data import ambiguous_shapes
from tfp_seg.evaluation import evaluate_ambiguous

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _assert_png(path):
    assert os.path.isfile(path), path
    with open(path, "rb") as f:
        head = f.read(8)
    assert head == PNG_MAGIC and os.path.getsize(path) > 2000, path


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    import matplotlib.pyplot as plt

    plt.close("all")


@pytest.fixture(scope="module")
def shapes():
    return ambiguous_shapes(num_images=8, image_size=16, seed=0)


# ================================================================================================
# plots
# ================================================================================================


@pytest.mark.parametrize("max_columns", [8, 2])
def test_samples_grid_axes_legend_and_png(tmp_path, shapes, rng, max_columns):
    modes, w = shapes.modes_of(0)
    samples = modes[rng.choice(len(w), 5, p=w)]
    path = tmp_path / "sub" / "grid.png"
    fig = plots.plot_samples_grid(
        shapes.images[0],
        shapes.annotations[0],
        samples,
        class_names=["background", "class A", "class B"],
        max_columns=max_columns,
        path=path,
    )
    assert len(fig.axes) == 1 + 4 + 5
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[0] == "image" and "rater 4" in titles and "sample 5" in titles
    # Every label map is drawn as is (no resampling, no recolouring of values).
    shown = {ax.get_title(): np.asarray(ax.images[0].get_array()) for ax in fig.axes}
    np.testing.assert_array_equal(shown["sample 3"], samples[2])
    np.testing.assert_array_equal(shown["rater 2"], shapes.annotations[0, 1])
    legend = fig.legends[0]
    assert [t.get_text() for t in legend.get_texts()] == ["background", "class A", "class B"]
    _assert_png(path)


def test_samples_grid_only_samples_and_bad_inputs(shapes):
    samples = np.zeros((3, 16, 16), np.int32)
    fig = plots.plot_samples_grid(shapes.images[0], samples=samples)
    assert len(fig.axes) == 4
    with pytest.raises(ValueError, match="`samples` must hold integer class labels"):
        plots.plot_samples_grid(shapes.images[0], samples=samples.astype(np.float32))
    with pytest.raises(ValueError, match=r"`annotations` must have the image's spatial shape"):
        plots.plot_samples_grid(shapes.images[0], np.zeros((2, 8, 8), np.int32))
    with pytest.raises(ValueError, match="`image` must be one image"):
        plots.plot_samples_grid(shapes.images[:2], samples=samples)
    with pytest.raises(ValueError, match="num_classes=2"):
        plots.plot_samples_grid(shapes.images[0], samples=samples + 2, num_classes=2)


def test_uncertainty_maps_panels_colourbars_and_png(tmp_path, shapes, rng):
    probs = rng.dirichlet(np.ones(3), size=(6, 16, 16)).astype(np.float32)  # [N,H,W,C]
    from tfp_seg.uncertainty import mutual_information, predictive_entropy

    mean = probs.mean(0)
    path = tmp_path / "unc.png"
    fig = plots.plot_uncertainty_maps(
        shapes.images[0],
        mean,
        predictive_entropy(probs),
        mutual_information(probs),
        path=path,
    )
    # image + P(class 1), P(class 2) + entropy + MI, and a colourbar for each map.
    assert len(fig.axes) == 5 + 4
    panels = {ax.get_title(): ax for ax in fig.axes if ax.images and ax.get_title()}
    np.testing.assert_allclose(
        np.asarray(panels["P(class 2)"].images[0].get_array()), mean[..., 2], rtol=1e-6
    )
    assert panels["P(class 1)"].images[0].get_clim() == (0.0, 1.0)
    assert panels["predictive entropy\n(total uncertainty)"].images[0].get_clim()[
        1
    ] == pytest.approx(np.log(3))
    _assert_png(path)
    # Binary problems may pass the foreground probability [H, W].
    fig = plots.plot_uncertainty_maps(shapes.images[0], mean[..., 1], mean[..., 0], mean[..., 0])
    assert len(fig.axes) == 4 + 3
    with pytest.raises(ValueError, match="`mean_probs` must hold probabilities"):
        plots.plot_uncertainty_maps(shapes.images[0], mean * 3, mean[..., 0], mean[..., 0])
    with pytest.raises(ValueError, match=r"`mutual_info` must be a map \[H, W\]"):
        plots.plot_uncertainty_maps(shapes.images[0], mean, mean[..., 0], mean)


def test_reliability_bars_equal_accuracies(tmp_path, shapes, rng):
    marg = shapes.marginals()
    probs = np.clip(marg + rng.normal(0, 0.15, marg.shape), 0.01, None)
    probs /= probs.sum(-1, keepdims=True)
    data = metrics.reliability_diagram_data(probs, shapes.annotations[:, 0], num_bins=10)
    assert (data["counts"] == 0).any() and (data["counts"] > 0).sum() >= 3  # both kinds of bins
    path = tmp_path / "rel.png"
    fig = plots.plot_reliability_diagram(data, path=path)
    assert len(fig.axes) == 2
    ax = fig.axes[0]
    bars = next(c for c in ax.containers if c.get_label() == "accuracy")
    nonempty = data["counts"] > 0
    heights = np.array([b.get_height() for b in bars])
    np.testing.assert_allclose(heights, data["accuracy"][nonempty], rtol=1e-12)
    np.testing.assert_allclose([b.get_x() for b in bars], data["edges"][:-1][nonempty])
    assert f"ECE = {data['ece']:.4f}" in fig._suptitle.get_text()
    _assert_png(path)
    with pytest.raises(ValueError, match="lacks"):
        plots.plot_reliability_diagram({"accuracy": data["accuracy"]})


def test_no_module_level_matplotlib_in_tfp_seg():
    """matplotlib is imported inside functions only: importing tfp_seg chooses no backend."""
    import ast

    import tfp_seg

    root = os.path.dirname(tfp_seg.__file__)
    offenders = []
    for folder, _, files in os.walk(root):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            with open(path, encoding="utf-8") as f:
                tree = ast.parse(f.read())
            for node in tree.body:  # module level only
                mods = []
                if isinstance(node, ast.Import):
                    mods = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom):
                    mods = [node.module or ""]
                if any(m == "matplotlib" or m.startswith("matplotlib.") for m in mods):
                    offenders.append(f"{os.path.relpath(path, root)}:{node.lineno}")
    assert not offenders, offenders


def test_agg_only_when_no_backend_chosen(monkeypatch):
    import matplotlib

    calls = []
    monkeypatch.setattr(matplotlib, "use", lambda name, **kw: calls.append(name))
    monkeypatch.delenv("MPLBACKEND", raising=False)
    monkeypatch.setattr(matplotlib, "get_backend", lambda auto_select=True: None)
    plots._pyplot()
    assert calls == ["Agg"]
    monkeypatch.setattr(matplotlib, "get_backend", lambda auto_select=True: "qtagg")
    plots._pyplot()
    assert calls == ["Agg"]  # a chosen backend is left alone


@pytest.mark.slow
def test_importing_tfp_seg_chooses_no_backend():
    code = (
        "import sys, matplotlib\n"
        "import tfp_seg, tfp_seg.plots, tfp_seg.reporting\n"
        "assert matplotlib.get_backend(auto_select=False) is None\n"
        "import numpy as np\n"
        "tfp_seg.plots.plot_samples_grid(np.zeros((4, 4)), samples=np.zeros((1, 4, 4), int))\n"
        "print(matplotlib.get_backend())\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().lower() == "agg"


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
        _assert_png(path)
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


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    keras.utils.set_random_seed(0)
    argv = [
        "train",
        "--epochs",
        "1",
        "--num-images",
        "24",
        "--image-size",
        "32",
        "--base-filters",
        "4",
        "--depth",
        "2",
        "--eval-samples",
        "4",
        "--rank",
        "2",
        "--num-samples",
        "4",
        "--no-export",
        "--quiet",
        "--output-dir",
        str(out),
        "--name",
        "t",
    ]
    assert cli.main(argv) == 0
    return out / "t"


def test_cli_evaluate_writes_report_markdown_and_figures(tiny_run, tmp_path, capsys):
    out = tmp_path / "eval"
    assert (
        cli.main(["evaluate", str(tiny_run), "--num-samples", "4", "--output", str(out), "--quiet"])
        == 0
    )
    report = json.loads((out / "report.json").read_text())
    assert report["num_samples"] == 4 and report["run"] == "t"
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
        _assert_png(out / "figures" / name)
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
