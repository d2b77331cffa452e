"""When users' data stream from disk, and loading them that way: `load_source` behind
`tfp_seg.data.load(spec, stream=...)`.

```none
stream=False   decode into memory (AnnotatedImages), as the loaders always did
stream=True    decode once into the disk cache (tfp_seg.data.cache), or reuse it, and return
               DiskAnnotatedImages: memory maps, index views, batches read from disk
stream=None    auto: stream when the estimated decoded size exceeds the threshold
```

The estimate is made before anything is decoded: for a folder, the first image's decoded
shape (from its header, or `image_size` and `channels`) times the number of images, plus the
uint8 masks, `N (H W ch 4 + K H W)` bytes; for LIDC pickles, their total file size (a pickle of
arrays is about the size of its arrays; loading it in memory holds both at once). The
threshold is `stream_threshold`, else `$TFP_SEG_STREAM_THRESHOLD`, else a quarter of the
physical memory (training in memory holds the arrays, their copy in the `tf.data` pipeline
and the model). Sizes are bytes or a number with a unit, `"8GiB"`, `"500M"` (powers of 1024),
or a share of the physical memory, `"30%"`.
"""

from __future__ import annotations

import dataclasses
import inspect
import itertools
import os
import re
from typing import Any, Optional

import numpy as np

from tfp_seg import _checks
from tfp_seg.data import cache, decode
from tfp_seg.data.annotated_images import AnnotatedImages
from tfp_seg.data.disk import DiskAnnotatedImages, MappedArray, describe_bytes
from tfp_seg.data.image_folder import FolderPlan, load_planned, plan_image_folder
from tfp_seg.data.lidc import load_lidc_crops, pickle_files

__all__ = [
    "STREAM_THRESHOLD_ENV",
    "estimate_bytes",
    "load_source",
    "physical_memory",
    "release_freed_memory",
    "stream_threshold",
]

STREAM_THRESHOLD_ENV = "TFP_SEG_STREAM_THRESHOLD"
"""The environment variable of the auto-streaming threshold (bytes, `"8GiB"`, `"30%"`)."""
_DEFAULT_SHARE = 0.25
_FALLBACK_MEMORY = 16 * 2**30  # where the physical memory cannot be asked
_UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def physical_memory() -> int:
    """Bytes of physical memory (`sysconf`), or 16 GiB where that cannot be asked."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, OSError, ValueError):  # pragma: no cover - not POSIX
        return _FALLBACK_MEMORY


def _parse_size(value: Any, name: str) -> int:
    form = (
        f"{name} must be a number of bytes, a number with a unit (e.g. '8GiB', '500M') or a "
        f"share of the physical memory (e.g. '30%'); got {value!r}."
    )
    if isinstance(value, bool):
        raise ValueError(form)
    if isinstance(value, (int, float)):
        if not value > 0:
            raise ValueError(form)
        return int(value)
    if not isinstance(value, str):
        raise ValueError(form)
    text = value.strip().lower().replace(" ", "")
    share = re.fullmatch(r"(\d+(?:\.\d*)?)%", text)
    if share:
        fraction = float(share.group(1)) / 100
        if not 0 < fraction <= 1:
            raise ValueError(form)
        return int(fraction * physical_memory())
    match = re.fullmatch(r"(\d+(?:\.\d*)?)([kmgt]?)(?:i?b)?", text)
    if not match or not float(match.group(1)) > 0:
        raise ValueError(form)
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def stream_threshold(value: Any = None) -> tuple:
    """`(bytes, how)`: the auto-streaming threshold and where it comes from (`value`,
    `$TFP_SEG_STREAM_THRESHOLD`, or a quarter of the physical memory)."""
    if value is not None:
        return _parse_size(value, "`stream_threshold`"), "stream_threshold"
    env = os.environ.get(STREAM_THRESHOLD_ENV)
    if env:
        return _parse_size(env, f"${STREAM_THRESHOLD_ENV}"), f"${STREAM_THRESHOLD_ENV}"
    return int(_DEFAULT_SHARE * physical_memory()), "a quarter of the physical memory"


def estimate_bytes(kind: str, source: Any) -> int:
    """The decoded size of a source before decoding it (see the module docstring): `source`
    is the `FolderPlan` of a folder, the path of LIDC pickles."""
    if kind == "lidc":
        return int(sum(os.path.getsize(f) for f in pickle_files(source)))
    plan: FolderPlan = source
    height, width = plan.header_shape()
    channels = plan.channels or plan.header_channels(first_only=True)
    per_image = height * width * (4 * channels + len(plan.mask_paths[0]))
    return int(len(plan) * per_image)


def release_freed_memory() -> None:
    """Hand the heap memory a decode freed back to the system (glibc `malloc_trim`; a no-op
    elsewhere). Freed memory stays in the process's heap otherwise (the parts' many small
    arrays fragment it), where the training that follows, allocating in other threads'
    arenas, would not reuse it."""
    import ctypes

    try:
        ctypes.CDLL(None).malloc_trim(0)  # the process's own symbols: libc's on Linux
    except (OSError, AttributeError, TypeError):  # not glibc
        pass


def _bound_options(loader, positional: int, options: dict) -> dict:
    """`options` with the loader's defaults filled in (the cache key of the source)."""
    signature = inspect.signature(loader)
    names = list(signature.parameters)[positional:]
    bound = {name: signature.parameters[name].default for name in names}
    bound.update(options)
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in bound.items()}


