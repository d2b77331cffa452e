"""The on-demand benchmarks still run: each script's `main` on a tiny configuration.

Timings are not checked (performance is measured by running the scripts, not in tests); the
reports must be complete, with positive times and ratios against the script's reference row.
Peak memory is measured in child processes (`benchmarks/_common.py`), so these also check
that the measurement runs (with or without oneDNN in this process).
"""

import json
import os
import sys

import numpy as np
import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


@pytest.fixture(scope="module")
def bench_path():
    sys.path.insert(0, BENCH)
    yield
    sys.path.remove(BENCH)


def _load(path):
    with open(path) as f:
        return json.load(f)


def test_bench_inference_runs(bench_path, tmp_path):
    import bench_inference

    out = str(tmp_path / "inference.json")
    bench_inference.main(
        [
            out,
            "--size",
            "16",
            "--batch",
            "1",
            "--base-filters",
            "4",
            "--depth",
            "1",
            "--rank",
            "2",
            "--samples",
            "1",
            "4",
            "--repeats",
            "1",
            "--warmup",
            "0",
        ]
    )
    rows = _load(out)["results"]
    outputs = {(r["model"], r["output"], r["N"]) for r in rows}
    for model in ("ssn", "heteroscedastic"):
        for output in ("label maps", "argmax of logits", "proba"):
            assert (model, output, 4) in outputs
    assert ("deterministic", "forward", None) in outputs
    assert all(r["ms"] > 0 and r["ratio"] > 0 for r in rows)


def test_bench_inference_user_calls_runs(bench_path, tmp_path):
    import bench_inference

    out = str(tmp_path / "inference_user.json")
    bench_inference.main(
        [out, "--user-calls", "--configs", "4,1,2", "4,1,3", "--size", "16", "--batch", "1"]
        + ["--rank", "2", "--samples", "4", "--repeats", "1", "--warmup", "0"]
    )
    rows = _load(out)["results"]
    for config in ("4,1,2", "4,1,3"):
        outputs = {r["output"] for r in rows if r["U-Net, C"] == config}
        assert {"model.sample", "model.predict_proba", "baseline: compiled forward"} <= outputs
        assert any(o.startswith("floor sample") for o in outputs)
        assert any(o.startswith("floor proba") for o in outputs)
    assert all(r["ms"] > 0 and r["ratio"] > 0 for r in rows)


# The two scripts below measure peak memory in a fresh child process per variant (~20 children
# of a few seconds each): over the marker's 20 s, so in the slow suite, which CI runs with
# oneDNN off.
@pytest.mark.slow
@pytest.mark.parametrize("head", ["low_rank", "heteroscedastic"])
def test_bench_loss_memory_runs(bench_path, tmp_path, head):
    import bench_loss_memory

    out = str(tmp_path / "loss.json")
    bench_loss_memory.main(
        [
            out,
            "--head",
            head,
            "--size",
            "8",
            "--batch",
            "1",
            "--rank",
            "2",
            "--samples",
            "2",
            "10",
            "--ranks",
            "1",
            "2",
            "--rank-samples",
            "4",
            "--chunk-sizes",
            "2",
            "--repeats",
            "1",
            "--warmup",
            "0",
        ]
    )
    report = _load(out)
    variants = {r["variant"] for r in report["m_sweep"]}
    reference = "direct" if head == "heteroscedastic" else "fused"
    assert {reference, "chunked K=2"} <= variants
    assert (report["r_sweep"] == []) == (head == "heteroscedastic")
    for r in report["m_sweep"]:
        assert r["ms"] > 0 and r["peak_mib"] >= 0
        if r["M"] == 10:
            assert r["ms_vs_fused"] > 0


