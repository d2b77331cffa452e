"""Shared helpers of the benchmark scripts: side-by-side timing, peak memory, tables, JSON.

Timing: every variant of one configuration is called in turn inside one loop
(`interleaved_ms`), so a change of machine load between repeats hits all variants alike; the
median of the repeats is reported and the ratios between variants are the result. Functions
that cannot share a process (another library in another interpreter: `bench_vs_peer.py`) are
timed in a fresh child each (`child_median_ms`).

Memory (`peak_rss_increase_mib`): the peak resident set size of a fresh child process during
one call, above its resident size just before the call. The child (one per measured function)
imports the benchmark module, builds the function, calls it once (tracing, first-call setup),
then `repeats` times: `gc.collect()`, reset the kernel's high-water mark (`5` written to
`/proc/self/clear_refs`, Linux >= 4.0), read `VmRSS`, call, read `VmHWM`; the median of the
`VmHWM - VmRSS` differences is reported, in MiB. The child runs with
`TF_ENABLE_ONEDNN_OPTS=0` and `MALLOC_MMAP_THRESHOLD_=65536` (`MEMORY_CHILD_ENV`), whatever
the parent's settings: TensorFlow's plain CPU allocator (glibc `malloc`) then gets every buffer
of 64 KiB and more from its own `mmap` and returns it on free, so the resident size follows the
live tensors (oneDNN's allocator keeps freed memory in a pool, which would hide the peak of any
call after the first; with glibc's default, adaptive threshold, freed buffers of up to 32 MiB
stay in the heap and are reused, and the peaks of one function varied several-fold). The
figure counts all memory the call makes resident (tensors, scratch space, Python objects);
weights and buffers that exist before the call are not counted. It needs no allocator
statistics, so it works whether or not the parent runs with oneDNN; the figures describe
TensorFlow's default (non-oneDNN) CPU kernels.
"""

from __future__ import annotations

import gc
import importlib.util
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

MIB = 1024.0 * 1024.0


def interleaved_ms(fns: Dict[str, Callable], repeats: int, warmup: int) -> Dict[str, float]:
    """Median wall time (ms) of each function, calling them in turn `repeats` times."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: Dict[str, List[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: 1000.0 * statistics.median(ts) for name, ts in times.items()}


# The child process of `peak_rss_increase_mib`: oneDNN's pooling allocator off, and glibc's
# mmap threshold fixed at 64 KiB (which also stops glibc from raising it after a free), so that
# every buffer of 64 KiB and more is mapped when allocated and unmapped when freed.
MEMORY_CHILD_ENV = {"TF_ENABLE_ONEDNN_OPTS": "0", "MALLOC_MMAP_THRESHOLD_": "65536"}

# How `peak_rss_increase_mib` measures, recorded in the reports of benchmarks that measure memory.
MEMORY_SOURCE = (
    "peak RSS increase of a fresh child process per measured function: after one warm-up call, "
    "gc.collect(), reset the high-water mark ('5' > /proc/self/clear_refs), read VmRSS, call, "
    "read VmHWM; VmHWM - VmRSS, median of 3 calls; child env TF_ENABLE_ONEDNN_OPTS=0, "
    "MALLOC_MMAP_THRESHOLD_=65536"
)

_RESULT_MARK = "PEAK_RSS_MIB "
_TIME_MARK = "MEDIAN_MS "
# argv: the benchmarks folder, the child function of this module, the JSON spec
_CHILD_CODE = (
    "import sys; sys.path.insert(0, sys.argv[1]); import _common; "
    "getattr(_common, sys.argv[2])(sys.argv[3])"
)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        match = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.MULTILINE)
    if match is None:
        raise RuntimeError(f"no {field} in /proc/self/status")
    return int(match.group(1))


def _reset_peak_rss() -> None:
    """Set this process's high-water mark `VmHWM` to its current resident size."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError as err:
        raise RuntimeError(
            "peak memory is measured as the peak RSS of a child process, which needs Linux >= "
            f"4.0 (writing '5' to /proc/self/clear_refs resets VmHWM); here: {err}"
        ) from err


