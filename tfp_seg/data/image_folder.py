"""`load_image_folder`: a folder of images with one or several masks per image (Pillow)."""

from __future__ import annotations

import collections
import dataclasses
import os
import re
from typing import Optional, Sequence, Union

import numpy as np

from tfp_seg.data.annotated_images import AnnotatedImages, PathLike

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".webp")


# ================================================================================================
# Image folders (Pillow)
# ================================================================================================


def _natural_key(text: str):
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", text)]


def _list_images(folder: str, extensions: Sequence[str]) -> list:
    ends = tuple(extensions)
    with os.scandir(folder) as entries:
        names = [e.name for e in entries if e.name.lower().endswith(ends) and e.is_file()]
    return sorted(names, key=_natural_key)


def _mask_index(listing: list, stems: set) -> tuple:
    """`(numbered, single)`: the files of a mask folder's listing that name an image stem,
    `<stem>_<k>.<ext>` and `<stem>.<ext>`, by stem, in listing order (one pass, so that
    matching N images to their masks takes O(N), not O(N^2))."""
    numbered: dict = {}
    single: dict = {}
    for f in listing:
        base = os.path.splitext(f)[0]
        if base in stems:
            single.setdefault(base, []).append(f)
        match = re.fullmatch(r"(.+)_(\d+)\.[^.]+", f)
        if match and match.group(1) in stems:
            numbered.setdefault(match.group(1), []).append(f)
    return numbered, single


def _find_masks(stem: str, masks_dir: str, index: tuple, extensions: Sequence[str]) -> tuple:
    """`(paths, names)`: the mask files of one image, `<stem>/<any>`, `<stem>_<k>.<ext>` or
    `<stem>.<ext>`, and the names of those directly in `masks_dir` (for the stray check)."""
    sub = os.path.join(masks_dir, stem)
    numbered, single = index[0].get(stem, []), index[1].get(stem, [])
    layouts = []
    if os.path.isdir(sub):
        inside = _list_images(sub, extensions)
        layouts.append(([os.path.join(sub, f) for f in inside], []))
    if numbered:
        names = sorted(numbered, key=_natural_key)
        layouts.append(([os.path.join(masks_dir, f) for f in names], names))
    if single:
        layouts.append(([os.path.join(masks_dir, f) for f in single], single))
    layouts = [x for x in layouts if x[0]]
    if len(layouts) > 1:
        raise ValueError(
            f"masks of image {stem!r} are ambiguous: found both "
            f"{[os.path.relpath(p, masks_dir) for p in layouts[0][0]]} and "
            f"{[os.path.relpath(p, masks_dir) for p in layouts[1][0]]}; keep one layout"
        )
    return layouts[0] if layouts else ([], [])


def _conversions(mode: str, info: dict) -> list:
    """The modes an image of `mode` is converted to in turn before it becomes an array:
    palettes to RGB(A), alpha dropped, CMYK / YCbCr to RGB."""
    steps = []
    if mode in ("P", "PA"):
        mode = "RGBA" if "transparency" in info else "RGB"
        steps.append(mode)
    if mode in ("LA", "RGBA"):
        mode = "L" if mode == "LA" else "RGB"
        steps.append(mode)
    if mode in ("CMYK", "YCbCr"):
        steps.append("RGB")
    return steps


def _converted_mode(im) -> str:
    """The mode `_read_image` turns an opened image into, from its header alone."""
    steps = _conversions(im.mode, im.info)
    return steps[-1] if steps else im.mode


def _read_image(path: str, channels: Optional[int], normalize: str) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            for mode in _conversions(im.mode, im.info):
                im = im.convert(mode)
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
    planes = [
        np.asarray(Image.fromarray(arr[..., c]).resize((w, h), resample))
        for c in range(arr.shape[-1])
    ]
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
    plan = plan_image_folder(
        images_dir,
        masks_dir,
        binarize=binarize,
        num_classes=num_classes,
        class_names=class_names,
        channels=channels,
        normalize=normalize,
        image_size=image_size,
        extensions=extensions,
        strict=strict,
    )
    return load_planned(plan)


def load_planned(plan: FolderPlan) -> AnnotatedImages:
    """`load_image_folder` of a `plan_image_folder` plan: every image decoded into memory."""
    raw = [_read_image(path, None, plan.normalize) for path in plan.image_paths]
    channels = plan.channels
    if channels is None:
        channels = 3 if any(a.shape[-1] == 3 for a in raw) else 1
    images, annotations = [], []
    for i, arr in enumerate(raw):
        reference = images[0].shape[:2] if images else None
        image, stack = plan.decode(i, channels, reference, arr)
        images.append(image)
        annotations.append(stack)
    annotations = np.stack(annotations)
    num_classes, class_names = plan.classes(int(annotations.max()))
    return AnnotatedImages(
        images=np.stack(images),
        annotations=annotations,
        ids=tuple(plan.stems),
        num_classes=num_classes,
        class_names=class_names,
    )