@pytest.mark.slow
def test_bench_heads_runs(bench_path, tmp_path):
    import bench_heads

    out = str(tmp_path / "heads.json")
    bench_heads.main(
        [
            out,
            "--sizes",
            "16",
            "--batch",
            "1",
            "--base-filters",
            "4",
            "--depth",
            "1",
            "--rank",
            "2",
            "--num-samples",
            "2",
            "--chunk-size",
            "2",
            "--repeats",
            "1",
            "--warmup",
            "0",
        ]
    )
    rows = _load(out)["results"]
    assert {r["head"] for r in rows} == {
        "deterministic",
        "ssn",
        "ssn_chunked",
        "heteroscedastic",
        "prob_unet",
    }
    assert all(r["step_ms"] > 0 and r["time_ratio"] > 0 for r in rows)
    # Peaks come from child processes (peak RSS), with or without oneDNN here; at 16x16 a step
    # may make nothing new resident: no ratio, no error.
    assert all(r["peak_mib"] >= 0 for r in rows)
    assert all(r["memory_ratio"] is None or r["memory_ratio"] > 0 for r in rows)


def test_bench_sampling_ops_runs(bench_path, tmp_path):
    import bench_sampling_ops

    out = str(tmp_path / "ops.json")
    bench_sampling_ops.main(
        [
            out,
            "--samples",
            "4",
            "--batch",
            "1",
            "--size",
            "8",
            "--rank",
            "2",
            "--repeats",
            "1",
            "--warmup",
            "0",
        ]
    )
    rows = _load(out)["results"]
    groups = {r["group"] for r in rows}
    assert len(groups) == 7
    assert any(g.startswith("index select") for g in groups)
    assert all(r["ms"] > 0 and r["ratio"] > 0 for r in rows)


def test_bench_ensembles_runs(bench_path, tmp_path):
    import bench_ensembles

    out = str(tmp_path / "ensembles.json")
    bench_ensembles.main(
        [out, "--size", "16", "--batch", "1", "--base-filters", "4", "--depth", "1"]
        + ["--members", "2", "--repeats", "1", "--warmup", "0"]
    )
    rows = {r["model"]: r for r in _load(out)["results"]}
    assert set(rows) == set(bench_ensembles.VARIANTS)
    assert rows["deep_ensemble"]["params_ratio"] == 1.0
    assert all(
        r["params"] > 0 and r["step_ms"] > 0 and r["sample_ratio"] > 0 for r in rows.values()
    )
    # a BatchEnsemble shares its kernels: fewer parameters than M separate networks
    assert rows["batch"]["params"] < rows["deep_ensemble"]["params"]


# Two memory children (TensorFlow imported in each): over 5 s, so in the slow suite.
@pytest.mark.slow
def test_bench_evaluation_memory_runs(bench_path, tmp_path):
    import bench_evaluation_memory

    out = str(tmp_path / "evaluation_memory.json")
    bench_evaluation_memory.main(
        [out, "--images", "3", "5", "--size", "16", "--samples", "4", "--batch", "2"]
        + ["--source", "stream"]
    )
    report = _load(out)
    rows = report["results"]
    assert [r["images"] for r in rows] == [3, 5]
    assert all(r["peak_mib"] >= 0 and r["seconds"] > 0 for r in rows)
    assert rows[0]["peak_vs_first"] in (1.0, None) and report["batch_logits_mib"] > 0


# One tiny `tfp-seg train` child (TensorFlow imported in it): over 5 s, so in the slow suite.
@pytest.mark.slow
def test_study_quality_runs_and_resumes(bench_path, tmp_path, capsys):
    import study_quality

    out = str(tmp_path / "quality.jsonl")
    tiny = "--epochs 1 --num-images 40 --image-size 32 --base-filters 4 --depth 2 --rank 2"
    tiny += " --num-samples 4 --eval-samples 4 --val-every 0"
    args = ["--variants", "base", "--extra", tiny, "--out", out]
    assert study_quality.main(args) == 0
    with open(out) as f:
        rows = [json.loads(line) for line in f]
    assert len(rows) == 1 and rows[0]["variant"] == "base" and rows[0]["seed"] == 0
    # the base's flags come first, the extra ones after them (argparse: the last one wins)
    assert rows[0]["flags"][:4] == study_quality.BASE and rows[0]["flags"][-1] == "0"
    metrics = rows[0]["metrics"]
    assert 0 <= metrics["hm_iou"] <= 1 and 0 <= metrics["diversity"] <= 1
    assert metrics["train_seconds"] > 0 and metrics["oracle_hm_iou"] > 0
    assert "| base | 0 |" in capsys.readouterr().out
    # a variant and seed already in the file is not run again
    assert study_quality.main(args) == 0
    with open(out) as f:
        assert len(f.readlines()) == 1


