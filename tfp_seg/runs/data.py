"""The data of a run: the source its config names (`TrainConfig.data`, a `tfp_seg.data.load`
spec) and its recorded split.

`builtin` is the exact-distribution benchmark the config describes (`num_images`,
`image_size`, `num_annotations`, `seed`), split 80/10/10 as before; `lidc:PATH` and
`folder:IMAGES:MASKS` are users' local data, split 60/20/20 by patient series / image, seeded
with `config.seed`. `train` writes the split to `<run>/split.json` (`SPLIT_FILE`), and
`evaluate` / `sample` of a run take exactly its recorded parts back out of the source (a run
folder without the file, from before the file existed, is split again, which gives the same
parts for the built-in data).

Volumes (`config.spatial_dims == 3`) come from the sources of `VOLUME_LOADERS` (the built-in
benchmark in 3D, `ambiguous_shapes(..., spatial_dims=3)`, and `nifti:DIR`, the cases of
`tfp_seg.data.load_nifti` as a `tfp_seg.runs.volumes.VolumeSet`, split 60/20/20 by case;
`TrainConfig.validate` refuses the others with a clear error): a volume source is a function of
`(spec, config)` that returns the whole data set, volumes `[N, D, H, W, channels]` and
annotations `[N, K, D, H, W]`, with the `AnnotatedSet` methods the split takes.

Users' data are loaded in memory or streamed from a disk cache as `config.stream` says (None:
auto, by their decoded size; `tfp_seg.data.load`), the cache under `config.cache_dir` (default
`$TFP_SEG_CACHE` or `~/.cache/tfp_seg`); the run log says which and why (`describe`), and
`split.json` records whether the run streamed.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Optional

from tfp_seg import data as data_lib
from tfp_seg._io import atomic_write_json
from tfp_seg.runs import volumes
from tfp_seg.runs.config import TrainConfig

__all__ = [
    "SPLIT_FILE",
    "VOLUME_LOADERS",
    "load_source",
    "make_data",
    "evaluation_data",
    "write_split",
    "describe",
]

SPLIT_FILE = "split.json"


def _builtin_volumes(spec, config: TrainConfig):
    return data_lib.ambiguous_shapes(
        num_images=config.num_images,
        image_size=config.image_size,
        num_annotations=config.num_annotations,
        seed=config.seed,
        spatial_dims=3,
    )


VOLUME_LOADERS = {"builtin": _builtin_volumes, "nifti": volumes.load_volume_set}
"""`{source kind: loader(spec, config)}`: the data sources of runs on volumes
(`spatial_dims=3`); the keys are `tfp_seg.runs.config.VOLUME_SOURCES`."""


def load_source(config: TrainConfig):
    """The whole data set of `config.data` (`AmbiguousShapes` or `AnnotatedImages`; volumes
    from `VOLUME_LOADERS` with `config.spatial_dims == 3`).

    Raises:
      ValueError: a bad spec or file (named), a source that gives no volumes for
        `spatial_dims` 3, or images whose size the built-in U-Net cannot take (height and
        width must be divisible by 2**depth).
    """
    spec = data_lib.parse_spec(config.data)
    if config.spatial_dims == 3:
        if spec.kind not in VOLUME_LOADERS:
            raise ValueError(
                f"`data` {str(spec)!r} is not a volume source of runs yet: `spatial_dims` 3 "
                f"takes `data` in {tuple(VOLUME_LOADERS)} for now."
            )
        return VOLUME_LOADERS[spec.kind](spec, config)
    if spec.kind == "builtin":
        return data_lib.load(
            spec,
            num_images=config.num_images,
            image_size=config.image_size,
            num_annotations=config.num_annotations,
            seed=config.seed,
        )
    data = data_lib.load(spec, stream=config.stream, cache_dir=config.cache_dir)
    height, width = data.images.shape[1:3]
    if config.backbone == "unet" and (height % 2**config.depth or width % 2**config.depth):
        raise ValueError(
            f"`data` {str(spec)!r} has images of {height}x{width}, which the U-Net of depth "
            f"{config.depth} cannot take (height and width must be divisible by "
            f"2**depth = {2**config.depth}); choose a smaller --depth."
        )
    return data


def _read_split(run_dir: Optional[str]) -> Optional[dict]:
    path = os.path.join(run_dir, SPLIT_FILE) if run_dir else None
    if path is None or not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as exc:
        raise ValueError(f"could not read the run's split {path!r}: {exc}") from exc


def make_data(config: TrainConfig, run_dir: Optional[str] = None) -> tuple:
    """`(train, val, test)`: the run's recorded split (`<run_dir>/split.json`) when there is
    one, else a fresh seeded split (`tfp_seg.data.split_data` with the source's default
    fractions)."""
    source = load_source(config)
    record = _read_split(run_dir)
    if record is None:
        return data_lib.split_data(
            source, data_lib.sources.default_fractions(config.data), seed=config.seed
        )
    if record.get("data") != str(data_lib.parse_spec(config.data)):
        raise ValueError(
            f"the run's split ({os.path.join(run_dir, SPLIT_FILE)}) was made of data "
            f"{record.get('data')!r}, not of {config.data!r}."
        )
    return tuple(data_lib.select_split(source, record, part) for part in data_lib.SPLIT_PARTS)


def evaluation_data(
    config: TrainConfig,
    run_dir: Optional[str],
    data: Optional[str] = None,
    stream: Optional[bool] = None,
    cache_dir: Optional[str] = None,
):
    """What `tfp-seg evaluate | sample RUN` scores: the run's recorded test split, or with
    `data` (a spec) every image of that source; in memory or streamed as `stream` says (None:
    as the run did, auto for another source), the cache under `cache_dir` (default the run's).
    """
    cache_dir = cache_dir or config.cache_dir
    if data:
        other = dataclasses.replace(config, data=data, stream=stream, cache_dir=cache_dir)
        return load_source(other.validate())
    stream = config.stream if stream is None else stream
    return make_data(dataclasses.replace(config, stream=stream, cache_dir=cache_dir), run_dir)[2]


def write_split(run_dir: str, config: TrainConfig, parts: tuple) -> str:
    """Record the split of `parts` in `<run_dir>/split.json`; returns the path."""
    record = data_lib.split_record(
        config.data, parts, data_lib.sources.default_fractions(config.data), config.seed
    )
    # NIfTI volumes are always read from their disk cache.
    record["stream"] = isinstance(parts[0], (data_lib.DiskAnnotatedImages, volumes.VolumeSet))
    path = os.path.join(run_dir, SPLIT_FILE)
    atomic_write_json(path, record)
    return path


def describe(config: TrainConfig, parts: tuple) -> str:
    """One log line about the run's data."""
    train, val, test = parts
    try:
        size = "x".join(str(n) for n in train.images.shape[1:-1])  # H x W, or D x H x W
    except ValueError:  # NIfTI cases of several shapes (trained on patches)
        size = "(several sizes)"
    source = "ambiguous_shapes" if config.data == "builtin" else config.data
    items = "volumes" if config.spatial_dims == 3 else "images"
    line = (
        f"data: {source} {size}, {len(train)} train / {len(val)} val / {len(test)} test "
        f"{items}, {train.num_annotations} annotations each"
    )
    note = getattr(train, "note", "")
    return f"{line}; {note}" if note else line
