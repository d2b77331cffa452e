"""Runs on NIfTI volumes (`--data nifti:DIR`): the data set of a run, its training patches and
its sampler over whole volumes.

```none
VolumeSet        the cases of a `tfp_seg.data.NiftiVolumes` as a run's data set: split by case,
                 `images [N, D, H, W, M]` and `annotations [N, 1, D, H, W]` (the case's label
                 map, one rater) read case by case from the disk cache, `dice_regions`
patch_datasets   training: random patches `({"images", "roi_mask"}, labels)` of the train
                 cases (`NiftiVolumes.to_patch_dataset`, the brain mask as `roi_mask`), and a
                 fixed set of patches of the validation cases for Keras' `val_loss`
VolumeSampler    evaluation: `tfp_seg.models.SlidingWindowSampler` over whole volumes (window =
                 `patch_size`, overlap `window_overlap`, ONE low-rank z per volume), the brain
                 of the images as `roi_mask`
```

**The brain mask at evaluation.** The evaluation code passes images `[B, D, H, W, M]`, so
`VolumeSampler` takes the region of interest from them: `roi = any_m(x[..., m] != 0)`. The
loader sets every modality to 0 outside its brain mask (voxels where any raw modality is
non-zero) and z-scores it inside, so this is the loader's mask except at voxels where every
modality equals its brain mean exactly (with `normalize=False`: the loader's mask exactly).
A dict `{"images", "roi_mask"}` passes through unchanged.

**Shapes.** Training patches take cases of any shapes; an evaluation set (`images`,
`annotations`: validation curves, the report, `tfp-seg evaluate | sample`) needs the volumes
of its cases to share one shape `(D, H, W)` (BraTS: 155 x 240 x 240), else a `ValueError`
names the cases of each shape.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import numpy as np

from tfp_seg import data as data_lib
from tfp_seg import metrics
from tfp_seg.data import nifti
from tfp_seg.models.sliding import SlidingWindowSampler
from tfp_seg.runs.config import TrainConfig

__all__ = [
    "ROI_HEADS",
    "VolumeSampler",
    "VolumeSet",
    "brain_mask",
    "evaluation_shapes",
    "load_volume_set",
    "patch_datasets",
]

ROI_HEADS = ("low_rank", "mixture")
"""The `TrainConfig.head` values whose head takes the brain mask as `roi_mask` (LowRankLogits,
MixtureLowRankLogits); the other heads see the images alone."""
VAL_PATCH_SHARE = 4  # the validation loss: patches_per_epoch / 4 fixed patches (whole batches)


def brain_mask(images) -> np.ndarray:
    """float32 `[B, *S]`: 1 where any channel of `images [B, *S, M]` is non-zero."""
    return np.any(np.asarray(images) != 0, axis=-1).astype(np.float32)


class _CaseStack:
    """A read-only `[N, *shape]` array-like over the cases of a `VolumeSet`: `stack[i]`,
    `stack[i:j]`, `stack[index array]` read those cases from their memory maps (nothing is
    read before); `np.asarray(stack)` reads all of them."""

    def __init__(self, count: int, shape: tuple, dtype, read: Callable[[int], np.ndarray]):
        self.shape = (count, *shape)
        self.dtype = np.dtype(dtype)
        self._read = read

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key):
        rest = ()
        if isinstance(key, tuple):
            key, rest = (key[0], key[1:]) if key else (slice(None), ())
        if isinstance(key, (int, np.integer)):
            return np.asarray(self._read(int(np.arange(len(self))[key])), self.dtype)[rest]
        idx = np.atleast_1d(np.arange(len(self))[key])
        out = np.empty((idx.size, *self.shape[1:]), self.dtype)
        for j, i in enumerate(idx):
            out[j] = self._read(int(i))
        return out[(slice(None), *rest)]

    def __array__(self, dtype=None, copy=None):
        out = self[:]
        return out if dtype is None else out.astype(dtype)


class VolumeSet:
    """The cases of a `tfp_seg.data.NiftiVolumes` as a run's data set (module docstring).

    Attributes:
      volumes: the `NiftiVolumes` (patches: `volumes.to_patch_dataset`).
      images: float32 `[N, D, H, W, M]`, the normalised modalities (read case by case).
      annotations: int32 `[N, 1, D, H, W]`, the label map of each case (one rater).
      num_classes, class_names, note, ids, groups: those of the volumes (groups: the cases).
      num_annotations: 1.
      dice_regions: `tfp_seg.metrics.BRATS_REGIONS` (whole tumour, tumour core, enhancing)
        for the BraTS label map (`tfp_seg.data.BRATS_LABEL_MAP`), else None.
    """

    num_annotations = 1

    def __init__(self, volumes: nifti.NiftiVolumes):
        self.volumes = volumes

    def __len__(self) -> int:
        return len(self.volumes)

    def __repr__(self) -> str:
        return f"VolumeSet({self.volumes!r})"

    def __getitem__(self, key: Any) -> "VolumeSet":
        return VolumeSet(self.volumes[key])

    ids = property(lambda self: self.volumes.ids)
    groups = property(lambda self: self.volumes.groups)
    num_classes = property(lambda self: self.volumes.num_classes)
    class_names = property(lambda self: self.volumes.class_names)
    note = property(lambda self: self.volumes.note)

    @property
    def dice_regions(self) -> Optional[dict]:
        if self.volumes.label_map == nifti.BRATS_LABEL_MAP:
            return dict(metrics.BRATS_REGIONS)
        return None

    def split(self, fractions=(0.6, 0.2, 0.2), seed: int = 0) -> tuple:
        """By case, seeded (`NiftiVolumes.split`)."""
        return tuple(VolumeSet(part) for part in self.volumes.split(fractions, seed))

    @property
    def volume_shape(self) -> tuple:
        """The `(D, H, W)` all cases share; a `ValueError` naming the cases otherwise."""
        shapes: dict = {}
        for case in self.volumes.cases:
            shapes.setdefault(tuple(case.shape), []).append(case.case_id)
        if len(shapes) > 1:
            listed = "; ".join(
                f"{'x'.join(map(str, s))}: {', '.join(ids[:3])}{' ...' if len(ids) > 3 else ''}"
                for s, ids in shapes.items()
            )
            raise ValueError(
                f"the volumes of an evaluation set must share one shape (D, H, W) (the "
                f"evaluation stacks them); the cases of {self.volumes.directory!r} have "
                f"{len(shapes)}: {listed}."
            )
        return next(iter(shapes), (0, 0, 0))

    @property
    def images(self) -> _CaseStack:
        channels = len(self.volumes.modalities)
        return _CaseStack(
            len(self),
            (*self.volume_shape, channels),
            np.float32,
            lambda i: self.volumes.volume(i)[0],
        )

    @property
    def annotations(self) -> _CaseStack:
        def read(i):
            label = self.volumes.volume(i)[1]
            if label is None:
                raise ValueError(f"case {self.volumes.ids[i]!r} has no label file to score.")
            return label[None]

        return _CaseStack(len(self), (1, *self.volume_shape), np.int32, read)


def evaluation_shapes(parts) -> list:
    """The `(D, H, W)` of every part (`VolumeSet.volume_shape`): a `ValueError` naming the
    cases where a part's volumes differ in shape (they are evaluated stacked)."""
    return [part.volume_shape for part in parts]


