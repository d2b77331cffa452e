import json
import math
import re

import numpy as np
import pytest

from tests.helpers import tiny_train_args
from tfp_seg import cli
from tfp_seg.runs import TrainConfig, stored_config
from tfp_seg.runs.train import cosine_schedule


def test_cosine_schedule_values():
    rate = cosine_schedule(1e-3, 4).schedule
    got = [rate(e) for e in range(4)]
    expected = [1e-3 * 0.5 * (1 + math.cos(math.pi * e / 4)) for e in range(4)]
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    assert got[0] == 1e-3 and got[2] == pytest.approx(5e-4)
    assert all(a > b > 0 for a, b in zip(got, got[1:], strict=False))


def test_a_run_with_the_cosine_schedule_records_its_rates(tmp_path):
    argv = ["train", *tiny_train_args(epochs=2, lr_schedule="cosine", learning_rate=2e-3)]
    assert cli.main([*argv, "--val-every", "0", "--output-dir", str(tmp_path), "--name", "r"]) == 0
    history = json.loads((tmp_path / "r" / "history.json").read_text())
    np.testing.assert_allclose(history["learning_rate"], [2e-3, 1e-3], rtol=1e-6)
    config = json.loads((tmp_path / "r" / "config.json").read_text())
    assert config["lr_schedule"] == "cosine"


def test_a_prob_unet_run_trains_at_its_own_default_rate(tmp_path):
    argv = ["train", *tiny_train_args(epochs=2, model="prob_unet", latent_dim=2)]
    assert cli.main([*argv, "--val-every", "0", "--output-dir", str(tmp_path), "--name", "p"]) == 0
    history = json.loads((tmp_path / "p" / "history.json").read_text())
    np.testing.assert_allclose(history["learning_rate"], [1e-3, 1e-3], rtol=1e-6)
    config = json.loads((tmp_path / "p" / "config.json").read_text())
    assert (config["learning_rate"], config["lr_schedule"]) == (1e-3, "constant")


def test_a_hierarchical_prob_unet_run_trains_evaluates_and_reloads(tmp_path):
    argv = ["train", *tiny_train_args(epochs=2, model="hprob_unet", latent_levels=2)]
    assert cli.main([*argv, "--val-every", "1", "--output-dir", str(tmp_path), "--name", "h"]) == 0
    config = json.loads((tmp_path / "h" / "config.json").read_text())
    assert (config["model"], config["latent_dim"], config["latent_levels"]) == ("hprob_unet", 1, 2)
    assert (config["learning_rate"], config["lr_schedule"]) == (1e-3, "constant")
    report = json.loads((tmp_path / "h" / "report.json").read_text())
    assert np.isfinite(report["ged"]) and 0 <= report["hm_iou"] <= 1
    history = json.loads((tmp_path / "h" / "history.json").read_text())
    assert len(history["val_ged"]) == 2 and len(history["kl"]) == 2
    import keras  # noqa: PLC0415

    from tfp_seg.models import HierarchicalProbabilisticUNet  # noqa: PLC0415

    model = keras.saving.load_model(str(tmp_path / "h" / "model.keras"))
    assert isinstance(model, HierarchicalProbabilisticUNet) and model.latent_levels == 2


def test_hierarchical_prob_unet_defaults_and_errors():
    config = TrainConfig(model="hprob_unet").validate()
    assert (config.latent_dim, config.latent_levels, config.annotations) == (1, 3, "random")
    assert (config.learning_rate, config.lr_schedule) == (1e-3, "constant")
    assert TrainConfig(model="prob_unet").latent_dim == 6 and TrainConfig().latent_dim == 6
    cases = [
        (dict(image_size=40), "divisible by 2**(depth + 1) (16)"),
        (dict(latent_levels=6), "`latent_levels` (6) must be at most depth + 2 (5)"),
        (dict(head="mixture"), "does not apply to `model` hprob_unet"),
    ]
    for fields, message in cases:
        with pytest.raises(ValueError, match=re.escape(message)):
            TrainConfig(model="hprob_unet", **fields).validate()


def test_a_bad_schedule_is_named(tmp_path, capsys):
    argv = ["train", *tiny_train_args(lr_schedule="step"), "--output-dir", str(tmp_path)]
    assert cli.main(argv) == 1
    assert "`lr_schedule` must be one of ('constant', 'cosine')" in capsys.readouterr().err