@dataclasses.dataclass(frozen=True)
class FolderPlan:
    """What `load_image_folder` reads, found and checked before any pixel is decoded: the
    image files in order, the K mask files of each, and the options.

    `image_paths[i]` is image `i` (id `stems[i]`), `mask_paths[i]` its K masks; `size` is the
    `(H, W)` of `image_size` or None.
    """

    image_paths: tuple
    mask_paths: tuple
    stems: tuple
    size: Optional[tuple]
    binarize: bool
    num_classes: Optional[int]
    class_names: Optional[tuple]
    channels: Optional[int]
    normalize: str

    def __len__(self) -> int:
        return len(self.image_paths)

    def decode(
        self, i: int, channels: int, reference: Optional[tuple], raw: Optional[np.ndarray] = None
    ) -> tuple:
        """`(image float32 [H, W, channels], masks uint8 [K, H, W])` of image `i`, resized to
        `size` if given, else checked to be `reference` `(H, W)` (the first image's; None for
        the first). `raw`: the image already read with `channels=None`, if at hand."""
        path = self.image_paths[i]
        arr = raw if raw is not None else _read_image(path, None, self.normalize)
        if arr.shape[-1] != channels:
            arr = _read_image(path, channels, self.normalize)
        stack = []
        for mpath in self.mask_paths[i]:
            mask = _read_mask(mpath, self.binarize, self.num_classes)
            if mask.shape != arr.shape[:2]:
                raise ValueError(
                    f"mask {mpath} is {mask.shape[1]}x{mask.shape[0]} (WxH) but its image "
                    f"{path} is {arr.shape[1]}x{arr.shape[0]}"
                )
            stack.append(mask if self.size is None else _resize(mask, self.size, nearest=True))
        if self.size is not None:
            arr = _resize(arr, self.size, nearest=False)
        elif reference is not None and arr.shape[:2] != tuple(reference):
            raise ValueError(
                f"image {path} is {arr.shape[1]}x{arr.shape[0]} but "
                f"{os.path.basename(self.image_paths[0])} is {reference[1]}x{reference[0]}; "
                "pass image_size= to resize"
            )
        return arr.astype(np.float32), np.stack(stack)

    def header_channels(self, first_only: bool = False) -> int:
        """The `channels` of `load_image_folder`'s default, from the image files' headers
        alone (no pixel is decoded): 3 if any image (`first_only`: the first) reads as
        colour, else 1."""
        if self.channels is not None:
            return self.channels
        from PIL import Image

        for path in self.image_paths[:1] if first_only else self.image_paths:
            try:
                with Image.open(path) as im:
                    if Image.getmodebands(_converted_mode(im)) == 3:
                        return 3
            except OSError as exc:
                raise ValueError(f"could not read image {path}: {exc}") from exc
        return 1

    def header_shape(self) -> tuple:
        """`(H, W)` of the decoded images: `size`, or the first image's from its header."""
        if self.size is not None:
            return tuple(self.size)
        from PIL import Image

        try:
            with Image.open(self.image_paths[0]) as im:
                return (im.height, im.width)
        except OSError as exc:
            raise ValueError(f"could not read image {self.image_paths[0]}: {exc}") from exc

    def classes(self, max_label: int) -> tuple:
        """`(num_classes, class_names)` given the largest class id of all masks."""
        inferred = 2 if self.binarize else max(2, int(max_label) + 1)
        num_classes = self.num_classes
        if num_classes is None:
            num_classes = inferred
        elif self.binarize and num_classes != 2:
            raise ValueError(f"binarize=True gives 2 classes; got num_classes={num_classes}.")
        class_names = self.class_names
        if class_names is None:
            class_names = (
                ("background", "foreground")
                if num_classes == 2
                else ("background",) + tuple(f"class {c}" for c in range(1, num_classes))
            )
        return int(num_classes), tuple(class_names)


def plan_image_folder(
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
) -> FolderPlan:
    """The `FolderPlan` of `load_image_folder(...)` (same arguments, same errors about the
    folders, the options and the files' layout), reading no pixel."""
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
    duplicates = sorted(s for s, n in collections.Counter(stems).items() if n > 1)
    if duplicates:
        raise ValueError(f"several images share the stem(s) {duplicates} in {images_dir!r}")
    listing = _list_images(masks_dir, extensions)
    known = set(stems)
    index = _mask_index(listing, known)

    mask_files, claimed, used = [], {}, set()
    for stem, file in zip(stems, files, strict=True):
        found, names = _find_masks(stem, masks_dir, index, extensions)
        used.update(names)
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
        stray = [f for f in listing if f not in used]
        stray += [
            d + os.sep
            for d in sorted(os.listdir(masks_dir), key=_natural_key)
            if os.path.isdir(os.path.join(masks_dir, d)) and d not in known
        ]
        if stray:
            raise ValueError(
                f"mask files without an image in {masks_dir!r}: {stray[:10]}"
                f"{' ...' if len(stray) > 10 else ''} (pass strict=False to ignore them)"
            )

    return FolderPlan(
        image_paths=tuple(os.path.join(images_dir, f) for f in files),
        mask_paths=tuple(tuple(m) for m in mask_files),
        stems=tuple(stems),
        size=size,
        binarize=bool(binarize),
        num_classes=num_classes,
        class_names=None if class_names is None else tuple(class_names),
        channels=channels,
        normalize=normalize,
    )
