"""`load_lidc_crops`: the LIDC-IDRI 128x128 crops pickle of the Probabilistic U-Net
reimplementations, read with a restricted unpickler."""

from __future__ import annotations

import os
import pickle
from typing import Any, Optional

import numpy as np

from tfp_seg import _checks
from tfp_seg.data.annotated_images import AnnotatedImages, PathLike

# ================================================================================================
# LIDC-IDRI crops (pickle)
# ================================================================================================

LIDC_CLASS_NAMES = ("background", "lesion")

# Globals a pickle of numpy arrays, lists and dicts needs; anything else is refused.
_SAFE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "bytearray"),
    ("_codecs", "encode"),
}


class _RefusedGlobal(pickle.UnpicklingError):
    """The pickle names a global outside `_SAFE_GLOBALS`."""


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles only numpy arrays and plain containers (no code execution)."""

    def find_class(self, module, name):
        if (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        raise _RefusedGlobal(
            f"refusing to load `{module}.{name}` from the pickle: only numpy arrays, lists and "
            "dicts are expected in the LIDC crops file. If you trust the file, pass trusted=True."
        )


def _read_pickle(path: str, trusted: bool) -> Any:
    # From the open file, not its bytes read first: the peak is the unpickled objects alone.
    try:
        with open(path, "rb") as f:
            if trusted:
                return pickle.load(f, encoding="latin1")
            return _ArrayUnpickler(f, encoding="latin1").load()
    except _RefusedGlobal as exc:
        raise pickle.UnpicklingError(f"{path}: {exc}") from exc
    except Exception as exc:  # truncated / corrupt / not a pickle: say which file
        raise ValueError(f"could not read pickle {path}: {type(exc).__name__}: {exc}") from exc


def read_part(path: str, trusted: bool) -> dict:
    """The dict `{image_id: entry}` of one pickle file (a `ValueError` names the file if it
    holds anything else)."""
    content = _read_pickle(path, trusted)
    if not isinstance(content, dict):
        raise ValueError(
            f"{path}: expected a dict {{image_id: {{'image', 'masks'}}}}; got "
            f"{type(content).__name__}."
        )
    return content


def decode_entry(key: Any, entry: Any) -> tuple:
    """`(image float32 [H, W], masks uint8 [K, H, W] (mask > 0.5 -> 1), group str)` of one
    entry, checked; a `ValueError` names the image id."""
    if not isinstance(entry, dict) or "image" not in entry or "masks" not in entry:
        found = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
        raise ValueError(
            f"LIDC entry {key!r}: expected a dict with 'image' and 'masks'; got {found}."
        )
    image = np.asarray(entry["image"], dtype=np.float32)
    try:
        stack = np.stack([np.asarray(m) for m in entry["masks"]])
    except ValueError as exc:
        raise ValueError(f"LIDC entry {key!r}: its masks differ in shape ({exc}).") from exc
    if image.ndim != 2:
        raise ValueError(f"LIDC entry {key!r}: 'image' must be [H, W]; got {image.shape}.")
    if stack.ndim != 3 or stack.shape[1:] != image.shape:
        raise ValueError(
            f"LIDC entry {key!r}: 'masks' must be K masks of the image's shape "
            f"{image.shape}; got {stack.shape}."
        )
    if not np.all(np.isfinite(image)):
        raise ValueError(f"LIDC entry {key!r}: 'image' contains NaN or Inf.")
    masks = (stack.astype(np.float32) > 0.5).astype(np.uint8)
    return image, masks, str(entry.get("series_uid", key))


def check_agreement(first: Optional[tuple], key: Any, image, masks) -> tuple:
    """`first` = `(key, image shape, K)` of the first entry (set from this one if None); a
    `ValueError` names both entries if this one's image shape or number of masks differs."""
    if first is None:
        return (key, image.shape, masks.shape[0])
    if (image.shape, masks.shape[0]) != first[1:]:
        raise ValueError(
            f"LIDC entry {key!r} has image shape {image.shape} and {masks.shape[0]} masks, "
            f"but entry {first[0]!r} has {first[1]} and {first[2]}: all entries must agree."
        )
    return first


def pickle_files(path: str) -> list:
    """The pickle files of `path`: the file itself, or a folder's `.pickle` / `.pkl` files
    sorted by name (a `FileNotFoundError` says what is missing)."""
    if os.path.isfile(path):
        return [path]
    if os.path.isdir(path):
        files = sorted(
            os.path.join(path, f) for f in os.listdir(path) if f.endswith((".pickle", ".pkl"))
        )
        if not files:
            raise FileNotFoundError(f"no .pickle / .pkl files in folder {path!r}")
        return files
    raise FileNotFoundError(
        f"LIDC crops not found at {path!r}: pass the data_lidc.pickle file or its folder "
        "(nothing is downloaded)"
    )


def load_lidc_crops(
    path: PathLike,
    max_images: Optional[int] = None,
    trusted: bool = False,
) -> AnnotatedImages:
    """Load the LIDC-IDRI 128x128 crops with 4 rater masks per image from a local pickle.

    The file is the `data_lidc.pickle` used by the PyTorch Probabilistic U-Net
    reimplementation (and many papers after it): a dict keyed by image id, each value a dict
    with `"image"` (float `[H, W]`, values in `[0, 1]`), `"masks"` (a list of K binary
    `[H, W]` masks, K = 4 for LIDC) and optionally `"series_uid"`. A folder is read as the
    union of its `.pickle` / `.pkl` files (the data are sometimes split in parts).

    Pickles can run code when loaded: by default only numpy arrays and plain containers are
    accepted (a `pickle.UnpicklingError` names anything else); `trusted=True` uses plain
    `pickle` for files you trust that need more.

    Args:
      path: the pickle file, or a folder of pickle files.
      max_images: keep only the first `max_images` ids (sorted), e.g. for a quick look.
      trusted: allow arbitrary pickled objects.

    Returns:
      `AnnotatedImages` with images float32 `[N, H, W, 1]`, annotations uint8 `[N, K, H, W]`
      (mask > 0.5 -> 1), `ids` the sorted keys, `groups` the `series_uid`s (so that
      `train_val_test` keeps every series in one part), 2 classes (background, lesion).

    Raises:
      FileNotFoundError: nothing at `path`.
      ValueError: an entry lacks `"image"` / `"masks"`, or its shape or number of masks
        differs from the others (the message names the image id).
    """
    path = os.fspath(path)
    max_images = _checks.positive_int(max_images, "max_images", optional=True)
    entries: dict = {}
    for file in pickle_files(path):
        entries.update(read_part(file, trusted))
    if not entries:
        raise ValueError(f"no images in {path!r} (the pickle holds an empty dict)")
    keys = sorted(entries, key=str)
    if max_images is not None:
        keys = keys[: int(max_images)]

    first = None
    images, masks, groups = [], [], []
    for key in keys:
        image, stack, group = decode_entry(key, entries[key])
        first = check_agreement(first, key, image, stack)
        images.append(image)
        masks.append(stack)
        groups.append(group)
    return AnnotatedImages(
        images=np.stack(images)[..., None],
        annotations=np.stack(masks),
        ids=tuple(str(k) for k in keys),
        groups=tuple(groups),
        num_classes=2,
        class_names=LIDC_CLASS_NAMES,
    )