def test_default_schedule_and_stored_configs_of_earlier_versions(tmp_path):
    # The default job trains with cosine decay from 3e-3 (benchmarks/README.md, issue 18);
    # a run folder of an earlier version, whose config.json has no `lr_schedule`, ran with a
    # constant rate and resumes that way.
    config = TrainConfig()
    assert (config.learning_rate, config.lr_schedule) == (3e-3, "cosine")
    (tmp_path / "config.json").write_text(json.dumps({"learning_rate": 1e-3, "epochs": 12}))
    stored = stored_config(str(tmp_path))
    assert (stored.learning_rate, stored.lr_schedule, stored.epochs) == (1e-3, "constant", 12)
    (tmp_path / "config.json").write_text(json.dumps({"lr_schedule": "cosine"}))
    assert stored_config(str(tmp_path)).lr_schedule == "cosine"
    # The Probabilistic U-Net's default is a constant 1e-3 (three benchmark seeds,
    # benchmarks/README.md); a stored Prob U-Net run resumes with the rate it stored.
    prob = TrainConfig(model="prob_unet")
    assert (prob.learning_rate, prob.lr_schedule) == (1e-3, "constant")
    assert TrainConfig(model="prob_unet", learning_rate=3e-3).lr_schedule == "constant"
    assert TrainConfig(model="prob_unet", lr_schedule="cosine").learning_rate == 1e-3
    stored_prob = {"model": "prob_unet", "learning_rate": 3e-3, "lr_schedule": "cosine"}
    (tmp_path / "config.json").write_text(json.dumps(stored_prob))
    resumed = stored_config(str(tmp_path))
    assert (resumed.learning_rate, resumed.lr_schedule) == (3e-3, "cosine")
    # ... and its SSN head started from glorot's factor and D = 1 (the head's small start is
    # the default since: "auto"; benchmarks/README.md, "Model quality").
    assert (config.factor_init_scale, config.initial_diagonal) == ("auto", "auto")
    assert (stored.factor_init_scale, stored.initial_diagonal) == (1.0, None)


@pytest.mark.parametrize("head", ["low_rank", "mixture"])
def test_the_covariance_start_reaches_the_head(head):
    from tfp_seg.runs.model import build_model

    config = TrainConfig(head=head, factor_init_scale=0.05, initial_diagonal=0.02).validate()
    model = build_model(config, 3)
    assert (model.head.factor_init_scale, model.head.initial_diagonal) == (0.05, 0.02)
    auto = build_model(TrainConfig(head=head).validate(), 3).head
    expected = (0.1, 0.018) if head == "low_rank" else (1.0, None)
    assert (auto.factor_init_scale, auto.initial_diagonal) == expected
    flags = cli.build_parser().parse_args(
        ["train", "--factor-init-scale", "0.05", "--initial-diagonal", "0.02"]
    )
    assert (flags.factor_init_scale, flags.initial_diagonal) == (0.05, 0.02)


@pytest.mark.parametrize("head", ["low_rank", "heteroscedastic", "mixture", "deterministic"])
def test_head_kernel_size_reaches_the_head(head):
    from tfp_seg.runs.model import build_model

    model = build_model(TrainConfig(head=head, head_kernel_size=3).validate(), 3)
    assert model.head.kernel_size == 3
    model(np.zeros((1, 16, 16, 1), np.float32))
    assert model.head.projection.kernel.shape[:2] == (3, 3)
    assert build_model(TrainConfig(head=head).validate(), 3).head.kernel_size == 1
    flags = cli.build_parser().parse_args(["train", "--head-kernel-size", "3"])
    assert flags.head_kernel_size == 3


def test_a_bad_head_kernel_size_is_named():
    with pytest.raises(ValueError, match="`head_kernel_size` must be a positive int"):
        TrainConfig(head_kernel_size=0).validate()
    with pytest.raises(ValueError, match="`head_kernel_size` applies to `model` segmenter"):
        TrainConfig(model="prob_unet", head_kernel_size=3).validate()


