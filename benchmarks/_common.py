"""Shared helpers of the benchmark scripts: side-by-side timing, peak memory, tables, JSON.

Timing: every variant of one configuration is called in turn inside one loop
(`interleaved_ms`), so a change of machine load between repeats hits all variants alike; the
median of the repeats is reported and the ratios between variants are the result.

Memory: TensorFlow's own allocator statistics on the CPU device
(`tf.config.experimental.get_memory_info("CPU:0")`, reset before each measured call; the
median of 3 calls). On CPU these come from oneDNN's allocator (TensorFlow's default build,
`TF_ENABLE_ONEDNN_OPTS=1`; with it off the call raises) and count tensor buffers of 256 KiB
and more: what grows with samples, batch and resolution; not small tensors, oneDNN scratch
space or Python objects. The reported number is the peak *above* the allocation at the start
of the call: the call's own transient memory, excluding weights that already exist.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
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


def peak_mib(fn: Callable, repeats: int = 3, device: str = "CPU:0") -> float:
    """Peak allocator memory (MiB) during `fn()` above what was allocated before it.

    The median of `repeats` calls: the peak depends on the order in which TensorFlow's
    executor happens to run independent ops (about +-6% between calls of one function here).
    """
    import tensorflow as tf

    peaks = []
    for _ in range(repeats):
        tf.config.experimental.reset_memory_stats(device)
        before = tf.config.experimental.get_memory_info(device)["current"]
        fn()
        peaks.append((tf.config.experimental.get_memory_info(device)["peak"] - before) / MIB)
    return statistics.median(peaks)


def block(value):
    """Wait for a (nest of) tensor result(s), so timings include the computation."""
    import tensorflow as tf

    for t in tf.nest.flatten(value):
        if hasattr(t, "numpy"):
            t.numpy()
    return value


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
    }


# How `peak_mib` measures, recorded in the reports of benchmarks that measure memory.
MEMORY_SOURCE = "tf.config.experimental.get_memory_info('CPU:0') peak above start"


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
    """Write `report` as JSON (NumPy scalars as floats), creating the folder."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=2, default=float)
    print(f"wrote {path}")


def publish(
    args, title: str, rows: Sequence[dict], columns: Sequence[tuple], **extra
) -> dict:
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
