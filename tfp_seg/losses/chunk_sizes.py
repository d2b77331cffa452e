"""How many Monte Carlo samples the losses draw at a time (`chunk_size`).

```none
chunk_size=None      all M samples at once (memory grows with M)
chunk_size=S         S samples a chunk, S dividing M (even with antithetic pairs), each chunk
                     drawn again in the backward pass (`tfp_seg.losses.chunked`): memory flat in M
chunk_size="auto"    the losses' default: S from the problem size when the loss runs
                     (`auto_chunk_size`)
```
"""

from __future__ import annotations

from typing import Optional

from tfp_seg import _checks

__all__ = ["AUTO", "auto_chunk_size", "check_chunk_size"]

AUTO = "auto"
"""`chunk_size="auto"` (the losses' default): a chunk size chosen from the problem size by
`auto_chunk_size`."""
# `auto_chunk_size`: all samples at once up to AUTO_DIRECT_SAMPLES samples, or while the
# samples of an image hold at most AUTO_DIRECT_ELEMENTS values; otherwise chunks of at most
# AUTO_CHUNK_ELEMENTS values per image (benchmarks/README.md, "Memory-efficient Monte Carlo NLL").
AUTO_DIRECT_SAMPLES = 20
AUTO_DIRECT_ELEMENTS = 2**20
AUTO_CHUNK_ELEMENTS = 2**16


def auto_chunk_size(num_samples: int, antithetic: bool, sample_elements: Optional[int]) -> int:
    """The chunk size of `chunk_size="auto"` for M = `num_samples` samples of which each holds
    `sample_elements` values per image (the pixels X times the class planes the kernel
    scores, or times the K raters of a label set if more): M itself (no chunks) when M <= 20
    (`AUTO_DIRECT_SAMPLES`), when `M * sample_elements <= 2**20` (`AUTO_DIRECT_ELEMENTS`) or
    when `sample_elements` is unknown (None: a spatial size known only at run time);
    otherwise the largest divisor S of M (even with antithetic pairs) with
    `S * sample_elements <= 2**16` (`AUTO_CHUNK_ELEMENTS`), or the smallest one (2 with
    antithetic pairs, else 1) if none is that small.

    Why: chunking costs time (each chunk is drawn again in the backward pass: 1.3x the loss
    at 10 samples a chunk, 1.6x at 4, 2x at 2, measured at 128 x 128), while up to the training
    default of 20 samples, or a few MiB of samples per image, the samples cost memory of the
    order of the network's activations. Past that, peak memory stops growing with M.
    """
    if (
        num_samples <= AUTO_DIRECT_SAMPLES
        or sample_elements is None
        or num_samples * sample_elements <= AUTO_DIRECT_ELEMENTS
    ):
        return num_samples
    step = 2 if antithetic else 1
    fits = [
        s
        for s in range(step, num_samples + 1, step)
        if num_samples % s == 0 and s * sample_elements <= AUTO_CHUNK_ELEMENTS
    ]
    return max(fits) if fits else step


def check_chunk_size(chunk_size, num_samples: int, antithetic: bool):
    """Validate `chunk_size`: None (all samples at once), `"auto"` (`auto_chunk_size`, resolved
    from the shapes when the loss runs) or a divisor of `num_samples` (even with antithetic)."""
    if chunk_size == AUTO:
        return AUTO
    if isinstance(chunk_size, str):
        raise ValueError(
            f"`chunk_size` must be None, {AUTO!r} or a positive int dividing `num_samples`; "
            f"got {chunk_size!r}."
        )
    chunk_size = _checks.positive_int(chunk_size, "chunk_size", optional=True)
    if chunk_size is None:
        return None
    if num_samples % chunk_size:
        raise ValueError(f"`chunk_size` ({chunk_size}) must divide `num_samples` ({num_samples}).")
    if antithetic and chunk_size % 2:
        raise ValueError(
            f"`chunk_size` must be even with antithetic sampling (mirrored pairs stay in one "
            f"chunk); got {chunk_size}."
        )
    return chunk_size