def load_volume_set(spec, config: TrainConfig) -> VolumeSet:
    """`VOLUME_LOADERS["nifti"]`: `tfp_seg.data.load(spec)` with the BraTS defaults of
    `load_nifti`, cached under `config.cache_dir`."""
    return VolumeSet(data_lib.load(spec, stream=config.stream, cache_dir=config.cache_dir))


def patch_datasets(config: TrainConfig, train: VolumeSet, val: VolumeSet) -> tuple:
    """`(train_ds, val_ds, steps_per_epoch)` of a run on volumes.

    `train_ds`: the endless patch stream of the train cases (`patch_size` per axis,
    `batch_size` patches, `foreground_fraction`, seed `config.seed`); `steps_per_epoch =
    ceil(patches_per_epoch / batch_size)` batches of it make an epoch, new patches every epoch.
    `val_ds`: `batch_size * ceil(patches_per_epoch / (4 batch_size))` fixed patches of the
    validation cases (seed `config.seed + 1`) for `val_loss`, or None without validation
    cases. Heads outside `ROI_HEADS` get the images without the `roi_mask`.
    """
    size = (config.patch_size,) * 3
    steps = math.ceil(config.patches_per_epoch / config.batch_size)

    def stream(part, seed, num_patches=None):
        ds = part.volumes.to_patch_dataset(
            size,
            batch_size=config.batch_size,
            seed=seed,
            foreground_fraction=config.foreground_fraction,
            num_patches=num_patches,
        )
        if config.head not in ROI_HEADS:
            ds = ds.map(lambda x, y: (x["images"], y))
        return ds

    val_batches = math.ceil(steps / VAL_PATCH_SHARE)
    val_ds = stream(val, config.seed + 1, val_batches * config.batch_size) if len(val) else None
    return stream(train, config.seed), val_ds, steps


class VolumeSampler(SlidingWindowSampler):
    """The sampler of a run on volumes: `SlidingWindowSampler(model, window, overlap)` whose
    inputs `[B, D, H, W, M]` get `roi_mask = brain_mask(x)` when the head takes one (module
    docstring); ONE `z ~ N(0, I_R)` per volume for all its windows.

    The exporters (`tfp-seg export RUN`, the export after `tfp-seg train`) export its model
    (`tfp_seg.export` unwraps a `SlidingWindowSampler`): a SavedModel of a run on volumes is
    the network's one pass over volumes of any size divisible by 2**depth (`--roi-mask`: the
    brain mask as a second input), not the sliding windows.
    """

    def __init__(self, model, window, overlap=None, roi_mask: bool = True, **kwargs):
        super().__init__(model, window, overlap, **kwargs)
        self.roi_mask = bool(roi_mask)

    def inputs_of(self, x):
        """`x` as the model takes it: `{"images", "roi_mask"}` for a head with a region of
        interest, the images alone otherwise."""
        if isinstance(x, dict):
            return x if self.roi_mask else x["images"]
        if not self.roi_mask:
            return x
        images = np.asarray(x)
        return {"images": images, "roi_mask": brain_mask(images)}

    def params(self, x) -> np.ndarray:
        return super().params(self.inputs_of(x))