def test_study_quality_variants_are_valid_train_configs(bench_path):
    """Every variant's flags parse as `tfp-seg train` flags into a validated TrainConfig that
    carries them (a misspelt flag or value would only fail minutes into a study)."""
    import study_quality

    from tfp_seg import cli

    parser = cli.build_parser()
    for name in study_quality.VARIANTS:
        flags = study_quality.variant_flags(name)
        config = cli._train_config(parser.parse_args(["train", *flags]))
        # argparse: a flag given twice (the base's, then the variant's) takes the last value
        for flag, value in dict(zip(flags[::2], flags[1::2], strict=True)).items():
            field = flag[2:].replace("-", "_")
            got = getattr(config, field)
            if value == "none":
                want = None
            elif isinstance(got, bool):
                want = value == "true"
            else:
                want = type(got)(value)
            assert got == want, (name, flag, got, value)


# --- bench_vs_peer.py: the official PyTorch SSN side by side -------------------------------------
# CI has no torch: these tests need none. The "missing peer" paths exit before TensorFlow loads.
@pytest.mark.parametrize(
    "extra, named",
    [
        ([], "no --peer-repo given"),
        (["--peer-repo", "/nonexistent/ssn"], "--peer-repo /nonexistent/ssn: no such file"),
        (["--peer-repo", "{empty}"], "has no ssn/models/stochastic_deepmedic.py"),
        (["--peer-repo", "{peer}"], "no --peer-python given"),
        (["--peer-repo", "{peer}", "--peer-python", "/nonexistent/python"], "cannot run it"),
    ],
)
def test_bench_vs_peer_says_what_is_missing(bench_path, tmp_path, capsys, extra, named):
    import bench_vs_peer

    _fake_peer_checkout(tmp_path / "peer")
    (tmp_path / "empty").mkdir()
    extra = [a.format(peer=tmp_path / "peer", empty=tmp_path / "empty") for a in extra]
    with pytest.raises(SystemExit) as exc:
        bench_vs_peer.main([str(tmp_path / "out.json"), "--shapes", "1,2,2,8x8", *extra])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    # what is missing, and how to get both parts (or run our side alone)
    assert named in err and "torch==2.13.0" in err and "--ours-only" in err
    assert "stochastic_segmentation_networks" in err
    assert not (tmp_path / "out.json").exists()


def _fake_peer_checkout(root):
    """A stand-in peer tree: the three files bench_vs_peer.py takes (contents are markers)."""
    import bench_vs_peer

    for source in bench_vs_peer.PEER_FILES.values():
        path = root / source
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"# {source}\n")
    return root


def test_bench_vs_peer_takes_the_files_from_a_checkout_or_a_git_directory(bench_path, tmp_path):
    import subprocess

    import bench_vs_peer

    checkout = _fake_peer_checkout(tmp_path / "checkout")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "init.defaultBranch=main"]
    subprocess.run([*git, "init", "-q", str(checkout)], check=True)
    subprocess.run([*git, "-C", str(checkout), "add", "."], check=True)
    subprocess.run([*git, "-C", str(checkout), "commit", "-qm", "peer"], check=True)
    bare = tmp_path / "bare.git"
    subprocess.run(["git", "clone", "-q", "--bare", str(checkout), str(bare)], check=True)
    empty_tree = tmp_path / "clone"  # a repository whose work tree lacks the files: .git read
    subprocess.run(["git", "clone", "-q", "--no-checkout", str(checkout), str(empty_tree)])
    for i, repo in enumerate([checkout, bare, empty_tree]):
        dest = bench_vs_peer.extract_peer(str(repo), str(tmp_path / f"out{i}"))
        for target, source in bench_vs_peer.PEER_FILES.items():
            with open(os.path.join(dest, target)) as f:
                assert f.read() == f"# {source}\n"
        # the network stand-in and the two packages the peer's imports need
        for target in ("models/deepmedic.py", "models/__init__.py", "trainer/__init__.py"):
            assert os.path.isfile(os.path.join(dest, target))