def peak_rss_increase_mib(
    module_file: str,
    factory: str,
    kwargs: dict | None = None,
    repeats: int = 3,
    warmup: int = 1,
    python: str | None = None,
) -> float:
    """Peak resident memory (MiB) of one call above the resident memory before it, measured
    in a fresh Python process (see the module docstring).

    The child imports `module_file` (as a module, not as `__main__`) and calls
    `factory(**kwargs)` (JSON-serialisable keyword arguments), which builds the inputs and
    returns the zero-argument function to measure; the function must wait for its result
    (`block`). It is called `warmup` times, then `repeats` times measured; the median is
    returned. The peak of one function varies between calls with the order in which
    TensorFlow's executor runs independent ops.

    `python`: another interpreter for the child (e.g. one with PyTorch, for a peer library);
    it then gets only this folder on its import path (not this process's packages), so
    `module_file` must import nothing but the standard library and `_common` at its top.
    """
    _reset_peak_rss()  # fail here, not after the child's imports, where it cannot work
    spec = _child_spec(module_file, factory, kwargs, repeats, warmup)
    peaks = _run_target_child("_rss_child", _RESULT_MARK, "memory", spec, python)
    return statistics.median(peaks)


def child_median_ms(
    module_file: str,
    factory: str,
    kwargs: dict | None = None,
    repeats: int = 5,
    warmup: int = 1,
    python: str | None = None,
) -> float:
    """Median wall time (ms) of `repeats` calls of `factory(**kwargs)()` after `warmup` calls,
    in a fresh Python process with this process's environment (not `MEMORY_CHILD_ENV`): for
    functions that cannot share one process (another library, another interpreter), where
    `interleaved_ms` does not apply. Arguments as in `peak_rss_increase_mib`.
    """
    spec = _child_spec(module_file, factory, kwargs, repeats, warmup)
    return _run_target_child("_time_child", _TIME_MARK, "timing", spec, python, env={})


def _child_spec(module_file, factory, kwargs, repeats, warmup) -> dict:
    return {
        "module_file": os.path.abspath(module_file),
        "factory": factory,
        "kwargs": kwargs or {},
        "repeats": repeats,
        "warmup": warmup,
    }


def _run_target_child(child: str, mark: str, what: str, spec: dict, python, env=None):
    """Run `child` (`_rss_child` / `_time_child`) on `spec` in a fresh process (`python`: only
    this folder on its import path); return its JSON result."""
    bench_dir = os.path.dirname(os.path.abspath(__file__))
    return run_memory_child(
        ["-c", _CHILD_CODE, bench_dir, child, json.dumps(spec)],
        mark,
        f"{what} child for {spec['factory']}({spec['kwargs']}) in {spec['module_file']}",
        python=python,
        path=None if python is None else [bench_dir],
        env=env,
    )


