import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture
def close_figures():
    """Close every Matplotlib figure a test left open."""
    yield
    import matplotlib.pyplot as plt

    plt.close("all")


@pytest.fixture(scope="session")
def shapes():
    """A small exact-distribution benchmark (8 images of 16x16)."""
    from tfp_seg.data import ambiguous_shapes

    return ambiguous_shapes(num_images=8, image_size=16, seed=0)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """The folder of one tiny `tfp-seg train` run (SSN, `helpers.TINY_TRAIN`), shared by the
    tests that read a run and do not change it."""
    import keras

    from tests.helpers import tiny_train_args
    from tfp_seg import cli

    out = tmp_path_factory.mktemp("runs")
    keras.utils.set_random_seed(0)
    assert cli.main(["train", *tiny_train_args(), "--output-dir", str(out), "--name", "tiny"]) == 0
    return out / "tiny"