def test_bench_vs_peer_maps_the_peer_parameterisation_exactly(bench_path):
    """The same head outputs and noise give the same logit samples in both layouts: the
    peer's (event flattened (c, h, w), factor channel r * C + c, cov_factor [B, C*H*W, R],
    as in its StochasticDeepMedic.forward) and tfp_seg's packed params."""
    import bench_vs_peer
    import numpy as np

    rng = np.random.default_rng(0)
    b, c, r, h, w, n = 2, 3, 4, 5, 6, 7
    mean, log_diag = rng.normal(size=(2, b, c, h, w))
    factor = rng.normal(size=(b, c * r, h, w))
    eps_w, eps_d = rng.normal(size=(n, b, r)), rng.normal(size=(n, b, c * h * w))
    # the peer: view (B, R, C, HW) -> flatten(2, 3) -> transpose(1, 2): [B, C*H*W, R]
    cov_factor = factor.reshape(b, r, c, h * w).reshape(b, r, c * h * w).transpose(0, 2, 1)
    cov_diag = np.exp(log_diag.reshape(b, -1)) + 2e-5
    peer = mean.reshape(b, -1) + np.einsum("bir,nbr->nbi", cov_factor, eps_w)
    peer = peer + np.sqrt(cov_diag) * eps_d  # [N, B, C*H*W]
    # tfp_seg: params [B, H, W, C (2 + R)] = [mu | raw | P (C, R) row-major]
    params = bench_vs_peer.to_ours_params(mean, log_diag, factor, rank=r)
    assert params.shape == (b, h, w, c * (2 + r))
    z, eps = bench_vs_peer.to_ours_noise(eps_w, eps_d, h, w)
    mu, raw = params[..., :c], params[..., c : 2 * c]
    p = params[..., 2 * c :].reshape(b, h, w, c, r)
    ours = mu + np.einsum("bhwcr,nbr->nbhwc", p, z) + np.sqrt(np.exp(raw) + 2e-5) * eps
    np.testing.assert_allclose(ours.transpose(0, 1, 4, 2, 3).reshape(n, b, -1), peer, rtol=1e-12)
    # the gradient's way back is the inverse permutation
    back = bench_vs_peer.to_peer_layout(params, c, r)
    for got, want in zip(back, (mean, log_diag, factor), strict=True):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("text", ["8,2,20", "8,2,20,0x4", "8,2,21,16", "8,1,20,16", "a,2,2,4"])
def test_bench_vs_peer_rejects_bad_shapes(bench_path, text):
    import argparse

    import bench_vs_peer

    with pytest.raises(argparse.ArgumentTypeError, match="B,C,M,HxW|M must be even"):
        bench_vs_peer.parse_shape(text)
    assert bench_vs_peer.parse_shape("8,2,20,64x32") == (8, 2, 20, 64, 32)


# Two children (TensorFlow imported in each): over 5 s, so in the slow suite.
@pytest.mark.slow
def test_bench_vs_peer_runs_our_side_alone(bench_path, tmp_path):
    import bench_vs_peer

    out = str(tmp_path / "vs_peer.json")
    bench_vs_peer.main(
        [out, "--ours-only", "--shapes", "1,2,2,8x8", "--rank", "2", "--repeats", "1"]
        + ["--warmup", "0"]
    )
    report = _load(out)
    (row,) = report["results"]
    assert (row["B"], row["C"], row["M"], row["size"]) == (1, 2, 2, "8x8")
    assert row["ours_ms"] > 0 and row["ours_mib"] >= 0 and "peer_ms" not in row
    assert report["value_check"] is None and report["torch"] is None


