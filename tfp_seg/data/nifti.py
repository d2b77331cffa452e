"""NIfTI volumes in the BraTS layout, read with nibabel: `load_nifti(DIR)` -> `NiftiVolumes`.

```none
DIR/<case>/<case>_<modality>.nii.gz   one file per modality (or .nii): the channels, in the
                                      order of `modalities` (BraTS: flair, t1, t1ce, t2)
DIR/<case>/<case>_seg.nii.gz          the label map (`<case>_<label_suffix>`); values become
                                      classes through `label_map` (BraTS: 0, 1, 2, 4 -> 0..3)
```

The case id is the folder name; cases are in sorted order. Other files in `DIR` or in a case
folder, and folders whose name starts with a dot, are ignored.

**Axis order.** nibabel gives a file's voxels in its index order `[X, Y, Z]` (`i, j, k`). The
arrays here are that array transposed to `[Z, Y, X]`, which is `[D, H, W]` of the library's
volume convention (`[B, D, H, W, channels]`) and the order of SimpleITK's `GetArrayFromImage`,
which the official SSN code reads with: voxel `(d, h, w)` is the file's voxel `(i, j, k) = (w,
h, d)`. Volumes are not reoriented (no `as_closest_canonical`); the files' affine maps `(i, j,
k)` to world coordinates.

**Brain mask and normalisation** (the official SSN preprocessing): the brain mask is the set
of voxels where any modality is non-zero; with `normalize=True` every modality `m` becomes
`(x - mean_m) / std_m` over the brain voxels (population std), and 0 outside the brain (a
modality constant inside the brain becomes 0 there). The official script also leaves the 5% /
95% percentiles and voxels below the mean out of the statistics; this one uses every brain
voxel. The mask is kept with each case: it is the SSN head's `roi_mask` (`to_patch_dataset`
feeds it as `{"images": ..., "roi_mask": ...}`).

**Validation.** Every problem of a case is one `ValueError` naming the case folder and the
file: a missing modality or label file (labels may be missing only with
`require_labels=False`), a file nibabel cannot read, data not 3-D (a 4-D file), an affine that
is not a finite, invertible 4x4 matrix, modalities of different shapes, a label map of another
shape, NaN or infinite voxels, no non-zero voxel, non-integer label values or values
`label_map` does not map. An empty `DIR` is a `ValueError` too. Headers of all cases are checked
before anything is decoded.

**Cache** (`tfp_seg.data.nifti_cache`): each case is decoded once into `.npy` files read
through memory maps; a later load of unchanged files reuses them, a changed case is decoded
again.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from tfp_seg.data import nifti_cache, nifti_decode, patches
from tfp_seg.data.annotated_images import group_split
from tfp_seg.data.nifti_cache import NiftiCase
from tfp_seg.data.nifti_decode import normalize_in_mask

__all__ = [
    "BRATS_CLASS_NAMES",
    "BRATS_LABEL_MAP",
    "BRATS_MODALITIES",
    "NiftiCase",
    "NiftiVolumes",
    "load_nifti",
    "normalize_in_mask",
]

BRATS_MODALITIES = ("flair", "t1", "t1ce", "t2")
"""The BraTS modalities, in the channel order of the official SSN code."""
BRATS_LABEL_MAP = {0: 0, 1: 1, 2: 2, 4: 3}
"""BraTS label values -> classes (4, the enhancing tumour, becomes class 3)."""
BRATS_CLASS_NAMES = (
    "background",
    "necrotic and non-enhancing tumour core",
    "oedema",
    "enhancing tumour",
)
"""The names of the classes of `BRATS_LABEL_MAP`."""
# ================================================================================================
# The container
# ================================================================================================


def _label_map(label_map: Optional[Mapping]) -> dict:
    if label_map is None:
        return dict(BRATS_LABEL_MAP)
    form = "a mapping of label values to class ids 0..C-1 (C <= 256), e.g. {0: 0, 1: 1, 4: 3}"
    try:
        items = [(int(k), int(v)) for k, v in dict(label_map).items()]
    except (TypeError, ValueError) as exc:
        raise ValueError(f"`label_map` must be {form}; got {label_map!r}.") from exc
    classes = {v for _, v in items}
    if not items or classes != set(range(len(classes))) or len(classes) > 256:
        raise ValueError(f"`label_map` must be {form}; got {label_map!r}.")
    return dict(items)


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class NiftiVolumes:
    """Decoded NIfTI cases (`load_nifti`), read through memory maps when asked for.

    `len(volumes)`, `ids` / `groups` (the case ids: every case its own group), `volume(i)`,
    subsets `volumes[idx]` (slices, index arrays, masks), `split(fractions, seed)` (by case,
    seeded: `tfp_seg.data.split_data` / `split_record` / `select_split` work on it) and
    `to_patch_dataset(...)` (random patches through `tf.data`, `tfp_seg.data.patches`).

    Attributes:
      cases: one `NiftiCase` per case.
      modalities: the channel names, in order (M of them).
      num_classes / class_names: C, and their names.
      label_map: label value -> class.
      directory: the source folder.
      note: how the load went (cases decoded / reused), one line for logs.
    """

    cases: tuple
    modalities: tuple
    num_classes: int
    class_names: tuple
    label_map: dict
    directory: str = ""
    note: str = ""

    def __post_init__(self):
        object.__setattr__(self, "_maps", {})

    def __len__(self) -> int:
        return len(self.cases)

    def __repr__(self) -> str:
        return (
            f"NiftiVolumes(num_cases={len(self)}, modalities={self.modalities}, "
            f"num_classes={self.num_classes}, directory={self.directory!r})"
        )

    @property
    def ids(self) -> tuple:
        """The case ids (folder names), in order."""
        return tuple(c.case_id for c in self.cases)

    @property
    def groups(self) -> tuple:
        """The split groups: the case ids (a case is one patient scan)."""
        return self.ids

    @property
    def cache_status(self) -> tuple:
        """Each case's cache status (`"decoded"`, `"reused"` or `"rebuilt: <why>"`)."""
        return tuple(c.status for c in self.cases)

    def arrays(self, i: int) -> dict:
        """The read-only memory maps of case `i`: `image [D, H, W, M]`, `brain [D, H, W]`,
        `label [D, H, W]` uint8 (if labelled), `brain_index [num_brain]` and `class_index`
        (flat indices of the brain voxels, and of its foreground voxels grouped by class:
        `tfp_seg.data.nifti_cache`). Opened once per container."""
        if not -len(self) <= int(i) < len(self):
            raise IndexError(f"case {int(i)} out of range for {len(self)} cases")
        case = self.cases[int(i)]
        maps = self._maps.get(case.cache)
        if maps is None:
            maps = nifti_cache.open_case(case.cache)[0]
            self._maps[case.cache] = maps
        return maps

    def volume(self, i: int) -> tuple:
        """`(image, label, brain)` of case `i`: image float32 `[D, H, W, M]` (a read-only
        memory map), label int32 `[D, H, W]` (class ids) or None for a case without labels,
        brain bool `[D, H, W]` (a read-only memory map; the SSN `roi_mask`)."""
        maps = self.arrays(i)
        label = maps.get("label")
        return maps["image"], None if label is None else label.astype(np.int32), maps["brain"]

    def __getitem__(self, key: Any) -> NiftiVolumes:
        """`volumes[i:j]`, `volumes[[3, 1]]`, `volumes[mask]` -> a `NiftiVolumes` of those cases."""
        if isinstance(key, (int, np.integer)):
            raise TypeError("NiftiVolumes is indexed by slices or index arrays; use volume(i).")
        return self._take(np.atleast_1d(np.arange(len(self))[key]))

    def _take(self, idx: np.ndarray) -> NiftiVolumes:
        return dataclasses.replace(self, cases=tuple(self.cases[int(i)] for i in idx))

    def split(self, fractions: Sequence[float] = (0.6, 0.2, 0.2), seed: int = 0) -> tuple:
        """Disjoint subsets by case, of about `fractions` of the cases, reproducible from
        `seed`: the group split of `AnnotatedImages.split` (each case its own group)."""
        return tuple(self._take(idx) for idx in group_split(self.ids, fractions, seed))

    def to_patch_dataset(
        self,
        patch_size: Sequence[int],
        batch_size: int = 8,
        seed: int = 0,
        foreground_fraction: float = 0.5,
        num_patches: Optional[int] = None,
        drop_remainder: bool = False,
    ):
        """Random patches as a `tf.data.Dataset` of `({"images": float32 [B, d, h, w, M],
        "roi_mask": float32 [B, d, h, w]}, labels int32 [B, d, h, w])`: see
        `tfp_seg.data.patches.patch_dataset`."""
        return patches.patch_dataset(
            self,
            patch_size,
            batch_size=batch_size,
            seed=seed,
            foreground_fraction=foreground_fraction,
            num_patches=num_patches,
            drop_remainder=drop_remainder,
        )


