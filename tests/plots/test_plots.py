"""Figures (`tfp_seg.plots`): panels, legends, colour bars, PNG files, backend hygiene."""

import os
import subprocess
import sys

import numpy as np
import pytest

from tests.helpers import assert_png
from tfp_seg import metrics, plots

pytestmark = pytest.mark.usefixtures("close_figures")

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
    assert_png(path)


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
    assert_png(path)
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
    assert_png(path)
    with pytest.raises(ValueError, match="lacks"):
        plots.plot_reliability_diagram({"accuracy": data["accuracy"]})


def _history():
    return {
        "loss": [3.0, 2.5, 2.2, 2.0],
        "val_loss": [3.1, 2.7, float("nan"), 2.3],
        "val_eval_epochs": [2, 4],
        "val_ged": [0.3, 0.2],
        "val_hm_iou": [0.5, 0.6],
        "val_diversity": [0.7, 0.5],
        "member_0/loss": [1.0],  # other keys are ignored
    }


def test_training_curves_panels_data_and_reference_lines(tmp_path):
    history = _history()
    path = tmp_path / "curves.png"
    fig = plots.plot_training_curves(
        history, reference={"val_ged": 0.03, "val_diversity": 0.46}, path=path
    )
    assert [ax.get_title() for ax in fig.axes] == [
        "loss ↓",
        "validation D²_GED ↓",
        "validation HM-IoU ↑",
        "validation sample diversity",
    ]
    loss_ax, ged_ax, hm_ax, div_ax = fig.axes
    train, val = loss_ax.lines
    np.testing.assert_array_equal(train.get_xdata(), [1, 2, 3, 4])
    np.testing.assert_array_equal(train.get_ydata(), history["loss"])
    np.testing.assert_array_equal(val.get_ydata(), history["val_loss"])  # NaN: a gap
    for ax, key in ((ged_ax, "val_ged"), (hm_ax, "val_hm_iou"), (div_ax, "val_diversity")):
        np.testing.assert_array_equal(ax.lines[0].get_xdata(), [2, 4])
        np.testing.assert_array_equal(ax.lines[0].get_ydata(), history[key])
    assert [line.get_ydata()[0] for line in ged_ax.lines[1:]] == [0.03]
    assert [line.get_ydata()[0] for line in div_ax.lines[1:]] == [0.46]
    assert len(hm_ax.lines) == 1  # no reference given
    assert {ax.get_xlim() for ax in fig.axes} == {(0.5, 4.5)}  # one epoch axis
    assert div_ax.get_legend().get_texts()[1].get_text() == "oracle"
    assert_png(path)
    only_loss = plots.plot_training_curves({"loss": [1.0, 0.5]}, title="losses")
    assert len(only_loss.axes) == 1 and only_loss._suptitle.get_text() == "losses"
    only_val = {k: v for k, v in history.items() if not k.endswith("loss")}
    assert len(plots.plot_training_curves(only_val).axes) == 3


@pytest.mark.parametrize(
    "change, match",
    [
        ({"val_eval_epochs": None}, "but no `val_eval_epochs`"),
        ({"val_eval_epochs": [2, 2]}, "must be increasing epoch numbers >= 1"),
        ({"val_eval_epochs": [0, 4]}, "must be increasing epoch numbers >= 1"),
        ({"val_ged": [0.3]}, r"`history\['val_ged'\]` must have one value per entry .* \(2\)"),
        ({"val_loss": [1.0]}, r"`history\['val_loss'\]` must have one value per entry"),
        ({"loss": [[1.0, 2.0]]}, "must be a non-empty list of numbers"),
        (
            {
                "loss": None,
                "val_loss": None,
                "val_ged": None,
                "val_hm_iou": None,
                "val_diversity": None,
            },
            "nothing to plot",
        ),
    ],
)
def test_training_curves_bad_history_is_a_clear_error(change, match):
    history = _history()
    for key, value in change.items():
        if value is None:
            history.pop(key)
        else:
            history[key] = value
    with pytest.raises(ValueError, match=match):
        plots.plot_training_curves(history)


def test_training_curves_bad_reference_is_a_clear_error():
    with pytest.raises(ValueError, match="`history` must be a mapping"):
        plots.plot_training_curves([1.0, 2.0])
    with pytest.raises(ValueError, match=r"`reference` has keys \['ged'\]"):
        plots.plot_training_curves(_history(), reference={"ged": 0.1})
    with pytest.raises(ValueError, match="must be finite"):
        plots.plot_training_curves(_history(), reference={"val_ged": float("nan")})


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
