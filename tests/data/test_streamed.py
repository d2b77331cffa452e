"""Tests for `tfp_seg.data.streamed`: when `load(spec, stream=None)` streams (the threshold,
the estimate made before decoding), and the peak memory of a streamed source, flat in the
number of images."""

import importlib.util
import os

import pytest

from tests.helpers import fake_lidc_entries, write_image_folder, write_lidc_pickle
from tfp_seg import data
from tfp_seg.data import DiskAnnotatedImages, streamed

GIB = 2**30


@pytest.mark.parametrize(
    "value, expected",
    [
        (1024, 1024),
        ("8GiB", 8 * GIB),
        ("8 gb", 8 * GIB),
        ("500M", 500 * 2**20),
        ("1.5k", 1536),
        ("123", 123),
        ("50%", None),
    ],
)
def test_thresholds_in_bytes_units_or_shares_of_memory(value, expected):
    size, origin = streamed.stream_threshold(value)
    assert origin == "stream_threshold"
    assert size == (expected if expected is not None else streamed.physical_memory() // 2)


@pytest.mark.parametrize("value", ["lots", "0", "-3G", "150%", 0, True, [1]])
def test_bad_thresholds_name_the_forms(value, monkeypatch):
    with pytest.raises(ValueError, match="`stream_threshold` must be a number of bytes"):
        streamed.stream_threshold(value)
    if isinstance(value, str):
        monkeypatch.setenv(streamed.STREAM_THRESHOLD_ENV, value)
        with pytest.raises(ValueError, match=r"\$TFP_SEG_STREAM_THRESHOLD must be a number"):
            streamed.stream_threshold()


def test_the_default_threshold_is_a_quarter_of_memory_or_the_env(monkeypatch):
    monkeypatch.delenv(streamed.STREAM_THRESHOLD_ENV, raising=False)
    size, origin = streamed.stream_threshold()
    assert size == streamed.physical_memory() // 4 and "quarter" in origin
    monkeypatch.setenv(streamed.STREAM_THRESHOLD_ENV, "3M")
    assert streamed.stream_threshold() == (3 * 2**20, "$TFP_SEG_STREAM_THRESHOLD")


def test_the_folder_estimate_is_the_decoded_size(tmp_path, rng):
    images, masks, _ = write_image_folder(tmp_path, rng, num_images=5, k=3, size=8)
    plan = data.image_folder.plan_image_folder(images, masks)
    loaded = data.load(f"folder:{images}:{masks}", stream=False)
    exact = loaded.images.nbytes + loaded.annotations.nbytes
    assert streamed.estimate_bytes("folder", plan) == exact == 5 * 8 * 8 * (4 + 3)


def test_auto_streams_above_the_threshold_and_says_why(tmp_path, rng, monkeypatch):
    entries = fake_lidc_entries(rng, n=6, size=8)
    spec = f"lidc:{write_lidc_pickle(tmp_path / 'parts', entries, parts=2)}"
    size = sum(p.stat().st_size for p in (tmp_path / "parts").iterdir())
    cache_dir = str(tmp_path / "c")
    small = data.load(spec, cache_dir=cache_dir, stream_threshold=size)
    assert type(small) is data.AnnotatedImages and not (tmp_path / "c").exists()
    assert small.note.startswith("in memory (auto: about ") and "<= the threshold" in small.note
    big = data.load(spec, cache_dir=cache_dir, stream_threshold=size - 1)
    assert isinstance(big, DiskAnnotatedImages) and "> the threshold" in big.note
    assert "(stream_threshold)" in big.note and big.cache in big.note
    monkeypatch.setenv(streamed.STREAM_THRESHOLD_ENV, "1")
    from_env = data.load(spec, cache_dir=cache_dir)
    assert from_env.cache_status == "reused" and "$TFP_SEG_STREAM_THRESHOLD" in from_env.note


def test_stream_values_and_builtin(tmp_path):
    with pytest.raises(ValueError, match="does not apply to `builtin`"):
        data.load("builtin", stream=True)
    assert isinstance(
        data.load("builtin", num_images=4, image_size=16, stream=False), data.AmbiguousShapes
    )
    with pytest.raises(ValueError, match=r"`stream` must be None \(auto\), True or False"):
        data.load(f"lidc:{tmp_path}", stream="yes")


# --- peak memory -----------------------------------------------------------------------------
def _bench():
    path = os.path.join(
        os.path.dirname(__file__), "..", "..", "benchmarks", "bench_stream_memory.py"
    )
    spec = importlib.util.spec_from_file_location("bench_stream_memory", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# Three fresh child processes per source (TensorFlow imported in each), each decoding and
# streaming up to 1,600 images of 128x128 seven times: about two minutes, so in the slow suite.
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["folder", "lidc"])
def test_decode_and_one_epoch_of_streaming_are_flat_in_the_number_of_images(tmp_path, kind):
    # Anonymous resident memory (RssAnon: the process's own pages, not the page cache of the
    # mapped files), sampled every millisecond in a fresh child process during decode + one
    # epoch, above its level before; after two warm-up runs, the median of 5 runs, each decoding
    # anew (benchmarks/bench_stream_memory.py).
    bench = _bench()

    def peak(num_images, stream, repeats=5):
        root = tmp_path / f"{kind}-{num_images}"
        spec = bench.write_source(str(root), kind, num_images, size=128, raters=4)
        figures = bench.measure(spec, stream, str(root / "cache"), repeats=repeats)
        return figures["peak_anon_mib"]

    small, large = peak(200, True), peak(1600, True)
    assert large <= 1.2 * small, (small, large)
    in_memory = peak(1600, False, repeats=1)  # the method sees the data set when it is held
    decoded_mib = 1600 * 128 * 128 * (4 + 4) / 2**20  # float32 image + 4 uint8 masks
    assert in_memory > large + 0.8 * decoded_mib, (in_memory, large, decoded_mib)
