"""Validation curves of `tfp-seg train` (`tfp_seg.runs.monitor`): what the callback records, for
every head the CLI trains, in history.json and report.json, across a resume and a strategy."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from tests.helpers import assert_png, fake_lidc_entries, tiny_train_args
from tfp_seg import cli, data
from tfp_seg.distribute import backup as backup_module
from tfp_seg.evaluation import evaluate_ambiguous, evaluate_annotations
from tfp_seg.models.wrappers import DeepEnsemble
from tfp_seg.runs import monitor
from tfp_seg.runs.config import TrainConfig
from tfp_seg.runs.data import make_data
from tfp_seg.runs.model import build_model, compile_model

VAL_KEYS = ("val_ged", "val_hm_iou", "val_diversity")
ORACLE_KEYS = ("oracle_val_ged", "oracle_val_hm_iou", "oracle_val_diversity")


# ================================================================================================
# the callback, in process
# ================================================================================================


class DirectEvaluation(keras.callbacks.Callback):
    """After the monitor in the callback list: evaluates the same model at the same epochs
    with a direct call of the library's evaluation, and keeps what the monitor logged."""

    def __init__(self, sampler, images, evaluate, **kwargs):
        super().__init__()
        self.sampler, self.images, self.evaluate, self.kwargs = sampler, images, evaluate, kwargs
        self.direct, self.logged = [], []

    def on_epoch_end(self, epoch, logs=None):
        report = self.evaluate(self.sampler(), self.images, **self.kwargs)
        self.direct.append({k: report[k[4:]] for k in VAL_KEYS})
        self.logged.append({k: logs.get(k) for k in (*VAL_KEYS, monitor.EPOCH_KEY)})


def _tiny_config(**overrides):
    fields = dict(
        base_filters=4, depth=1, image_size=16, rank=2, num_samples=4, batch_size=4, epochs=2
    )
    return TrainConfig(**{**fields, **overrides}).validate()


def _fit_with_monitor(config, train, val, evaluate, **eval_kwargs):
    """Fit `config`'s model on `train` with the run's monitor (every epoch) and a direct
    evaluation after it; returns (monitor, direct callback, fit history)."""
    keras.utils.set_random_seed(0)
    model = build_model(config, train.num_classes, train.images.shape[1:])
    compile_model(model, config)
    members = model.members if config.head == "ensemble" else [model]
    mon = monitor.make_monitor(model, config, val, member=len(members) - 1)
    cap = val[: config.val_images]
    direct = DirectEvaluation(
        lambda: monitor.validation_sampler(model, config, len(members) - 1),
        cap,
        evaluate,
        num_samples=config.val_samples,
        seed=config.seed,
        batch_size=16,
        **eval_kwargs,
    )
    ds = train.to_dataset(batch_size=config.batch_size, shuffle=True, seed=0)
    for member in members[:-1]:  # a deep ensemble's earlier members: fit first, no monitor
        member.fit(ds, epochs=config.epochs, verbose=0)
    history = members[-1].fit(ds, epochs=config.epochs, verbose=0, callbacks=[mon, direct])
    return mon, direct, history.history


