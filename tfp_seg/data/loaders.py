"""Loaders for local copies of multi-annotator segmentation data (nothing is downloaded).

* `load_lidc_crops(path)`: the LIDC-IDRI 128x128 lesion crops with 4 rater masks each, as the
  pickle distributed with the PyTorch reimplementation of the Probabilistic U-Net
  (`data_lidc.pickle`, https://github.com/stefanknegt/Probabilistic-Unet-Pytorch): a dict
  `{image_id: {"image": float [128, 128] in [0, 1], "masks": [4 x uint8 [128, 128]],
  "series_uid": str}}`, possibly split over several `.pickle` files in one folder.
* `load_image_folder(images_dir, masks_dir)`: any folder of images with one or several masks
  per image (`masks_dir/<stem>_<k>.png`, `masks_dir/<stem>/<k>.png` or `masks_dir/<stem>.png`),
  read with Pillow.

Both return `AnnotatedImages`: `images [N, H, W, channels]` float32, `annotations [N, K, H, W]`
(uint8 class ids), with `to_dataset(...)` like `tfp_seg.data.AmbiguousShapes.to_dataset`, and
`split` / `train_val_test` that keep all crops of one patient series (`groups`) in one part.
"""

from __future__ import annotations

import dataclasses
import io
import os
import pickle
import re
from typing import Any, Optional, Sequence, Union

import numpy as np

from tfp_seg.data._dataset import AnnotatedSet, check_fractions

__all__ = ["AnnotatedImages", "load_image_folder", "load_lidc_crops"]

PathLike = Union[str, os.PathLike]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".webp")


# ================================================================================================
# The container
# ================================================================================================


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class AnnotatedImages(AnnotatedSet):
    """Images with K annotations each (several raters), from a real data set.

    Attributes:
      images: float32 `[N, H, W, channels]`.
      annotations: uint8 `[N, K, H, W]`, class ids in `[0, num_classes)`.
      ids: the N image ids (pickle keys, or file stems).
      groups: N group ids (e.g. the LIDC `series_uid`): `split` never puts one group's images
        into two parts. Default: every image its own group.
      num_classes: C.
      class_names: C names.
    """

    images: np.ndarray
    annotations: np.ndarray
    ids: tuple
    groups: tuple = ()
    num_classes: int = 2
    class_names: tuple = ("background", "foreground")

    def __post_init__(self):
        images, ann = self.images, self.annotations
        if images.ndim != 4:
            raise ValueError(f"`images` must be [N, H, W, channels]; got shape {images.shape}.")
        if ann.ndim != 4 or ann.shape[0] != images.shape[0] or ann.shape[2:] != images.shape[1:3]:
            raise ValueError(
                f"`annotations` must be [N, K, H, W] matching images {images.shape}; got shape "
                f"{ann.shape}."
            )
        if len(self.ids) != images.shape[0]:
            raise ValueError(f"`ids` must name all {images.shape[0]} images; got {len(self.ids)}.")
        if not self.groups:
            object.__setattr__(self, "groups", tuple(self.ids))
        if len(self.groups) != images.shape[0]:
            raise ValueError(
                f"`groups` must have one entry per image ({images.shape[0]}); got "
                f"{len(self.groups)}."
            )
        if len(self.class_names) != self.num_classes:
            raise ValueError(
                f"`class_names` must name all {self.num_classes} classes; got "
                f"{list(self.class_names)}."
            )
        if ann.size and int(ann.max()) >= self.num_classes:
            raise ValueError(
                f"`annotations` hold class {int(ann.max())} but num_classes={self.num_classes}."
            )

    def __repr__(self) -> str:
        return (
            f"AnnotatedImages(num_images={len(self)}, image_shape={self.images.shape[1:]}, "
            f"num_annotations={self.num_annotations}, num_classes={self.num_classes})"
        )

    def marginals(self) -> np.ndarray:
        """Empirical per-pixel label distribution over the K raters, float32 `[N, H, W, C]`."""
        onehot = np.eye(self.num_classes, dtype=np.float32)[self.annotations]  # [N,K,H,W,C]
        return onehot.mean(axis=1)

    # --- subsets ----------------------------------------------------------------------------

    def _take(self, idx: np.ndarray) -> AnnotatedImages:
        return dataclasses.replace(
            self,
            images=self.images[idx],
            annotations=self.annotations[idx],
            ids=tuple(self.ids[int(i)] for i in idx),
            groups=tuple(self.groups[int(i)] for i in idx),
        )

    def split(
        self, fractions: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0
    ) -> tuple[AnnotatedImages, ...]:
        """Disjoint random subsets by *group*, of about the given fractions of the images.

        Groups (e.g. all crops of one LIDC series) are shuffled with `seed` and assigned in
        turn to the part that is furthest below its target size, so no group is split and the
        parts are as close to `fractions` as whole groups allow. Images keep their order.
        """
        f = check_fractions(fractions)
        names, inverse = np.unique(np.asarray(self.groups, dtype=object).astype(str),
                                   return_inverse=True)
        sizes = np.bincount(inverse, minlength=len(names))
        order = np.random.default_rng(seed).permutation(len(names))
        targets = f * len(self)
        filled = np.zeros(len(f))
        part_of = np.empty(len(names), np.int64)
        for g in order:
            part = int(np.argmax(targets - filled))
            part_of[g] = part
            filled[part] += sizes[g]
        return tuple(self._take(np.flatnonzero(part_of[inverse] == p)) for p in range(len(f)))

    def train_val_test(self, seed: int = 0) -> tuple[AnnotatedImages, ...]:
        """`split((0.8, 0.1, 0.1), seed)`."""
        return self.split((0.8, 0.1, 0.1), seed=seed)