# Memory children (TensorFlow imported in each): over 20 s, so in the slow suite.
@pytest.mark.slow
def test_bench_loss_3d_runs(bench_path, tmp_path):
    import bench_loss_3d

    out = str(tmp_path / "loss_3d.json")
    report = bench_loss_3d.main(
        [out, "--batch", "1", "--size", "8", "--num-classes", "2", "--rank", "2"]
        + ["--samples", "4", "--chunk-size", "2", "--sweep-samples", "4", "8"]
        + ["--repeats", "1", "--warmup", "0"]
    )
    assert _load(out)["results"] == report["results"]
    rows = {r["variant"]: r for r in report["results"]}
    assert set(rows) == {"deterministic", "direct", "chunked K=2, M=4", "chunked K=2, M=8"}
    assert rows["deterministic"]["ms_vs_deterministic"] == 1.0
    assert all(r["ms"] > 0 and r["peak_mib"] >= 0 for r in rows.values())
    flat = report["chunked_flatness"]
    assert (flat is None) or (flat["M_low"], flat["M_high"], flat["target"]) == (4, 8, 1.2)


def test_bench_vs_peer_profiles_our_side(bench_path, capsys):
    import bench_vs_peer

    report = bench_vs_peer.main(["--profile", "--shapes", "1,2,2,8x8", "--rank", "2"])
    (profile,) = report["profiles"]
    assert profile["shape"] == (1, 2, 2, 8, 8) and profile["wall_ms"] > 0
    # the loss's sampling matmul and its noise appear among the traced ops
    assert any("BatchMatMul" in op for op in profile["op_ms"]), sorted(profile["op_ms"])
    assert "ns per pixel and sample" in capsys.readouterr().out


# --- diagnose_samples.py: per-object scores of a run's samples ----------------------------------
class _ExactSampler:
    """Samples the exact label distribution of `data` (the images are ignored: the batch is
    the whole split, in order)."""

    def __init__(self, data, mode: str = "exact"):
        self.data, self.mode = data, mode

    def sample(self, images, num_samples, seed=0):
        from tfp_seg.data import sample_annotations

        assert len(images) == len(self.data)
        rng = np.random.default_rng(seed)
        maps = []
        for j in range(len(self.data)):
            modes, weights = self.data.modes_of(j)
            if self.mode == "exact":
                maps.append(sample_annotations(modes, weights, num_samples, rng))
            else:  # the most likely joint mode, every time
                maps.append(np.repeat(modes[np.argmax(weights)][None], num_samples, axis=0))
        return np.stack(maps, axis=1)


@pytest.fixture(scope="module")
def shapes_split():
    from tfp_seg.data import ambiguous_shapes

    return ambiguous_shapes(num_images=48, image_size=32, seed=3)


def test_diagnose_samples_scores_an_exact_sampler_as_exact(bench_path, shapes_split):
    import diagnose_samples

    table = diagnose_samples.diagnose(_ExactSampler(shapes_split), shapes_split, num_samples=64)
    assert set(table) == set(diagnose_samples.KINDS)
    assert sum(row["objects"] for row in table.values()) == sum(map(len, shapes_split.objects))
    for kind, row in table.items():
        # every sample is one of the object's modes
        assert row["nearest"] == 0 and row["off_mode"] == 0, kind
        # unbiased estimates of the exact values: the U-statistic of the diversity has mean
        # `data` and GED mean 0; means over >= 24 objects a type of 64 samples each (data
        # seeds 0-9: |diversity - data| <= 0.018, |ged| <= 0.005, mode_tv <= 0.08)
        assert abs(row["diversity"] - row["data"]) < 0.03, (kind, row)
        assert abs(row["ged"]) < 0.01, (kind, row)
        # nearest-mode frequencies of 64 draws against the weights: TV ~ 0.05 by noise alone
        assert row["mode_tv"] < 0.15, (kind, row)


