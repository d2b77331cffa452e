"""Peak memory of users' data streamed from disk (`tfp_seg.data.load(spec, stream=True)`) as the
number of images grows: decoding the source into the cache and one epoch of `to_dataset`.

A streamed source is decoded once, image by image (a folder) or part file by part file (LIDC
pickles), into `.npy` files that are then read through memory maps, a batch at a time. So the
process's own memory should stay that of one image or part plus a few batches, flat in the
number of images; `--modes memory` (`stream=False`) holds the decoded arrays and their copy in
the `tf.data` pipeline for contrast.

Measurement: one fresh child process per row (env `_common.MEMORY_CHILD_ENV`: oneDNN off, every
buffer >= 64 KiB mmapped and unmapped when freed). The child first decodes and streams the
measured source twice, unmeasured (TensorFlow's start-up, thread pools, first-call setup and
the allocators' first growth to the source's size make the first runs' peaks up to several MiB
higher). Then, `--repeats` times (3), each time decoding into a
fresh cache after `gc.collect()` and `malloc_trim`, it reads its anonymous resident memory
(`RssAnon` in `/proc/self/status`: the process's own heap and mmapped buffers; the page cache
of the mapped `.npy` files is `RssFile`, the kernel's, dropped under pressure, not counted) and
samples it every millisecond from a thread while it loads the source and iterates one epoch
(batch 8, a random rater per image, flips and rotations). Reported are the medians over the
repeats: the peak increase (`peak_anon_mib`; of the load alone and of the epoch, both above the
level before the load), with the largest of the runs' peaks (one run's peak varies by a few
MiB with the threads' timing), the peak of the mapped file pages (`peak_file_mib`, for
information) and the times. The source files are written by the parent before the child
starts.

Run:
    python benchmarks/bench_stream_memory.py [benchmarks/results/stream_memory.json]
        [--images 200 1600] [--size 128] [--raters 4] [--kinds folder lidc]
        [--modes stream memory]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import pickle
import shutil
import statistics
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common  # noqa: E402

_RESULT_MARK = "STREAM_MEMORY "
PART_SIZE = 100  # LIDC entries per part file (the data are shipped in parts)
WARMUP_RUNS = 2  # unmeasured runs first: a run's peak settles from the third one on


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", nargs="?", default="benchmarks/results/stream_memory.json")
    parser.add_argument("--images", type=int, nargs="+", default=[200, 1600])
    parser.add_argument("--size", type=int, default=128, help="H = W (default 128)")
    parser.add_argument("--raters", type=int, default=4, help="K masks per image")
    parser.add_argument("--batch", type=int, default=8, help="to_dataset batch size")
    parser.add_argument("--repeats", type=int, default=3, help="runs per child (median)")
    parser.add_argument(
        "--kinds", nargs="+", choices=("folder", "lidc"), default=["folder", "lidc"]
    )
    parser.add_argument(
        "--modes", nargs="+", choices=("stream", "memory"), default=["stream", "memory"]
    )
    return parser.parse_args(argv)


def _entries(num_images, size, raters, seed=0):
    """`(id, image float32 [H, W] in [0, 1], masks [K x uint8 [H, W]], series)`: discs whose
    radius differs between raters, one at a time (never all in memory)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    for i in range(num_images):
        cy, cx = rng.uniform(0.3 * size, 0.7 * size, size=2)
        radius = rng.uniform(0.1 * size, 0.25 * size)
        dist = np.hypot(yy - cy, xx - cx)
        image = np.clip(1.0 - dist / (2 * radius), 0, 1) * 0.9 + 0.1 * rng.random((size, size))
        masks = [(dist <= radius * rng.uniform(0.8, 1.2)).astype(np.uint8) for _ in range(raters)]
        yield f"img{i:06d}", image.astype(np.float32), masks, f"series{i // 4}"