@pytest.mark.parametrize(
    "overrides",
    [
        dict(head="low_rank"),
        dict(head="heteroscedastic"),
        dict(head="deterministic"),
        dict(head="mixture", components=2),
        dict(head="mc_dropout"),
        dict(head="ensemble", ensemble_size=2),
        dict(model="prob_unet", latent_dim=2),
        dict(ensemble="batch", ensemble_size=2),
    ],
    ids=lambda o: "-".join(str(v) for v in o.values()),
)
def test_values_equal_a_direct_evaluate_ambiguous_call_for_every_head(shapes, overrides):
    """Every epoch (val_every=1) the logged values are those of `evaluate_ambiguous` on the
    same model (the growing ensemble for a deep ensemble), images, samples and seed."""
    config = _tiny_config(val_every=1, val_images=3, val_samples=4, **overrides)
    mon, direct, history = _fit_with_monitor(config, shapes, shapes[5:], evaluate_ambiguous)
    assert [d[monitor.EPOCH_KEY] for d in direct.logged] == [1, 2]
    for logged, expected in zip(direct.logged, direct.direct, strict=True):
        for key in VAL_KEYS:
            assert np.isfinite(expected[key])
            assert logged[key] == pytest.approx(expected[key], rel=1e-6, abs=1e-9), key
    record = monitor.history_record(history)
    assert record["val_eval_epochs"] == [1, 2] and len(record["val_ged"]) == 2
    assert sorted(mon.reference) == sorted(ORACLE_KEYS)
    assert mon.reference["oracle_val_diversity"] > 0 and mon.seconds > 0
    assert len(mon.data) == 3  # the cap: the first val_images validation images
    np.testing.assert_array_equal(mon.data.images, shapes[5:8].images)


def test_users_data_use_evaluate_annotations_and_the_raters_diversity(rng):
    entries = fake_lidc_entries(rng, n=8, size=16, k=3, series=tuple("abcdefgh"))
    images = np.stack([e["image"] for e in entries.values()])[..., None]
    masks = np.stack([np.stack(e["masks"]) for e in entries.values()])
    annotated = data.AnnotatedImages(images, masks, ids=tuple(entries))
    config = _tiny_config(val_every=2, epochs=3, val_samples=4)
    mon, direct, history = _fit_with_monitor(
        config, annotated[:5], annotated[5:], evaluate_annotations, sample_counts=()
    )
    assert [d[monitor.EPOCH_KEY] for d in direct.logged] == [None, 2, 3]  # every 2nd + last
    for logged, expected in zip(direct.logged[1:], direct.direct[1:], strict=True):
        for key in VAL_KEYS:
            assert logged[key] == pytest.approx(expected[key], rel=1e-6, abs=1e-9), key
    assert list(mon.reference) == ["val_reference_diversity"]
    record = monitor.history_record(history)
    assert record["val_eval_epochs"] == [2, 3] and len(record["loss"]) == 3


def test_the_monitor_does_not_change_training(shapes):
    """Evaluating with a fixed seed draws no stateful noise: the same losses with it or not."""
    losses = []
    for val_every in (1, 0):
        config = _tiny_config(val_every=val_every, epochs=2)
        keras.utils.set_random_seed(0)
        model = build_model(config, shapes.num_classes, shapes.images.shape[1:])
        compile_model(model, config)
        mon = monitor.make_monitor(model, config, shapes[5:])
        assert (mon is None) == (val_every == 0)
        ds = shapes[:5].to_dataset(batch_size=4, shuffle=True, seed=0)
        losses.append(model.fit(ds, epochs=2, verbose=0, callbacks=[mon] if mon else []))
    assert "val_ged" in losses[0].history and "val_ged" not in losses[1].history
    np.testing.assert_array_equal(losses[0].history["loss"], losses[1].history["loss"])


def test_no_monitor_on_a_non_chief_worker_or_without_validation_images(shapes, monkeypatch):
    config = _tiny_config(val_every=1)
    model = build_model(config, shapes.num_classes, shapes.images.shape[1:])
    assert monitor.make_monitor(model, config, shapes) is not None
    logged = []
    assert monitor.make_monitor(model, config, shapes[:0], log=logged.append) is None
    assert logged == ["no validation images: no validation curves"]
    monkeypatch.setattr(monitor.distribute, "is_chief", lambda strategy=None: False)
    assert monitor.make_monitor(model, config, shapes) is None


