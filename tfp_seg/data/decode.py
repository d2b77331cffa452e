"""Decoding users' data into the disk cache (`tfp_seg.data.cache`), one image or one part file
at a time, with the checks and the errors of the in-memory loaders.

```none
decode_lidc(build, path, trusted)   the pickle files in name order, each read, decoded entry by
                                    entry and dropped: peak memory one part file (a single
                                    data_lidc.pickle is one part: split it to bound memory)
decode_folder(build, plan)          image by image, with its K masks: peak memory one image
```

Both append rows to `build`'s `images` / `annotations` arrays and set `build.ids`,
`build.groups`, `build.order` and the classes in `build.meta`, so that the cache holds exactly
what the in-memory loader
returns (`load_lidc_crops`, `load_image_folder`), in its order.
"""

from __future__ import annotations

import numpy as np

from tfp_seg.data import lidc
from tfp_seg.data.cache import CacheBuild
from tfp_seg.data.image_folder import FolderPlan

__all__ = ["decode_folder", "decode_lidc"]


def decode_lidc(build: CacheBuild, path: str, trusted: bool = False) -> None:
    """Decode every entry of the LIDC pickle(s) at `path` into `build`.

    The rows are in decode order (files by name, entries in pickle order); `build.order`
    lists, for the ids sorted as `load_lidc_crops` sorts them, the row of each (an id in
    several parts: its last, as the in-memory loader's `dict.update` keeps). Every entry is
    checked as `load_lidc_crops` checks it (errors name the entry or file).
    """
    images = annotations = first = None
    keys: list = []
    groups: list = []
    for file in lidc.pickle_files(path):
        content = lidc.read_part(file, trusted)
        for key, entry in content.items():
            image, masks, group = lidc.decode_entry(key, entry)
            first = lidc.check_agreement(first, key, image, masks)
            if images is None:
                images = build.array("images", (*image.shape, 1), np.float32)
                annotations = build.array("annotations", masks.shape, np.uint8)
            images.append(image[..., None])
            annotations.append(masks)
            keys.append(key)
            groups.append(group)
        del content
    if not keys:
        raise ValueError(f"no images in {path!r} (the pickle holds an empty dict)")
    last = {key: row for row, key in enumerate(keys)}
    ordered = sorted(last, key=str)
    rows = [last[key] for key in ordered]
    build.order = np.asarray(rows, np.int64)
    build.ids = [str(key) for key in ordered]
    build.groups = [groups[row] for row in rows]
    build.meta.update(num_classes=2, class_names=list(lidc.LIDC_CLASS_NAMES))


def decode_folder(build: CacheBuild, plan: FolderPlan) -> None:
    """Decode the images and masks of `plan` (`plan_image_folder`) into `build`, one image
    at a time, as `load_image_folder` decodes them (same channels: from the files' headers
    when not given; same checks and errors)."""
    channels = plan.header_channels()
    images = annotations = reference = None
    max_label = 0
    for i in range(len(plan)):
        image, masks = plan.decode(i, channels, reference)
        if images is None:
            reference = image.shape[:2]
            images = build.array("images", image.shape, np.float32)
            annotations = build.array("annotations", masks.shape, np.uint8)
        images.append(image)
        annotations.append(masks)
        max_label = max(max_label, int(masks.max()))
    num_classes, class_names = plan.classes(max_label)
    build.ids = list(plan.stems)  # groups: None, every image its own
    build.meta.update(num_classes=num_classes, class_names=list(class_names))