# ================================================================================================
# LIDC-IDRI crops (pickle)
# ================================================================================================

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


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles only numpy arrays and plain containers (no code execution)."""

    def find_class(self, module, name):
        if (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"refusing to load `{module}.{name}` from the pickle: only numpy arrays, lists and "
            "dicts are expected in the LIDC crops file. If you trust the file, pass trusted=True."
        )


def _read_pickle(path: str, trusted: bool) -> Any:
    with open(path, "rb") as f:
        raw = f.read()
    try:
        if trusted:
            return pickle.loads(raw, encoding="latin1")
        return _ArrayUnpickler(io.BytesIO(raw), encoding="latin1").load()
    except pickle.UnpicklingError as exc:
        raise pickle.UnpicklingError(f"{path}: {exc}") from exc
    except Exception as exc:  # truncated / not a pickle: say which file
        raise ValueError(f"could not read pickle {path}: {type(exc).__name__}: {exc}") from exc


def _pickle_files(path: str) -> list:
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
    if max_images is not None and (isinstance(max_images, bool) or int(max_images) < 1):
        raise ValueError(f"`max_images` must be a positive int or None; got {max_images!r}.")
    entries: dict = {}
    for file in _pickle_files(path):
        content = _read_pickle(file, trusted)
        if not isinstance(content, dict):
            raise ValueError(
                f"{file}: expected a dict {{image_id: {{'image', 'masks'}}}}; got "
                f"{type(content).__name__}."
            )
        entries.update(content)
    if not entries:
        raise ValueError(f"no images in {path!r} (the pickle holds an empty dict)")
    keys = sorted(entries, key=str)
    if max_images is not None:
        keys = keys[: int(max_images)]

    first = None
    images, masks, groups = [], [], []
    for key in keys:
        entry = entries[key]
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
        if first is None:
            first = (key, image.shape, stack.shape[0])
        elif (image.shape, stack.shape[0]) != first[1:]:
            raise ValueError(
                f"LIDC entry {key!r} has image shape {image.shape} and {stack.shape[0]} masks, "
                f"but entry {first[0]!r} has {first[1]} and {first[2]}: all entries must agree."
            )
        if not np.all(np.isfinite(image)):
            raise ValueError(f"LIDC entry {key!r}: 'image' contains NaN or Inf.")
        images.append(image)
        masks.append((stack.astype(np.float32) > 0.5).astype(np.uint8))
        groups.append(str(entry.get("series_uid", key)))
    return AnnotatedImages(
        images=np.stack(images)[..., None],
        annotations=np.stack(masks),
        ids=tuple(str(k) for k in keys),
        groups=tuple(groups),
        num_classes=2,
        class_names=("background", "lesion"),
    )


# ================================================================================================
# Image folders (Pillow)
# ================================================================================================


def _natural_key(text: str):
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", text)]


def _list_images(folder: str, extensions: Sequence[str]) -> list:
    return sorted(
        (f for f in os.listdir(folder)
         if os.path.isfile(os.path.join(folder, f)) and f.lower().endswith(tuple(extensions))),
        key=_natural_key,
    )


def _find_masks(stem: str, masks_dir: str, listing: list, extensions: Sequence[str]) -> list:
    """Mask files of one image: `<stem>/<any>`, `<stem>_<k>.<ext>` or `<stem>.<ext>`."""
    sub = os.path.join(masks_dir, stem)
    numbered = [f for f in listing if re.fullmatch(re.escape(stem) + r"_(\d+)\.[^.]+", f)]
    single = [f for f in listing if os.path.splitext(f)[0] == stem]
    layouts = []
    if os.path.isdir(sub):
        inside = _list_images(sub, extensions)
        layouts.append([os.path.join(sub, f) for f in inside])
    if numbered:
        layouts.append([os.path.join(masks_dir, f) for f in sorted(numbered, key=_natural_key)])
    if single:
        layouts.append([os.path.join(masks_dir, f) for f in single])
    layouts = [x for x in layouts if x]
    if len(layouts) > 1:
        raise ValueError(
            f"masks of image {stem!r} are ambiguous: found both "
            f"{[os.path.relpath(p, masks_dir) for p in layouts[0]]} and "
            f"{[os.path.relpath(p, masks_dir) for p in layouts[1]]}; keep one layout"
        )
    return layouts[0] if layouts else []


def _read_image(path: str, channels: Optional[int], normalize: str) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("P", "PA"):
                im = im.convert("RGBA" if "transparency" in im.info else "RGB")
            if im.mode in ("LA", "RGBA"):
                im = im.convert("L" if im.mode == "LA" else "RGB")
            if im.mode == "CMYK" or im.mode == "YCbCr":
                im = im.convert("RGB")
            arr = np.asarray(im)
    except OSError as exc:
        raise ValueError(f"could not read image {path}: {exc}") from exc
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3:
        raise ValueError(f"image {path} has unsupported shape {arr.shape}")
    if channels == 3 and arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    elif channels == 1 and arr.shape[-1] == 3:
        arr = (arr.astype(np.float64) @ np.array([0.299, 0.587, 0.114]))[..., None]
    elif channels is not None and arr.shape[-1] != channels:
        raise ValueError(f"image {path} has {arr.shape[-1]} channels; cannot make {channels}")
    dtype = arr.dtype
    arr = arr.astype(np.float32)
    if normalize == "dtype" and np.issubdtype(dtype, np.integer):
        arr /= float(np.iinfo(dtype).max)
    elif normalize == "minmax":
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
    return arr


def _read_mask(path: str, binarize: bool, num_classes: Optional[int]) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("RGBA", "LA"):
                im = im.convert("RGB" if im.mode == "RGBA" else "L")
            arr = np.asarray(im)  # "P": palette indices (class ids)
    except OSError as exc:
        raise ValueError(f"could not read mask {path}: {exc}") from exc
    if arr.ndim == 3:
        if not binarize:
            raise ValueError(
                f"mask {path} is a colour image ({arr.shape}); with binarize=False masks must be "
                "single-channel label maps (or palette PNGs) of class ids"
            )
        arr = arr.max(axis=-1)
    if binarize:
        return (arr > 0).astype(np.uint8)
    if not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_):
        raise ValueError(f"mask {path} holds non-integer values ({arr.dtype}); expected class ids")
    if arr.min() < 0 or (num_classes is not None and arr.max() >= num_classes):
        raise ValueError(
            f"mask {path} holds class ids in [{arr.min()}, {arr.max()}]; expected [0, "
            f"{num_classes})"
        )
    if arr.max() > 255:
        raise ValueError(f"mask {path} holds class ids up to {arr.max()}; at most 255 supported")
    return arr.astype(np.uint8)


def _resize(arr: np.ndarray, size: tuple, nearest: bool) -> np.ndarray:
    from PIL import Image

    h, w = size
    if arr.shape[:2] == (h, w):
        return arr
    resample = Image.Resampling.NEAREST if nearest else Image.Resampling.BILINEAR
    if arr.ndim == 2:
        return np.asarray(Image.fromarray(arr).resize((w, h), resample))
    planes = [np.asarray(Image.fromarray(arr[..., c]).resize((w, h), resample))
              for c in range(arr.shape[-1])]
    return np.stack(planes, axis=-1)


def load_image_folder(
    images_dir: PathLike,
    masks_dir: PathLike,
    *,
    binarize: bool = True,
    num_classes: Optional[int] = None,
    class_names: Optional[Sequence[str]] = None,
    channels: Optional[int] = None,
    normalize: str = "dtype",
    image_size: Optional[Union[int, tuple]] = None,
    extensions: Sequence[str] = IMAGE_EXTENSIONS,
    strict: bool = True,
) -> AnnotatedImages:
    """Load a folder of images with one or several masks (raters) per image, using Pillow.

    For an image `images_dir/<stem>.<ext>` its masks are, in this order of layouts (exactly
    one may be present; the others are an error):

    ```none
    masks_dir/<stem>/<anything>.<ext>   all images in the subfolder, natural sort order
    masks_dir/<stem>_<k>.<ext>          k = 0, 1, 2, ... (natural sort order)
    masks_dir/<stem>.<ext>              a single mask
    ```

    Every image must have the same number K of masks and masks the size of their image.

    Args:
      images_dir: folder of images (PNG, JPEG, TIFF incl. 16-bit, BMP, ...).
      masks_dir: folder of masks.
      binarize: `True`: any non-zero mask value (instance ids, 255, colours) is the foreground,
        class 1 (2 classes). `False`: mask values are class ids (single-channel or palette
        PNGs), `num_classes` defaults to the largest id + 1.
      num_classes: C (checked against the masks).
      class_names: C names; default "background", "foreground" / "class c".
      channels: 1 or 3 to convert every image; default 3 if any image is colour, else 1.
      normalize: `"dtype"` (integers divided by their dtype's maximum, e.g. 255; floats kept),
        `"minmax"` (each image to `[0, 1]`), or `"none"`.
      image_size: resize everything to `size` or `(H, W)` (bilinear images, nearest masks);
        default: all images must already have one size.
      extensions: file endings of images and masks.
      strict: mask files in `masks_dir` that belong to no image are an error (typo guard).

    Returns:
      `AnnotatedImages` (images float32 `[N, H, W, channels]`, annotations uint8
      `[N, K, H, W]`, `ids` the image stems).

    Raises:
      FileNotFoundError: a folder is missing, it holds no images, or an image has no mask
        (the message names the image and the paths tried).
      ValueError: a mask's size differs from its image's, images differ in size, images have
        different numbers of masks, stray masks, bad class ids (messages name the files).
    """
    images_dir, masks_dir = os.fspath(images_dir), os.fspath(masks_dir)
    for name, folder in (("images_dir", images_dir), ("masks_dir", masks_dir)):
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"`{name}` {folder!r} is not a folder")
    if normalize not in ("dtype", "minmax", "none"):
        raise ValueError(f"`normalize` must be 'dtype', 'minmax' or 'none'; got {normalize!r}.")
    if channels not in (None, 1, 3):
        raise ValueError(f"`channels` must be None, 1 or 3; got {channels!r}.")
    if image_size is not None:
        size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        if len(size) != 2 or min(size) < 1:
            raise ValueError(f"`image_size` must be an int or (H, W); got {image_size!r}.")
    else:
        size = None
    files = _list_images(images_dir, extensions)
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(extensions)}) in {images_dir!r}")
    stems = [os.path.splitext(f)[0] for f in files]
    duplicates = sorted({s for s in stems if stems.count(s) > 1})
    if duplicates:
        raise ValueError(f"several images share the stem(s) {duplicates} in {images_dir!r}")
    listing = _list_images(masks_dir, extensions)

    mask_files, claimed = [], {}
    for stem, file in zip(stems, files, strict=True):
        found = _find_masks(stem, masks_dir, listing, extensions)
        if not found:
            raise FileNotFoundError(
                f"no mask for image {os.path.join(images_dir, file)!r}: looked for "
                f"{os.path.join(masks_dir, stem)}/*, {os.path.join(masks_dir, stem)}_<k>.<ext> "
                f"and {os.path.join(masks_dir, stem)}.<ext>"
            )
        for mpath in found:
            if mpath in claimed:
                raise ValueError(
                    f"mask {mpath} fits both image {claimed[mpath]!r} and image {stem!r}; "
                    "rename the files (e.g. masks_dir/<stem>/<k>.png)"
                )
            claimed[mpath] = stem
        mask_files.append(found)
    counts = {len(m) for m in mask_files}
    if len(counts) > 1:
        per = ", ".join(f"{f}: {len(m)}" for f, m in zip(files, mask_files, strict=True))
        raise ValueError(
            f"images have different numbers of masks ({per}); every image needs the same K"
        )
    if strict:
        used = {os.path.relpath(p, masks_dir) for p in claimed}
        stray = [f for f in listing if f not in used]
        stray += [d + os.sep for d in sorted(os.listdir(masks_dir), key=_natural_key)
                  if os.path.isdir(os.path.join(masks_dir, d)) and d not in stems]
        if stray:
            raise ValueError(
                f"mask files without an image in {masks_dir!r}: {stray[:10]}"
                f"{' ...' if len(stray) > 10 else ''} (pass strict=False to ignore them)"
            )

    raw = [_read_image(os.path.join(images_dir, f), None, normalize) for f in files]
    if channels is None:
        channels = 3 if any(a.shape[-1] == 3 for a in raw) else 1
    images, annotations = [], []
    for file, arr, masks in zip(files, raw, mask_files, strict=True):
        path = os.path.join(images_dir, file)
        if arr.shape[-1] != channels:
            arr = _read_image(path, channels, normalize)
        stack = []
        for mpath in masks:
            mask = _read_mask(mpath, binarize, num_classes)
            if mask.shape != arr.shape[:2]:
                raise ValueError(
                    f"mask {mpath} is {mask.shape[1]}x{mask.shape[0]} (WxH) but its image "
                    f"{path} is {arr.shape[1]}x{arr.shape[0]}"
                )
            stack.append(mask if size is None else _resize(mask, size, nearest=True))
        if size is not None:
            arr = _resize(arr, size, nearest=False)
        elif images and arr.shape[:2] != images[0].shape[:2]:
            raise ValueError(
                f"image {path} is {arr.shape[1]}x{arr.shape[0]} but {files[0]} is "
                f"{images[0].shape[1]}x{images[0].shape[0]}; pass image_size= to resize"
            )
        images.append(arr.astype(np.float32))
        annotations.append(np.stack(stack))
    annotations = np.stack(annotations)
    if binarize:
        inferred = 2
    else:
        inferred = max(2, int(annotations.max()) + 1)
    if num_classes is None:
        num_classes = inferred
    elif binarize and num_classes != 2:
        raise ValueError(f"binarize=True gives 2 classes; got num_classes={num_classes}.")
    if class_names is None:
        class_names = (("background", "foreground") if num_classes == 2
                       else ("background",) + tuple(f"class {c}" for c in range(1, num_classes)))
    return AnnotatedImages(
        images=np.stack(images),
        annotations=annotations,
        ids=tuple(stems),
        num_classes=int(num_classes),
        class_names=tuple(class_names),
    )