def load_nifti(
    directory: str,
    modalities: Sequence[str] = BRATS_MODALITIES,
    label_suffix: str = "seg",
    label_map: Optional[Mapping] = None,
    class_names: Optional[Sequence[str]] = None,
    require_labels: bool = True,
    normalize: bool = True,
    cache_dir: Optional[str] = None,
) -> NiftiVolumes:
    """The NIfTI cases of `directory` (see the module docstring), decoded once into the disk
    cache and returned as `NiftiVolumes`.

    Args:
      directory: the folder of case folders.
      modalities: the modality suffixes, in channel order (default BraTS'
        `flair, t1, t1ce, t2`).
      label_suffix: the label file's suffix (`<case>_<label_suffix>.nii.gz`).
      label_map: label value -> class id (classes `0..C-1`); default `BRATS_LABEL_MAP`.
        Keys may be strings of integers (as JSON / YAML configs give them).
      class_names: C names; default `BRATS_CLASS_NAMES` for the default map, else
        `"class 0"`, ...
      require_labels: a case without a label file is an error unless False (inference).
      normalize: z-score every modality inside the brain mask (see the module docstring);
        False keeps the files' intensities.
      cache_dir: the cache root (default `$TFP_SEG_CACHE`, else `~/.cache/tfp_seg`).

    Raises:
      FileNotFoundError: `directory` does not exist.
      ValueError: an empty `directory`, a bad case (names its folder and file), a bad
        `modalities`, `label_map` or `class_names`, or an unwritable `cache_dir`.
    """
    directory = os.fspath(directory)
    modalities = tuple(modalities) if not isinstance(modalities, str) else (modalities,)
    if not modalities or not all(isinstance(m, str) and m for m in modalities):
        raise ValueError(f"`modalities` must be non-empty names; got {modalities!r}.")
    if not isinstance(label_suffix, str) or not label_suffix:
        raise ValueError(f"`label_suffix` must be a non-empty name; got {label_suffix!r}.")
    if len(set(modalities)) != len(modalities) or label_suffix in modalities:
        raise ValueError(
            f"`modalities` {modalities} must be distinct and differ from `label_suffix` "
            f"{label_suffix!r}."
        )
    default_map = label_map is None
    label_map = _label_map(label_map)
    num_classes = max(label_map.values()) + 1
    if class_names is None:
        class_names = (
            BRATS_CLASS_NAMES if default_map else tuple(f"class {c}" for c in range(num_classes))
        )
    class_names = tuple(class_names)
    if len(class_names) != num_classes:
        raise ValueError(
            f"`class_names` must name all {num_classes} classes of `label_map`; got "
            f"{list(class_names)}."
        )
    plans = nifti_decode.plan_cases(directory, modalities, label_suffix, bool(require_labels))
    for case in plans:  # every header before any decoding: bad files fail fast
        nifti_decode.check_headers(case)
    options = {
        "modalities": list(modalities),
        "label_suffix": label_suffix,
        "label_map": sorted(label_map.items()),
        "normalize": bool(normalize),
    }
    root = nifti_cache.source_root(cache_dir, directory, options)
    cases = tuple(
        nifti_cache.cached_case(
            root,
            case,
            num_classes,
            lambda c=case: nifti_decode.decode_case(c, label_map, bool(normalize)),
        )
        for case in plans
    )
    counts = {s: sum(c.status.startswith(s) for c in cases) for s in ("decoded", "reused")}
    rebuilt = len(cases) - sum(counts.values())
    note = (
        f"nifti: {len(cases)} cases from {directory}; cache {root} ({counts['decoded']} "
        f"decoded, {counts['reused']} reused, {rebuilt} rebuilt)"
    )
    return NiftiVolumes(
        cases=cases,
        modalities=modalities,
        num_classes=num_classes,
        class_names=class_names,
        label_map=label_map,
        directory=directory,
        note=note,
    )
