"""Every script in `examples/` runs to completion with small flags (slow: each trains a model).

The table below names the flags of each script; a script without an entry fails the default
suite, so a new example cannot go untested. Each runs in a fresh process in its own folder, as a
user would run it, and writes only there.
"""

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"

# script -> small flags (relative output paths land in the test's own folder)
SMALL_FLAGS = {
    "compare_heads.py": [
        "--epochs",
        "1",
        "--num-images",
        "40",
        "--image-size",
        "32",
        "--base-filters",
        "4",
        "--depth",
        "2",
        "--rank",
        "2",
        "--train-samples",
        "4",
        "--eval-samples",
        "4",
        "--no-figures",
        "--out",
        "out",
    ],
    "distributed_training.py": [
        "--epochs",
        "1",
        "--num-images",
        "32",
        "--image-size",
        "32",
        "--num-samples",
        "4",
        "--out",
        "out",
    ],
    "export_and_serve.py": [
        "--steps",
        "4",
        "--num-samples",
        "4",
        "--savedmodels",
        "savedmodels",
        "--out",
        "out",
    ],
    # MiT-B0 (the default family) builds only from 64x64 up (keras-hub 0.32)
    "keras_hub_backbone.py": ["--epochs", "1", "--num-images", "16", "--image-size", "64"],
    "ssn_sample_control.py": [
        "--epochs",
        "1",
        "--num-images",
        "32",
        "--num-samples",
        "4",
        "--out",
        "out",
    ],
    "train_prob_unet.py": [
        "--epochs",
        "1",
        "--num-images",
        "32",
        "--num-samples",
        "4",
        "--out",
        "out",
    ],
}


def test_every_example_has_small_flags():
    scripts = sorted(p.name for p in EXAMPLES.glob("*.py"))
    assert scripts == sorted(SMALL_FLAGS), "add the new example's small flags to SMALL_FLAGS"


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(SMALL_FLAGS))
def test_example_runs(script, tmp_path):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "MPLBACKEND": "Agg"}
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *SMALL_FLAGS[script]],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert written or proc.stdout.strip(), f"{script} printed and wrote nothing"
