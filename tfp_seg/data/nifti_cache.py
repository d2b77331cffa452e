"""The disk cache of decoded NIfTI cases (`tfp_seg.data.load_nifti`): one folder per case,
decoded once, opened as read-only memory maps and checked before use.

```none
<root>/nifti-<source key>/<case id>/<fingerprint>/
    image.npy        float32 [D, H, W, M]   the (normalised) modalities
    brain.npy        bool [D, H, W]         the brain mask (any modality non-zero)
    label.npy        uint8 [D, H, W]        class ids (labelled cases only)
    brain_index.npy  int [num_brain]        flat C-order indices of the brain voxels
    class_index.npy  int [n_fg]             flat indices of the brain voxels of classes
                                            1..C-1, class by class (ascending in a class):
                                            class c at [sum(counts[1:c]), sum(counts[1:c+1]))
    meta.json        written last: format, fingerprint, case id, files, shape, class_counts
                     (brain voxels per class), num_brain, every array's shape, dtype, bytes
```

The pieces are those of `tfp_seg.data.cache`: the root (`cache_dir`, `$TFP_SEG_CACHE`, ...),
the source key (a hash of the folder and the loader's options plus this layout's `FORMAT`),
the fingerprint (the case's files' paths, sizes and modification times), the atomic write of a
folder (`tfp_seg._io.atomic_dir`, an `owner.json` while it is written) and, after a decode,
the removal of the case's other versions and of interrupted decodes. Opening checks
`meta.json` and every array's header, dtype, shape and size against it; anything amiss decodes
the case again (`status` `"rebuilt: <why>"`). Indices are int32 when the volume has fewer than
2^31 voxels, else int64.
"""

from __future__ import annotations

import dataclasses
import os
import socket
from typing import Callable, Optional

import numpy as np

from tfp_seg._io import atomic_dir, atomic_write_json
from tfp_seg.data import cache

__all__ = ["FORMAT", "NiftiCase", "cached_case", "open_case", "sampling_indices", "source_root"]

FORMAT = 1  # this layout's version: a new value decodes every case again


@dataclasses.dataclass(frozen=True)
class NiftiCase:
    """One decoded case: its id, cache folder, shape `(D, H, W)`, whether it has labels, the
    number of brain voxels of each class (`class_counts`, C of them; zeros without labels),
    the number of brain voxels, and how its cache was found (`"decoded"`, `"reused"` or
    `"rebuilt: <why>"`)."""

    case_id: str
    cache: str
    shape: tuple
    has_label: bool
    class_counts: tuple
    num_brain: int
    status: str


def source_root(cache_dir: Optional[str], directory: str, options: dict) -> str:
    """`<root>/nifti-<key>`: the folder of one NIfTI source's case caches."""
    root = cache.cache_root(cache_dir)
    return cache.source_folder(root, "nifti", [directory], dict(options, format=FORMAT))


def sampling_indices(brain: np.ndarray, label: Optional[np.ndarray], num_classes: int) -> tuple:
    """`(brain_index, class_index, class_counts)` of a case (see the module docstring):
    flat indices of the brain voxels, of its voxels of classes 1..C-1 grouped by class, and
    the number of brain voxels of every class `[C]` (zeros without a label)."""
    flat = brain.reshape(-1)
    dtype = np.int32 if flat.size < 2**31 else np.int64
    brain_index = np.flatnonzero(flat).astype(dtype)
    if label is None:
        return brain_index, np.zeros(0, dtype), np.zeros(num_classes, np.int64)
    classes = label.reshape(-1)[brain_index]
    counts = np.bincount(classes, minlength=num_classes).astype(np.int64)
    foreground = brain_index[classes > 0]
    order = np.argsort(classes[classes > 0], kind="stable")
    return brain_index, foreground[order], counts


def _write(case_root: str, name: str, arrays: dict, meta: dict) -> None:
    """Write one case's folder `<case_root>/<name>` atomically, `meta.json` last."""
    try:
        os.makedirs(case_root, exist_ok=True)
        with atomic_dir(os.path.join(case_root, name)) as tmp:
            owner = os.path.join(tmp, "owner.json")
            atomic_write_json(owner, {"host": socket.gethostname(), "pid": os.getpid()})
            for key, array in arrays.items():
                path = os.path.join(tmp, f"{key}.npy")
                np.save(path, array)
                meta[key] = {
                    "shape": list(array.shape),
                    "dtype": array.dtype.str,
                    "bytes": os.path.getsize(path),
                }
            meta["arrays"] = sorted(arrays)
            os.remove(owner)
            atomic_write_json(os.path.join(tmp, "meta.json"), meta, sort_keys=False)
    except OSError as exc:
        raise cache.unwritable_error(case_root, exc) from exc
    cache.remove_stale(case_root, keep=name)


def open_case(folder: str) -> tuple:
    """`(arrays, meta)` of a complete case folder: read-only memory maps by name and the
    parsed `meta.json`. `FileNotFoundError` if there is no such folder, `cache.CacheInvalid`
    (with the reason) if it is partial, corrupt or of another format."""
    meta = cache.read_meta(folder, FORMAT, os.path.basename(folder), "case")
    if not isinstance(meta.get("arrays"), list):
        raise cache.CacheInvalid("meta.json is of another format or version of the case")
    arrays = {key: cache.open_array(folder, key, meta) for key in meta["arrays"]}
    shape = tuple(meta.get("shape", ()))
    counts = meta.get("class_counts", [])
    if (
        arrays["image"].shape[:3] != shape
        or arrays["brain"].shape != shape
        or ("label" in arrays and arrays["label"].shape != shape)
        or arrays["brain_index"].size != meta.get("num_brain")
        or arrays["class_index"].size != sum(counts[1:])
    ):
        raise cache.CacheInvalid("the arrays do not agree with meta.json's shape and counts")
    return arrays, meta


def cached_case(root: str, files, num_classes: int, decode: Callable[[], dict]) -> NiftiCase:
    """The `NiftiCase` of one case (`files`: its `_CaseFiles`), from its cache if complete,
    else `decode()`d (`{"image", "brain", "label"?}` arrays) and written there first."""
    name = cache.fingerprint(files.files())
    case_root = os.path.join(root, files.case_id)
    folder = os.path.join(case_root, name)
    try:
        _, meta = open_case(folder)
        status = "reused"
    except FileNotFoundError:
        meta, status = None, "decoded"
    except cache.CacheInvalid as exc:
        meta, status = None, f"rebuilt: {exc}"
    if meta is None:
        arrays = decode()
        label = arrays.get("label")
        brain_index, class_index, counts = sampling_indices(arrays["brain"], label, num_classes)
        arrays.update(brain_index=brain_index, class_index=class_index)
        meta = {
            "format": FORMAT,
            "fingerprint": name,
            "case_id": files.case_id,
            "files": [os.path.abspath(p) for p in files.files()],
            "shape": list(arrays["brain"].shape),
            "class_counts": [int(c) for c in counts],
            "num_brain": int(brain_index.size),
        }
        _write(case_root, name, arrays, meta)
        del arrays
    return NiftiCase(
        case_id=files.case_id,
        cache=folder,
        shape=tuple(meta["shape"]),
        has_label="label" in meta["arrays"],
        class_counts=tuple(meta["class_counts"]),
        num_brain=int(meta["num_brain"]),
        status=status,
    )