def write_source(root: str, kind: str, num_images: int, size: int = 128, raters: int = 4) -> str:
    """Write a source of `num_images` images under `root` and return its spec: a folder of PNG
    images with `raters` binary masks each (`folder:`), or pickle parts of `PART_SIZE` entries
    in the `data_lidc.pickle` layout (`lidc:`)."""
    from PIL import Image

    if kind == "folder":
        images, masks = os.path.join(root, "images"), os.path.join(root, "masks")
        os.makedirs(images, exist_ok=True)
        os.makedirs(masks, exist_ok=True)
        for key, image, rater_masks, _ in _entries(num_images, size, raters):
            Image.fromarray((image * 255).astype("uint8")).save(os.path.join(images, f"{key}.png"))
            for k, mask in enumerate(rater_masks):
                Image.fromarray(mask * 255).save(os.path.join(masks, f"{key}_{k}.png"))
        return f"folder:{images}:{masks}"
    parts = os.path.join(root, "parts")
    os.makedirs(parts, exist_ok=True)
    part: dict = {}
    for i, (key, image, rater_masks, series) in enumerate(_entries(num_images, size, raters)):
        part[key] = {"image": image, "masks": rater_masks, "series_uid": series}
        if len(part) == PART_SIZE or i == num_images - 1:
            with open(os.path.join(parts, f"part_{i // PART_SIZE:04d}.pickle"), "wb") as f:
                pickle.dump(part, f)
            part = {}
    return f"lidc:{parts}"


def load_and_stream_one_epoch(
    spec: str, stream: bool, cache_dir: str, batch_size: int = 8, between=None
):
    """Load `spec` (decoding it into `cache_dir` if `stream`) and iterate one epoch of
    `to_dataset(batch_size, annotation="random", augment=True)`; returns `(load_s, epoch_s)`.
    `between()` is called after the load."""
    from tfp_seg import data

    start = time.perf_counter()
    loaded = data.load(spec, stream=stream, cache_dir=cache_dir)
    if between is not None:
        between()
    loaded_at = time.perf_counter()
    count = 0
    for images, _ in loaded.to_dataset(batch_size=batch_size, seed=0, augment=True):
        count += int(images.shape[0])
    assert count == len(loaded), (count, len(loaded))
    return loaded_at - start, time.perf_counter() - loaded_at


def _status_kib(fields) -> dict:
    with open("/proc/self/status") as f:
        lines = f.read().splitlines()
    values = {}
    for line in lines:
        name, _, rest = line.partition(":")
        if name in fields:
            values[name] = int(rest.split()[0])
    return values