def test_history_record_and_report_facts():
    logs = {"loss": [3.0, 2.0, 1.0], "val_ged": [0.5, 0.4], monitor.EPOCH_KEY: [2.0, 3.0]}
    record = monitor.history_record(logs)
    assert record["val_eval_epochs"] == [2, 3] and monitor.EPOCH_KEY not in record
    record.update(oracle_val_ged=0.01)
    assert monitor.report_facts(record) == {
        "val_ged": 0.4,
        "val_eval_epoch": 3,
        "oracle_val_ged": 0.01,
    }
    assert monitor.report_facts({"loss": [1.0]}) == {}
    with pytest.raises(ValueError, match="validation curves of different lengths"):
        monitor.history_record({"val_ged": [0.5], monitor.EPOCH_KEY: [1, 2]})


@pytest.mark.parametrize(
    "fields, match",
    [
        (dict(val_every=-1), "`val_every` must be an int >= 0; got -1"),
        (dict(val_samples=1), "`val_samples` must be an int >= 2; got 1"),
        (dict(val_images=0), "`val_images` must be a positive int; got 0"),
        (
            dict(ensemble="batch", ensemble_size=4, val_samples=6),
            "`val_samples` (6) must be a multiple of `ensemble_size` (4)",
        ),
    ],
)
def test_bad_validation_fields_are_clear_errors(fields, match):
    with pytest.raises(ValueError, match=match.replace("(", r"\(").replace(")", r"\)")):
        TrainConfig(**fields).validate()
    assert TrainConfig(val_every=0, ensemble="batch", ensemble_size=4, val_samples=6).validate()


# ================================================================================================
# tfp-seg train: history.json, report.json, report.md, figures/curves.png
# ================================================================================================


def _train(tmp_path, name, **overrides):
    flags = tiny_train_args(**{"image_size": 16, "depth": 1, **overrides})
    return cli.main(["train", *flags, "--output-dir", str(tmp_path), "--name", name])


def _json(path):
    return json.loads(path.read_text())


@pytest.mark.parametrize("val_every, evaluated", [(1, [1, 2, 3]), (2, [2, 3])])
def test_history_report_and_figure_of_a_run(tmp_path, val_every, evaluated):
    assert _train(tmp_path, "r", epochs=3, val_every=val_every) == 0
    run = tmp_path / "r"
    history, report = _json(run / "history.json"), _json(run / "report.json")
    assert len(history["loss"]) == len(history["val_loss"]) == 3
    assert history["val_eval_epochs"] == evaluated
    for key in VAL_KEYS:
        assert len(history[key]) == len(evaluated) and np.all(np.isfinite(history[key])), key
        assert report[key] == history[key][-1], key
    for key in ORACLE_KEYS:
        assert report[key] == history[key] and np.isfinite(history[key]), key
    assert report["val_eval_epoch"] == 3 and report["val_seconds"] > 0
    # The last point is the saved model's validation score (same images, samples and seed).
    config = TrainConfig(**_json(run / "config.json"))
    val = make_data(config, str(run))[1][: config.val_images]
    model = keras.models.load_model(run / "model.keras", safe_mode=True)
    direct = evaluate_ambiguous(model, val, num_samples=config.val_samples, seed=config.seed)
    for key in VAL_KEYS:
        assert report[key] == pytest.approx(direct[key[4:]], rel=1e-5, abs=1e-7), key
    assert report["oracle_val_diversity"] == pytest.approx(direct["oracle_diversity"], rel=1e-9)
    assert_png(run / "figures" / "curves.png")
    md = (run / "report.md").read_text()
    assert "](figures/curves.png)" in md
    assert f"(`val_ged`) | {report['val_ged']:.4f} | {report['oracle_val_ged']:.4f} |" in md


def test_val_every_0_records_no_curves(tmp_path):
    assert _train(tmp_path, "off", val_every=0) == 0
    run = tmp_path / "off"
    history, report = _json(run / "history.json"), _json(run / "report.json")
    # the losses and the cosine schedule's learning rate per epoch (the default schedule)
    assert sorted(history) == ["learning_rate", "loss", "val_loss"]
    assert not [k for k in report if k.startswith(("val_", "oracle_val_"))]
    assert_png(run / "figures" / "curves.png")  # the losses alone
    assert "val_ged" not in (run / "report.md").read_text()