def test_initial_diagonal_none_from_the_command_line(tmp_path):
    # `--initial-diagonal none` is the start of earlier versions (raw diagonal bias 0), not
    # "flag not given".
    argv = ["train", *tiny_train_args(epochs=1), "--initial-diagonal", "none"]
    argv += ["--factor-init-scale", "1", "--val-every", "0", "--output-dir", str(tmp_path)]
    assert cli.main([*argv, "--name", "r", "--no-export"]) == 0
    config = json.loads((tmp_path / "r" / "config.json").read_text())
    assert (config["factor_init_scale"], config["initial_diagonal"]) == (1.0, None)


@pytest.mark.parametrize(
    "flag, value, match",
    [
        ("factor_init_scale", -1, "`factor_init_scale` must be a finite float >= 0"),
        ("initial_diagonal", 0, "`initial_diagonal` must be None or a finite variance"),
    ],
)
def test_a_bad_covariance_start_is_named(tmp_path, capsys, flag, value, match):
    argv = ["train", *tiny_train_args(**{flag: value}), "--output-dir", str(tmp_path)]
    assert cli.main(argv) == 1
    assert match in capsys.readouterr().err


def test_mean_warmup_epochs_switch_the_loss_in_a_run_and_are_checked(tmp_path, capsys, monkeypatch):
    """`--mean-warmup-epochs 1` of 2: the run's loss carries the switch and its MeanWarmup
    callback turns it on for epoch 0 only; the stored config records the field."""
    from tfp_seg import losses

    seen = []

    class Recording(losses.MeanWarmup):
        def on_epoch_end(self, epoch, logs=None):
            seen.append([float(s.numpy()) for s in self._switches])

    monkeypatch.setattr(losses, "MeanWarmup", Recording)
    argv = ["train", *tiny_train_args(), "--mean-warmup-epochs", "1", "--val-every", "0"]
    assert cli.main([*argv, "--output-dir", str(tmp_path), "--name", "w"]) == 0
    assert seen == [[1.0], [0.0]]
    config = json.loads((tmp_path / "w" / "config.json").read_text())
    assert config["mean_warmup_epochs"] == 1
    from tfp_seg.runs.model import build_model, compile_model

    run = TrainConfig(mean_warmup_epochs=3).validate()
    model = build_model(run, 2)
    compile_model(model, run)
    assert model.loss.mean_warmup is True and float(model.loss.mean_only.numpy()) == 0.0
    assert TrainConfig().mean_warmup_epochs == 0  # the default run: no switch in its loss
    for bad, message in (
        ({"mean_warmup_epochs": -1}, "`mean_warmup_epochs` must be an int >= 0; got -1"),
        ({"mean_warmup_epochs": 2, "head": "mixture"}, "`mean_warmup_epochs` applies to the SSN"),
        ({"mean_warmup_epochs": 36}, r"`mean_warmup_epochs` \(36\) must be less than `epochs`"),
    ):
        with pytest.raises(ValueError, match=message):
            TrainConfig(**bad).validate()


def test_mean_weight_reaches_the_ssn_loss_and_is_checked(tmp_path, capsys):
    from tfp_seg.runs.model import build_model, compile_model

    config = TrainConfig(mean_weight=0.5, marginal_weight=2.0).validate()
    model = build_model(config, 3)
    compile_model(model, config)
    assert (model.loss.mean_weight, model.loss.marginal_weight) == (0.5, 2.0)
    rng = np.random.default_rng(0)
    x = rng.random((2, 16, 16, 1), dtype=np.float32)
    loss = model.train_on_batch(x, rng.integers(0, 3, size=(2, 4, 16, 16)))  # a compiled step
    assert np.isfinite(loss)
    assert TrainConfig().mean_weight == 0.0  # the default loss is the SSN loss as it was
    for bad, message in (
        ({"mean_weight": -1.0}, "`mean_weight` must be a float >= 0; got -1.0"),
        ({"marginal_weight": True}, "`marginal_weight` must be a float >= 0; got True"),
        ({"mean_weight": 1.0, "head": "mixture"}, "`mean_weight` applies to the SSN loss only"),
    ):
        with pytest.raises(ValueError, match=message):
            TrainConfig(**bad).validate()
    argv = ["train", *tiny_train_args(head="heteroscedastic"), "--mean-weight", "1"]
    assert cli.main([*argv, "--output-dir", str(tmp_path)]) == 1
    assert "`mean_weight` applies to the SSN loss only" in capsys.readouterr().err