class _Sampler(threading.Thread):
    """Samples `RssAnon` and `RssFile` (KiB) every millisecond, keeping the maxima."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak = {"RssAnon": 0, "RssFile": 0}
        self.samples = 0
        self._done = threading.Event()

    def run(self):
        while not self._done.is_set():
            self.sample()
            time.sleep(0.001)

    def sample(self):
        for key, value in _status_kib(self.peak).items():
            self.peak[key] = max(self.peak[key], value)
        self.samples += 1

    def split(self) -> dict:
        """The peaks so far (a last sample taken), then start again from the current values."""
        self.sample()
        peak, self.peak = dict(self.peak), {key: 0 for key in self.peak}
        return peak

    def stop(self):
        self._done.set()
        self.join()


def _measure_once(job: dict, cache_dir: str) -> dict:
    """One measured load + epoch (see the module docstring), decoding into `cache_dir`."""
    from tfp_seg.data.streamed import release_freed_memory

    gc.collect()
    release_freed_memory()
    before = _status_kib({"RssAnon", "RssFile"})
    sampler = _Sampler()
    sampler.start()
    phases = []
    load_s, epoch_s = load_and_stream_one_epoch(
        job["spec"], job["stream"], cache_dir, job["batch"], lambda: phases.append(sampler.split())
    )
    sampler.stop()
    phases.append(sampler.split())

    def increase(peak, key):
        return max(0, peak[key] - before[key]) / 1024.0

    return {
        "peak_anon_mib": max(increase(p, "RssAnon") for p in phases),
        "load_anon_mib": increase(phases[0], "RssAnon"),
        "epoch_anon_mib": increase(phases[1], "RssAnon"),
        "peak_file_mib": max(increase(p, "RssFile") for p in phases),
        "baseline_anon_mib": before["RssAnon"] / 1024.0,
        "load_s": load_s,
        "epoch_s": epoch_s,
    }


def _child(spec_json: str) -> None:
    job = json.loads(spec_json)
    runs = []
    for repeat in range(-WARMUP_RUNS, job["repeats"]):  # < 0: warm-up, not measured
        cache_dir = os.path.join(job["cache_dir"], f"repeat-{repeat}")  # decoded every time
        if repeat < 0:
            load_and_stream_one_epoch(job["spec"], job["stream"], cache_dir, job["batch"])
        else:
            runs.append(_measure_once(job, cache_dir))
        shutil.rmtree(cache_dir, ignore_errors=True)
    result = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
    result["max_peak_anon_mib"] = max(run["peak_anon_mib"] for run in runs)
    print(_RESULT_MARK + json.dumps(result), flush=True)


def measure(
    spec: str,
    stream: bool,
    cache_dir: str,
    batch_size: int = 8,
    size: int = 128,
    raters: int = 4,
    repeats: int = 3,
) -> dict:
    """The figures of `load_and_stream_one_epoch` in a fresh child process (see the module
    docstring), medians of `repeats` runs (each decoding anew): `peak_anon_mib`,
    `load_anon_mib`, `epoch_anon_mib`, `peak_file_mib`, `baseline_anon_mib`, `load_s`,
    `epoch_s`, and `max_peak_anon_mib` (the largest of the runs)."""
    job = {
        "repeats": repeats,
        "spec": spec,
        "stream": stream,
        "cache_dir": cache_dir,
        "batch": batch_size,
        "size": size,
        "raters": raters,
    }
    return _common.run_memory_child(
        [os.path.abspath(__file__), "--child", json.dumps(job)],
        _RESULT_MARK,
        f"stream-memory child for {spec} (stream={stream})",
    )


def main(argv=None):
    args = parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.kinds:
            first = {}
            for num_images in args.images:
                root = os.path.join(tmp, f"{kind}-{num_images}")
                spec = write_source(root, kind, num_images, args.size, args.raters)
                for mode in args.modes:
                    figures = measure(
                        spec,
                        mode == "stream",
                        os.path.join(root, f"cache-{mode}"),
                        args.batch,
                        args.size,
                        args.raters,
                        args.repeats,
                    )
                    first.setdefault(mode, figures["peak_anon_mib"])
                    base = first[mode]
                    rows.append(
                        {
                            "source": kind,
                            "mode": mode,
                            "images": num_images,
                            "decoded_mib": num_images * args.size**2 * (4 + args.raters) / 2**20,
                            **figures,
                            "peak_vs_first": figures["peak_anon_mib"] / base if base else None,
                        }
                    )
    columns = [
        ("source", "source", "s"),
        ("mode", "mode", "s"),
        ("images", "images", "d"),
        ("decoded_mib", "decoded MiB", ".1f"),
        ("peak_anon_mib", "peak anon MiB", ".1f"),
        ("peak_vs_first", "vs first", ".2f"),
        ("load_anon_mib", "load", ".1f"),
        ("epoch_anon_mib", "epoch", ".1f"),
        ("max_peak_anon_mib", "max of runs", ".1f"),
        ("peak_file_mib", "peak mapped-file MiB", ".1f"),
        ("load_s", "load s", ".2f"),
        ("epoch_s", "epoch s", ".2f"),
    ]
    return _common.publish(
        args,
        f"Peak memory of decoding + one epoch of streaming ({args.size}x{args.size}, "
        f"{args.raters} raters, batch {args.batch})",
        rows,
        columns,
        memory_source=(
            "peak RssAnon increase of a fresh child process over decode + one epoch, sampled "
            "every 1 ms from a thread, after 2 unmeasured warm-up runs, median of --repeats runs "
            "(each decoding anew after gc.collect() and malloc_trim); child env "
            "TF_ENABLE_ONEDNN_OPTS=0, MALLOC_MMAP_THRESHOLD_=65536; page cache of the mapped "
            ".npy files (RssFile) not counted"
        ),
    )


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        _child(sys.argv[2])
    else:
        main()