def test_the_default_run_evaluates_its_last_epoch(tiny_run):
    """TINY_TRAIN's 2 epochs with the default val_every: the last epoch is always scored."""
    history = _json(tiny_run / "history.json")
    assert TrainConfig().val_every > 2 and history["val_eval_epochs"] == [2]
    assert len(history["val_ged"]) == 1 and len(history["loss"]) == 2


def test_deep_ensemble_records_the_growing_ensemble(tmp_path):
    flags = dict(head="ensemble", ensemble_size=2, val_every=1, val_samples=4, num_images=24)
    assert _train(tmp_path, "ens", **flags) == 0
    run = tmp_path / "ens"
    history = _json(run / "history.json")
    for i in (0, 1):
        assert history[f"member_{i}/val_eval_epochs"] == [1, 2]
    for key in VAL_KEYS:  # the top-level curves are the last member's: the whole ensemble's
        assert history[key] == history[f"member_1/{key}"], key
    config = TrainConfig(**_json(run / "config.json"))
    val = make_data(config, str(run))[1]
    members = DeepEnsemble.load(str(run / "ensemble")).members
    for i in (0, 1):  # member i's last point: the ensemble of members 0..i after training
        direct = evaluate_ambiguous(DeepEnsemble(members[: i + 1]), val, num_samples=4, seed=0)
        for key in VAL_KEYS:
            assert history[f"member_{i}/{key}"][-1] == pytest.approx(
                direct[key[4:]], rel=1e-5, abs=1e-7
            ), (i, key)


def test_resume_keeps_the_curves_consistent(tmp_path, monkeypatch):
    """Interrupted after epoch 2's backup, resumed: the restored epochs' values are the ones
    the first process recorded, the curves cover epochs 1..3 once each."""
    saves = []
    original = backup_module.BackupAndRestore._save_model

    def save_then_interrupt(self):
        original(self)
        saves.append(self._current_epoch)
        if len(saves) == 2:
            from tfp_seg import _interrupt

            _interrupt.request()  # InterruptGuard raises at epoch 3's first batch

    flags = dict(epochs=3, val_every=1, resume=True)
    monkeypatch.setattr(backup_module.BackupAndRestore, "_save_model", save_then_interrupt)
    assert _train(tmp_path, "res", **flags) == 130
    state = _json(tmp_path / "res" / "backup" / "training_metadata.json")
    assert state["epoch"] == 2 and state["history"][monitor.EPOCH_KEY] == [1.0, 2.0]
    monkeypatch.setattr(backup_module.BackupAndRestore, "_save_model", original)
    assert _train(tmp_path, "res", **flags) == 0
    history = _json(tmp_path / "res" / "history.json")
    assert history["val_eval_epochs"] == [1, 2, 3] and len(history["loss"]) == 3
    for key in VAL_KEYS:
        assert history[key][:2] == state["history"][key], key
        assert len(history[key]) == 3 and np.isfinite(history[key][2])
    assert not (tmp_path / "res" / "backup").exists()


_MIRRORED_TRAIN = """
import sys
import tfp_seg
tfp_seg.distribute.logical_cpus(2)
from tfp_seg.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_curves_under_a_mirrored_strategy(tmp_path):
    """Two replicas on logical CPUs: the callback samples the mirrored model outside the
    replica context, as the final evaluation does."""
    argv = [
        "train",
        *tiny_train_args(epochs=2, val_every=1, strategy="mirrored"),
        "--output-dir",
        str(tmp_path),
        "--name",
        "m",
    ]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run(
        [sys.executable, "-c", _MIRRORED_TRAIN, *argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 replica(s)" in proc.stdout
    history = _json(tmp_path / "m" / "history.json")
    assert history["val_eval_epochs"] == [1, 2]
    assert all(np.all(np.isfinite(history[key])) for key in VAL_KEYS)
