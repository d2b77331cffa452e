"""`AnnotatedImages`: local multi-rater images and masks, split by patient group."""

from __future__ import annotations

import dataclasses
import os
from typing import List, Sequence, Union

import numpy as np

from tfp_seg.data._dataset import AnnotatedSet, check_fractions

PathLike = Union[str, os.PathLike]


def label_marginals(annotations: np.ndarray, num_classes: int) -> np.ndarray:
    """The raters' per-pixel label fractions: float32 `[N, *S, C]` of class ids `[N, K, *S]`,
    `q_c = (1/K) #{k : y_k = c}` (the same values whether computed for all N or per batch)."""
    onehot = np.eye(num_classes, dtype=np.float32)[annotations]  # [N, K, *S, C]
    return onehot.mean(axis=1)


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
      note: how `tfp_seg.data.load` loaded the data (in memory or streamed from a disk cache,
        and why), one line for logs; empty when built otherwise.
    """

    images: np.ndarray
    annotations: np.ndarray
    ids: tuple
    groups: tuple = ()
    num_classes: int = 2
    class_names: tuple = ("background", "foreground")
    note: str = ""

    def __post_init__(self):
        self._check_layout()
        ann = self.annotations
        if ann.size and int(ann.max()) >= self.num_classes:
            raise ValueError(
                f"`annotations` hold class {int(ann.max())} but num_classes={self.num_classes}."
            )

    def _check_layout(self) -> None:
        """Shapes, ids, groups and class names (everything but the values of the arrays)."""
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

    def __repr__(self) -> str:
        return (
            f"AnnotatedImages(num_images={len(self)}, image_shape={self.images.shape[1:]}, "
            f"num_annotations={self.num_annotations}, num_classes={self.num_classes})"
        )

    def marginals(self) -> np.ndarray:
        """Empirical per-pixel label distribution over the K raters, float32 `[N, H, W, C]`."""
        return label_marginals(self.annotations, self.num_classes)

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
        return tuple(self._take(idx) for idx in group_split(self.groups, fractions, seed))

    def train_val_test(self, seed: int = 0) -> tuple[AnnotatedImages, ...]:
        """`split((0.8, 0.1, 0.1), seed)`."""
        return self.split((0.8, 0.1, 0.1), seed=seed)


def group_split(groups: Sequence, fractions: Sequence[float], seed: int) -> List[np.ndarray]:
    """Index arrays of disjoint parts of about `fractions` of the items, by *group*.

    `groups[i]` names the group of item i. The groups are shuffled with `seed` and assigned in
    turn to the part that is furthest below its target size, so no group is split and the
    parts are as close to `fractions` as whole groups allow. Indices keep their order.
    """
    f = check_fractions(fractions)
    names, inverse = np.unique(np.asarray(groups, dtype=object).astype(str), return_inverse=True)
    sizes = np.bincount(inverse, minlength=len(names))
    order = np.random.default_rng(seed).permutation(len(names))
    targets = f * len(groups)
    filled = np.zeros(len(f))
    part_of = np.empty(len(names), np.int64)
    for g in order:
        part = int(np.argmax(targets - filled))
        part_of[g] = part
        filled[part] += sizes[g]
    return [np.flatnonzero(part_of[inverse] == p) for p in range(len(f))]
