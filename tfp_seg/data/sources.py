"""Data sources by name: `load(spec)` and the seeded, recorded train / validation / test split.

A *spec* names where the images and their raters' masks come from, as `tfp-seg ... --data SPEC`
and a config's `data:` field take it:

```none
builtin                     the exact-distribution benchmark (tfp_seg.data.ambiguous_shapes)
lidc:PATH                   the LIDC-IDRI crops pickle (data_lidc.pickle, or a folder of parts;
                            tfp_seg.data.load_lidc_crops)
folder:IMAGES_DIR:MASKS_DIR a folder of images and a folder of one or several masks per image
                            (tfp_seg.data.load_image_folder)
nifti:DIR                   NIfTI volumes, a folder per case, a file per modality and a label
                            file (BraTS layout; tfp_seg.data.load_nifti -> NiftiVolumes)
```

Paths are everything after the first colon (`lidc`, `nifti`) or split at the one colon between them
(`folder`); a path that itself holds a colon cannot be named in a spec (load it in Python).

Splits (`split_data`) keep every *group* in one part: the LIDC `series_uid` (one patient
series: the LIDCv1 protocol's patient split), an image-folder image on its own. The default
fractions are the literature's for real data (60/20/20 for LIDCv1, Kohl et al. 2018 and
Monteiro et al. 2020) and 80/10/10 for the built-in benchmark, as before. `split_record`
is what a run folder stores (`split.json`: the spec, seed, fractions and every part's image
ids), and `select_split` takes a part back out of freshly loaded data, checking that the ids
are still there, so that `tfp-seg evaluate RUN` scores exactly the run's test images.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional, Sequence

import numpy as np

from tfp_seg.data import streamed
from tfp_seg.data._dataset import AnnotatedSet, check_fractions
from tfp_seg.data.ambiguous_shapes import AmbiguousShapes, ambiguous_shapes
from tfp_seg.data.nifti import load_nifti

__all__ = [
    "SOURCE_KINDS",
    "SPLIT_PARTS",
    "DataSpec",
    "parse_spec",
    "load",
    "default_fractions",
    "split_data",
    "split_record",
    "select_split",
    "image_ids",
]

SOURCE_KINDS = ("builtin", "lidc", "folder", "nifti")
"""The data source kinds `load(spec)` reads: `builtin`, `lidc:PATH`, `folder:IMAGES:MASKS`,
`nifti:DIR`."""
SPLIT_PARTS = ("train", "val", "test")
"""The names of the parts of a split, in order (`split_data`, `select_split`)."""
_FORMS = {
    "builtin": "builtin",
    "lidc": "lidc:PATH (the data_lidc.pickle file or a folder of .pickle parts)",
    "folder": "folder:IMAGES_DIR:MASKS_DIR",
    "nifti": "nifti:DIR (a folder of case folders of .nii.gz files)",
}
_DEFAULT_FRACTIONS = {
    "builtin": (0.8, 0.1, 0.1),
    "lidc": (0.6, 0.2, 0.2),
    "folder": (0.6, 0.2, 0.2),
    "nifti": (0.6, 0.2, 0.2),
}
_OPTIONS = {
    "builtin": ("num_images", "image_size", "num_annotations", "seed"),
    "lidc": ("max_images", "trusted"),
    "folder": (
        "binarize",
        "num_classes",
        "class_names",
        "channels",
        "normalize",
        "image_size",
        "extensions",
        "strict",
    ),
    "nifti": (
        "modalities",
        "label_suffix",
        "label_map",
        "class_names",
        "require_labels",
        "normalize",
    ),
}


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """A parsed data spec: `kind` (one of `SOURCE_KINDS`) and its `paths`."""

    kind: str
    paths: tuple = ()

    def __str__(self) -> str:
        return ":".join((self.kind, *self.paths))


def _spec_error(spec: Any, why: str) -> ValueError:
    forms = "; ".join(_FORMS.values())
    return ValueError(f"`data` spec {spec!r} {why}; expected one of: {forms}.")


def parse_spec(spec: Any) -> DataSpec:
    """`DataSpec` of a spec string (see the module docstring), or a `ValueError` naming the
    expected forms. A `DataSpec` is returned as it is."""
    if isinstance(spec, DataSpec):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise _spec_error(spec, "is not a non-empty string")
    kind, sep, rest = spec.strip().partition(":")
    if kind not in SOURCE_KINDS:
        raise _spec_error(spec, f"names an unknown source {kind!r}")
    if kind == "builtin":
        if sep:
            raise _spec_error(spec, "gives a path, but `builtin` takes none")
        return DataSpec("builtin")
    if kind in ("lidc", "nifti"):
        if not rest:
            raise _spec_error(spec, "gives no path")
        return DataSpec(kind, (rest,))
    parts = rest.split(":")
    if len(parts) != 2 or not all(parts):
        raise _spec_error(spec, "must give exactly two folders, images then masks")
    return DataSpec("folder", tuple(parts))


def load(
    spec: Any = "builtin",
    *,
    stream: Optional[bool] = None,
    cache_dir: Optional[str] = None,
    stream_threshold: Any = None,
    **options: Any,
) -> AnnotatedSet:
    """The data set a spec names: `AmbiguousShapes` for `builtin`, `AnnotatedImages` for the
    others (images `[N, H, W, channels]` float32, annotations `[N, K, H, W]` class ids), in
    memory or streamed from disk (`DiskAnnotatedImages`, an `AnnotatedImages` whose arrays
    stay in memory maps of a decoded cache).

    `options` go to the loader: `builtin` takes `num_images`, `image_size`,
    `num_annotations`, `seed` (`tfp_seg.data.ambiguous_shapes`); `lidc` takes `max_images`,
    `trusted` (`load_lidc_crops`); `folder` takes the keyword arguments of
    `load_image_folder`; `nifti` takes `modalities`, `label_suffix`, `label_map`,
    `class_names`, `require_labels`, `normalize` (`load_nifti`) and returns `NiftiVolumes`
    (always decoded into the disk cache under `cache_dir`; `stream=False` is an error,
    `stream_threshold` does not apply). An option the source does not take is an error naming
    it.

    Streaming (`lidc` and `folder`; `builtin` is generated in memory): `stream=True` decodes
    the source once, image by image or part file by part file, into a cache of `.npy` files
    under `cache_dir` (default `$TFP_SEG_CACHE`, else `~/.cache/tfp_seg`; keyed by the spec,
    the options and the source files' sizes and modification times, written atomically; see
    `tfp_seg.data.cache`) and reads it through memory maps: a later load of the unchanged
    source reuses it, a changed one is decoded again. `stream=False` decodes into memory.
    `stream=None` (auto) streams when the decoded size, estimated before decoding, exceeds
    `stream_threshold` (bytes, `"8GiB"`, `"30%"` of the physical memory; default
    `$TFP_SEG_STREAM_THRESHOLD`, else a quarter of the physical memory:
    `tfp_seg.data.streamed`). The result's `note` says which was done and why.

    Raises:
      ValueError: a malformed spec, an option the source does not take, `stream=True` for
        `builtin`, an unwritable `cache_dir`, or what the loader raises (names the file).
      FileNotFoundError: a path of the spec does not exist (the message names it).
    """
    parsed = parse_spec(spec)
    unknown = sorted(set(options) - set(_OPTIONS[parsed.kind]))
    if unknown:
        raise ValueError(
            f"data source {parsed.kind!r} takes the options {list(_OPTIONS[parsed.kind])}; got "
            f"{unknown}."
        )
    for path in parsed.paths:
        if not os.path.exists(path):
            raise FileNotFoundError(f"`data` spec {str(parsed)!r}: {path!r} does not exist.")
    if parsed.kind == "builtin":
        if stream:
            raise ValueError(
                "`stream=True` does not apply to `builtin` (it is generated in memory); "
                "streaming is for lidc:PATH and folder:IMAGES:MASKS."
            )
        return ambiguous_shapes(**options)
    if parsed.kind == "nifti":
        if stream is False:
            raise ValueError(
                "`stream=False` does not apply to `nifti` (volumes are always decoded into the "
                "disk cache and read as patches); use stream=None or True."
            )
        return load_nifti(parsed.paths[0], cache_dir=cache_dir, **options)
    return streamed.load_source(
        parsed.kind, parsed.paths, options, stream, cache_dir, stream_threshold
    )


def default_fractions(spec: Any) -> tuple:
    """The default train / val / test fractions of a source (80/10/10 builtin, else 60/20/20)."""
    return _DEFAULT_FRACTIONS[parse_spec(spec).kind]


def image_ids(data: AnnotatedSet) -> list:
    """The images' ids as JSON-friendly values: the generation indices of the built-in
    benchmark, the pickle keys or file stems of real data."""
    if isinstance(data, AmbiguousShapes):
        return [int(i) for i in data.indices]
    return [i if isinstance(i, (str, int)) else str(i) for i in data.ids]


def split_data(
    data: AnnotatedSet, fractions: Optional[Sequence[float]] = None, seed: int = 0
) -> tuple:
    """`(train, val, test)` subsets of `data` by group (see the module docstring), reproducible
    from `seed`. `fractions` default to 80/10/10 for the built-in benchmark (as
    `AmbiguousShapes.train_val_test`) and 60/20/20 for real data.

    Raises:
      ValueError: `fractions` not three non-negative numbers summing to 1, or a part that
        would be empty (too few images or groups for the fractions).
    """
    if fractions is None:
        fractions = _DEFAULT_FRACTIONS["builtin" if isinstance(data, AmbiguousShapes) else "lidc"]
    f = check_fractions(fractions)
    if f.size != 3:
        raise ValueError(f"`fractions` must give train, val and test; got {tuple(fractions)}.")
    parts = data.split(tuple(f), seed=seed)
    empty = [
        name for name, part, x in zip(SPLIT_PARTS, parts, f, strict=True) if x > 0 and not len(part)
    ]
    if empty:
        raise ValueError(
            f"the split {tuple(float(x) for x in f)} of {len(data)} images leaves "
            f"{', '.join(empty)} empty; use more images or other fractions."
        )
    return parts


def split_record(
    spec: Any, parts: Sequence[AnnotatedSet], fractions: Sequence[float], seed: int
) -> dict:
    """What a run folder records of its data (`split.json`): the spec, the split's seed and
    fractions, and the ids of every part's images, in order."""
    return {
        "data": str(parse_spec(spec)),
        "seed": int(seed),
        "fractions": [float(x) for x in fractions],
        "ids": {name: image_ids(part) for name, part in zip(SPLIT_PARTS, parts, strict=True)},
    }


def select_split(data: AnnotatedSet, record: dict, part: str = "test") -> AnnotatedSet:
    """The images of `record["ids"][part]` (a `split_record`) out of `data`, in the recorded
    order; a `ValueError` names ids that `data` does not hold (the data changed since)."""
    if part not in SPLIT_PARTS:
        raise ValueError(f"`part` must be one of {SPLIT_PARTS}; got {part!r}.")
    try:
        wanted = list(record["ids"][part])
    except (KeyError, TypeError) as exc:
        raise ValueError(f"the split record has no ids of part {part!r}: {exc!r}.") from exc
    position = {key: i for i, key in enumerate(image_ids(data))}
    missing = [key for key in wanted if key not in position]
    if missing:
        shown = ", ".join(repr(k) for k in missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise ValueError(
            f"{len(missing)} of the recorded {part} images are not in the data "
            f"({record.get('data', '?')}): {shown}. The data changed since the split was recorded."
        )
    return data[np.asarray([position[key] for key in wanted], np.int64)]