def run_memory_child(
    args: Sequence[str],
    mark: str,
    what: str,
    python: str | None = None,
    path: Sequence[str] | None = None,
    env: dict | None = None,
):
    """Run `python *args` in a fresh process with `MEMORY_CHILD_ENV` (or the variables `env`
    instead) and this process's import path (or `path`); return the JSON after `mark` on its
    last line that starts with `mark`. `python`: the interpreter (default: this one).

    Raises:
      RuntimeError: the child failed or printed no such line (`what` names it; the end of its
        stderr is included).
    """
    env = dict(os.environ, **(MEMORY_CHILD_ENV if env is None else env))
    # the child finds what this process finds (the caller's module may import its neighbours)
    path = sys.path if path is None else path
    env["PYTHONPATH"] = os.pathsep.join(p or os.getcwd() for p in path)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env.setdefault("KERAS_BACKEND", "tensorflow")
    command = [python or sys.executable, *args]
    proc = subprocess.run(command, env=env, capture_output=True, text=True)
    results = [line for line in proc.stdout.splitlines() if line.startswith(mark)]
    if proc.returncode or not results:
        raise RuntimeError(f"{what} failed (exit status {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(results[-1][len(mark) :])


def _load_target(spec: dict):
    """The function to measure: `factory(**kwargs)` of the module file of a child's spec."""
    module_spec = importlib.util.spec_from_file_location("_memory_target", spec["module_file"])
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    fn = getattr(module, spec["factory"])(**spec["kwargs"])
    for _ in range(spec["warmup"]):
        fn()
    return fn


def _time_child(spec_json: str) -> None:
    """Body of the child process of `child_median_ms`: prints the median time (ms) as JSON."""
    spec = json.loads(spec_json)
    fn = _load_target(spec)
    times = []
    for _ in range(spec["repeats"]):
        start = time.perf_counter()
        fn()
        times.append(1000.0 * (time.perf_counter() - start))
    print(_TIME_MARK + json.dumps(statistics.median(times)), flush=True)


def _rss_child(spec_json: str) -> None:
    """Body of the child process of `peak_rss_increase_mib`: prints the peaks (MiB) as JSON."""
    spec = json.loads(spec_json)
    _reset_peak_rss()
    fn = _load_target(spec)
    peaks = []
    for _ in range(spec["repeats"]):
        gc.collect()
        _reset_peak_rss()
        before = _status_kib("VmRSS")  # read after the reset: VmHWM >= it
        fn()
        peaks.append(max(0, _status_kib("VmHWM") - before) / 1024.0)
    print(_RESULT_MARK + json.dumps(peaks), flush=True)


def block(value):
    """Wait for a (nest of) tensor result(s), so timings include the computation."""
    import tensorflow as tf

    for t in tf.nest.flatten(value):
        if hasattr(t, "numpy"):
            t.numpy()
    return value


def loss_gradient_fn(loss, labels, params) -> Callable[[], object]:
    """A function of no argument that evaluates `loss(labels, params)` and its gradient with
    respect to `params` (forward + backward, one `tf.function`) and waits for both."""
    import tensorflow as tf

    @tf.function
    def step(p):
        with tf.GradientTape() as tape:
            tape.watch(p)
            value = loss(labels, p)
        return value, tape.gradient(value, p)

    return lambda: block(step(params))


def environment() -> dict:
    import keras
    import tensorflow as tf

    import tfp_seg

    return {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "device": "CPU",
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "tfp_seg": tfp_seg.__version__,
        "onednn": _onednn_enabled(),
        "TF_ENABLE_ONEDNN_OPTS": os.environ.get("TF_ENABLE_ONEDNN_OPTS"),
    }


def _onednn_enabled():
    """Whether this process's TensorFlow runs oneDNN (None where that cannot be asked)."""
    try:
        from tensorflow.python.util import _pywrap_util_port

        return bool(_pywrap_util_port.IsMklEnabled())
    except (ImportError, AttributeError):
        return None


def markdown_table(rows: Sequence[dict], columns: Sequence[tuple]) -> str:
    """`columns`: (key, header, format) triples; missing values print as '-'."""
    header = "| " + " | ".join(h for _, h, _ in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    lines = [header, rule]
    for row in rows:
        cells = []
        for key, _, fmt in columns:
            value = row.get(key)
            cells.append("-" if value is None else format(value, fmt))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(path: str, report: dict) -> None:
    """Write `report` as JSON (NumPy scalars as floats), creating the folder; atomically, as
    every file of tfp_seg (`tfp_seg._io`)."""
    from tfp_seg import _io  # not at the top: importing tfp_seg loads TensorFlow (env above)

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    _io.atomic_write_json(path, report, default=float, sort_keys=False)
    print(f"wrote {path}")


def publish(args, title: str, rows: Sequence[dict], columns: Sequence[tuple], **extra) -> dict:
    """Print `title` and the markdown table of `rows`, write the standard JSON report
    (`title`, `config`, `environment`, `results`, and `extra`) to `args.out`, and return it."""
    print(f"\n{title}")
    print(markdown_table(rows, columns))
    report = {
        "title": title,
        "config": vars(args),
        "environment": environment(),
        "results": list(rows),
        **extra,
    }
    write_report(args.out, report)
    return report