def test_diagnose_samples_sees_a_collapsed_sampler(bench_path, shapes_split):
    import diagnose_samples

    table = diagnose_samples.diagnose(
        _ExactSampler(shapes_split, "argmax"), shapes_split, num_samples=8
    )
    for kind, row in table.items():
        assert row["diversity"] == 0 and row["nearest"] == 0, kind
        assert row["data"] > 0.2 and row["ged"] > 0.1, (kind, row)  # every type is ambiguous
        # the heaviest mode every time: TV = 1 - its weight (>= 0.2 for every type)
        assert row["mode_tv"] >= 0.2 - 1e-6, (kind, row)
    assert "| faint |" in diagnose_samples.render(table)


def test_diagnose_samples_rejects_bad_input(bench_path, shapes_split):
    import diagnose_samples

    with pytest.raises(ValueError, match="num_samples"):
        diagnose_samples.diagnose(_ExactSampler(shapes_split), shapes_split, num_samples=1)

    class Wrong(_ExactSampler):
        def sample(self, images, num_samples, seed=0):
            return super().sample(images, num_samples, seed)[:, :-1]

    with pytest.raises(ValueError, match="expected"):
        diagnose_samples.diagnose(Wrong(shapes_split), shapes_split, num_samples=4)


# One tiny `tfp-seg train` (over 5 s): in the slow suite.
@pytest.mark.slow
def test_diagnose_samples_runs_on_a_trained_run(bench_path, tmp_path, capsys):
    import diagnose_samples

    from tfp_seg.cli import main as cli

    tiny = "--epochs 1 --num-images 40 --image-size 32 --base-filters 4 --depth 2 --rank 2"
    tiny += " --num-samples 4 --eval-samples 4 --val-every 0 --no-export --quiet"
    assert cli(["train", *tiny.split(), "--output-dir", str(tmp_path), "--name", "r"]) == 0
    out = str(tmp_path / "diagnosis.json")
    assert diagnose_samples.main([str(tmp_path / "r"), "--num-samples", "4", "--out", out]) == 0
    table = _load(out)
    assert table and all(0 <= row["off_mode"] <= 1 for row in table.values())
    assert "| type | objects |" in capsys.readouterr().out


# --- study_sample_temperature.py: a covariance temperature fitted after training -----------------
def test_study_sample_temperature_runs_and_reuses_the_run(bench_path, tmp_path):
    import study_sample_temperature

    out, runs = str(tmp_path / "temperature.json"), str(tmp_path / "runs")
    tiny = "--epochs 1 --num-images 40 --image-size 32 --base-filters 4 --depth 2 --rank 2"
    tiny += " --num-samples 4 --eval-samples 4 --val-every 0"
    args = ["--seeds", "1", "--extra", tiny, "--temperatures", "0.5,2"]
    args += ["--num-samples", "4", "--runs-dir", runs, "--out", out]
    assert study_sample_temperature.main(args) == 0
    (row,) = _load(out)["results"]
    assert row["seed"] == 1 and row["t_val"] in (0.5, 1.0, 2.0)
    assert set(row["val_curve"]) == {"0.5", "1.0", "2.0"} == set(row["test_curve"])
    assert set(row["val_exact_curve"]) == set(row["val_curve"]) and row["t_val_exact"] > 0
    assert row["val_ged_t"] <= row["val_ged_1"] and row["paired_best"] <= row["paired_1"]
    assert row["paired_1"] == row["test_curve"]["1.0"]
    assert set(row["test_diversity_curve"]) == set(row["test_curve"])
    assert 0 <= row["hm_iou_1"] <= 1 and 0 <= row["hm_iou_t"] <= 1 and row["div_1"] > 0
    (trained,) = os.listdir(runs)
    stamp = os.path.getmtime(os.path.join(runs, trained, "report.json"))
    assert study_sample_temperature.main(args) == 0  # the run is reused, not trained again
    assert os.path.getmtime(os.path.join(runs, trained, "report.json")) == stamp
