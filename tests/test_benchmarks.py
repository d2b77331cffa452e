"""The on-demand benchmarks still run: each script's `main` on a tiny configuration.

Timings are not checked (performance is measured by running the scripts, not in tests); the
reports must be complete, with positive times and ratios against the script's reference row.
Peak memory is measured in child processes (`benchmarks/_common.py`), so these also check
that the measurement runs (with or without oneDNN in this process).
"""

import json
import os
import sys

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
    assert len({r["group"] for r in rows}) == 6
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