def load_source(
    kind: str,
    paths: tuple,
    options: dict,
    stream: Optional[bool] = None,
    cache_dir: Optional[str] = None,
    threshold: Any = None,
) -> AnnotatedImages:
    """Users' data of `kind` (`lidc`, `folder`) at `paths`: in memory or streamed (see the
    module docstring). The result's `note` says which and why; a `DiskAnnotatedImages` also
    has its `cache` folder and `cache_status`."""
    if stream not in (None, True, False):
        raise ValueError(f"`stream` must be None (auto), True or False; got {stream!r}.")
    source = plan_image_folder(*paths, **options) if kind == "folder" else paths[0]
    why = "stream=True"
    if stream is None:
        limit, origin = stream_threshold(threshold)
        size = estimate_bytes(kind, source)
        stream = size > limit
        relation = ">" if stream else "<="
        why = (
            f"auto: about {describe_bytes(size)} decoded {relation} the threshold "
            f"{describe_bytes(limit)} ({origin})"
        )
    elif not stream:
        why = "stream=False"
    if not stream:
        data = load_planned(source) if kind == "folder" else load_lidc_crops(source, **options)
        return _with_note(data, f"in memory ({why})")
    max_images = None
    if kind == "lidc":
        max_images = _checks.positive_int(options.get("max_images"), "max_images", optional=True)
    location, status, opened = _cached(kind, paths, options, source, cache_dir)
    del source  # the plan's objects are freed before the ids are read (see cache.read_ids)
    if status != "reused":
        release_freed_memory()
    images, annotations, order, meta = opened
    ids, groups = cache.read_ids(location)
    if max_images is not None:
        keep = min(max_images, len(ids))
        order = (order if order is not None else np.arange(len(ids)))[:keep]
        ids, groups = ids[:keep], None if groups is None else groups[:keep]
    ids = tuple(ids)
    return DiskAnnotatedImages(
        images=MappedArray(images, order),
        annotations=MappedArray(annotations, order),
        ids=ids,
        groups=ids if groups is None else tuple(groups),
        num_classes=int(meta["num_classes"]),
        class_names=tuple(meta["class_names"]),
        note=f"streamed from disk ({why}); cache {location} ({status})",
        cache=location,
        cache_status=status,
    )


def _with_note(data: AnnotatedImages, note: str) -> AnnotatedImages:
    return dataclasses.replace(data, note=note)


def _cached(kind, paths, options, source, cache_dir) -> tuple:
    """`(folder, status, open_cache(...))` of the source's cache: reused if it is complete,
    else decoded (again) into it."""
    root = cache.cache_root(cache_dir)
    if kind == "lidc":
        files = pickle_files(source)
        key_options = {"trusted": bool(options.get("trusted", False))}  # max_images: a view
    else:
        masks = itertools.chain.from_iterable(source.mask_paths)
        files = itertools.chain(source.image_paths, masks)
        key_options = _bound_options(plan_image_folder, 2, options)
    folder = cache.source_folder(root, kind, paths, key_options)
    name = cache.fingerprint(files)
    location = os.path.join(folder, name)
    try:
        return location, "reused", cache.open_cache(location, name)
    except FileNotFoundError:
        status = "decoded"
    except cache.CacheInvalid as exc:
        status = f"rebuilt: {exc}"
    with cache.CacheBuild(folder, name) as build:
        if kind == "lidc":
            decode.decode_lidc(build, source, trusted=key_options["trusted"])
        else:
            decode.decode_folder(build, source)
        build.meta.update(spec=":".join((kind, *paths)), options=key_options)
    return location, status, cache.open_cache(location, name)
