"""Disk-backed data sets: `DiskAnnotatedImages`, the `AnnotatedImages` of a decoded cache
(`tfp_seg.data.cache`), whose arrays stay in read-only memory maps and are read when indexed.

```none
MappedArray(base, rows)        rows `rows` of an array on disk `base [M, *row]`, in that order:
                               a lazy view [n, *row]; indexing reads, `take` makes a new view
DiskAnnotatedImages            AnnotatedImages with MappedArray images / annotations: subsets
                               (`data[idx]`, `split`, `select_split`) are index views, and
                               `to_dataset` reads each batch's examples from the maps
```

A view of consecutive rows (the whole data set, a slice of it) reads as a zero-copy, read-only
view of the map; the pages it touches are file-backed (page cache the kernel can drop), not the
process's own memory. Rows in another order are gathered into a new array.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import numpy as np

from tfp_seg.data._dataset import streamed_dataset
from tfp_seg.data.annotated_images import AnnotatedImages, label_marginals

__all__ = ["DiskAnnotatedImages", "MappedArray"]


def _is_basic(index: Any) -> bool:
    return index is None or index is Ellipsis or isinstance(index, (int, np.integer, slice))


class MappedArray:
    """Rows of an array on disk, read when indexed: a lazy, read-only `[n, *row_shape]` view.

    Args:
      base: the array `[M, *row_shape]` on disk (a read-only `np.memmap`, or any array).
      rows: int64 `[n]`, the rows of `base` shown, in order; None: all `M`, in order.

    `view[i]` is one row; `view[a:b]`, `view[index_array]`, `view[bool_mask]` are arrays
    `[k, *row_shape]`; `view[key, rest...]` indexes as numpy does (plain ints and slices in
    `rest` read only what they select, e.g. `annotations[idx, 0]`). Consecutive rows
    come back as a read-only view of the map, others as a copy. `take(index)` is a new view
    (nothing is read); `np.asarray(view)` reads all of it.
    """

    def __init__(self, base: Any, rows: Optional[np.ndarray] = None):
        if rows is not None:
            rows = np.asarray(rows)
            if rows.ndim != 1 or not np.issubdtype(rows.dtype, np.integer):
                raise ValueError(f"`rows` must be a 1-D integer array; got {rows.shape}.")
            rows = rows.astype(np.int64, copy=False)
            if rows.size and (rows.min() < 0 or rows.max() >= base.shape[0]):
                raise ValueError(
                    f"`rows` must lie in [0, {base.shape[0]}); got [{rows.min()}, {rows.max()}]."
                )
        self.base = base
        self.rows = rows

    @property
    def shape(self) -> tuple:
        """`(n, *row_shape)`."""
        n = self.base.shape[0] if self.rows is None else self.rows.size
        return (int(n),) + tuple(self.base.shape[1:])

    @property
    def dtype(self) -> np.dtype:
        """The dtype of `base`."""
        return self.base.dtype

    @property
    def ndim(self) -> int:
        """`len(shape)`."""
        return len(self.shape)

    @property
    def size(self) -> int:
        """The number of elements, `prod(shape)`."""
        return int(np.prod(self.shape))

    @property
    def nbytes(self) -> int:
        """Bytes of the viewed rows (what `np.asarray(view)` holds)."""
        return self.size * self.dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        where = getattr(self.base, "filename", None)
        return f"MappedArray(shape={self.shape}, dtype={self.dtype}" + (
            f", file={where!r})" if where else ")"
        )

    def _base_rows(self, key: Any) -> Any:
        """The rows of `base` that `key` selects: a slice (consecutive rows) or int64 `[k]`."""
        n = len(self)
        if isinstance(key, slice):
            start, stop, step = key.indices(n)
            if step == 1 and self.rows is None:
                return slice(start, max(start, stop))
            positions = np.arange(start, stop, step, dtype=np.int64)
        else:
            key = np.asarray(key)
            if key.dtype == np.bool_:
                if key.shape != (n,):
                    raise IndexError(f"a boolean index must have shape ({n},); got {key.shape}")
                positions = np.flatnonzero(key)
            elif np.issubdtype(key.dtype, np.integer) and key.ndim == 1:
                positions = key.astype(np.int64)
                if positions.size and (positions.min() < -n or positions.max() >= n):
                    raise IndexError(f"index out of range for {n} rows")
                positions = np.where(positions < 0, positions + n, positions)
            else:
                raise IndexError(
                    f"MappedArray rows are selected by an int, a slice, a 1-D integer array or "
                    f"a boolean mask; got {key.dtype} of shape {key.shape}"
                )
        rows = positions if self.rows is None else self.rows[positions]
        if rows.size and rows[-1] - rows[0] == rows.size - 1 and np.all(np.diff(rows) == 1):
            return slice(int(rows[0]), int(rows[-1]) + 1)
        return rows

    def __getitem__(self, key: Any) -> np.ndarray:
        rest: tuple = ()
        if isinstance(key, tuple):
            key, rest = (key[0], key[1:]) if key else (slice(None), ())
        if key is Ellipsis:
            key, rest = slice(None), (Ellipsis,) + rest
        if isinstance(key, (int, np.integer)):
            n = len(self)
            if not -n <= int(key) < n:
                raise IndexError(f"row {int(key)} out of range for {n} rows")
            position = int(key) % n
            row = position if self.rows is None else int(self.rows[position])
            return np.array(self.base[(row,) + rest])
        rows = self._base_rows(key)
        if all(_is_basic(r) for r in rest):
            return np.asarray(self.base[(rows,) + rest])
        # an advanced index in `rest` combines with the rows' as numpy's would (broadcast)
        sub = np.asarray(self.base[rows])
        first = slice(None) if isinstance(key, slice) else np.arange(sub.shape[0])
        return sub[(first,) + rest]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = self[:]
        if dtype is not None:
            out = out.astype(dtype, copy=False)
        return np.array(out, copy=True) if copy else out

    def take(self, index: Any) -> MappedArray:
        """A view of the rows `index` selects (ints, a slice or a mask); nothing is read."""
        rows = self._base_rows(np.atleast_1d(np.arange(len(self))[index]))
        if isinstance(rows, slice):
            rows = np.arange(rows.start, rows.stop, dtype=np.int64)
        return MappedArray(self.base, rows)


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class DiskAnnotatedImages(AnnotatedImages):
    """`AnnotatedImages` whose images and annotations stay on disk (`MappedArray` views of a
    decoded cache), as `tfp_seg.data.load(spec, stream=True)` returns them.

    Everything of `AnnotatedImages` works, lazily: `len`, `ids`, `groups`, `data[idx]`,
    `split`, `tfp_seg.data.split_data` and `select_split` give views (nothing is read);
    `images[a:b]` / `annotations[a:b]` read those rows; `to_dataset` streams (below);
    `marginals()` and `in_memory()` read everything.

    `to_dataset(...)` shuffles the indices with the seed and reads every batch's examples from
    the maps (`tfp_seg.data._dataset.streamed_dataset`), so memory holds a few batches, not the
    data set; for the same arguments its batches equal those of `in_memory().to_dataset(...)`.

    Attributes (besides those of `AnnotatedImages`):
      cache: the cache folder the arrays are read from.
      cache_status: `"decoded"` (made by this load), `"reused"`, or `"rebuilt: <why>"` (a
        corrupt or partial cache was found and decoded again).
    """

    cache: str = ""
    cache_status: str = ""

    def __post_init__(self):
        for name in ("images", "annotations"):
            if not isinstance(getattr(self, name), MappedArray):
                raise ValueError(
                    f"`{name}` of a DiskAnnotatedImages must be a MappedArray; got "
                    f"{type(getattr(self, name)).__name__}."
                )
        if self.images.dtype != np.float32 or self.annotations.dtype != np.uint8:
            raise ValueError(
                "a DiskAnnotatedImages holds float32 images and uint8 annotations; got "
                f"{self.images.dtype} and {self.annotations.dtype}."
            )
        self._check_layout()  # the class ids were checked when the cache was decoded

    def __repr__(self) -> str:
        return (
            f"DiskAnnotatedImages(num_images={len(self)}, image_shape={self.images.shape[1:]}, "
            f"num_annotations={self.num_annotations}, num_classes={self.num_classes}, "
            f"cache={self.cache!r})"
        )

    @property
    def nbytes(self) -> int:
        """Bytes of the decoded images and annotations (what `in_memory()` would hold)."""
        return self.images.nbytes + self.annotations.nbytes

    def marginals(self) -> np.ndarray:
        """The raters' per-pixel label fractions, float32 `[N, H, W, C]`, of ALL images, in
        memory (`to_dataset(annotation="marginal")` computes them batch by batch instead)."""
        return label_marginals(self.annotations[:], self.num_classes)

    def in_memory(self) -> AnnotatedImages:
        """The same data as an in-memory `AnnotatedImages` (reads every image)."""
        return AnnotatedImages(
            images=np.array(self.images[:]),
            annotations=np.array(self.annotations[:]),
            ids=self.ids,
            groups=self.groups,
            num_classes=self.num_classes,
            class_names=self.class_names,
            note=self.note,
        )

    def _take(self, idx: np.ndarray) -> DiskAnnotatedImages:
        return dataclasses.replace(
            self,
            images=self.images.take(idx),
            annotations=self.annotations.take(idx),
            ids=tuple(self.ids[int(i)] for i in idx),
            groups=tuple(self.groups[int(i)] for i in idx),
        )

    def _reader(self, annotation: str):
        images, annotations, num_classes = self.images, self.annotations, self.num_classes

        def read(indices):
            idx = np.asarray(indices, np.int64)
            if annotation == "first":
                labels = annotations[idx, 0]
            elif annotation == "marginal":
                labels = label_marginals(annotations[idx], num_classes)
            else:
                labels = annotations[idx]
            return np.ascontiguousarray(images[idx], np.float32), np.ascontiguousarray(labels)

        return read

    def _dataset(self, annotation: str = "random", **kwargs):
        spatial = tuple(self.annotations.shape[2:])
        label_shapes = {
            "random": (self.num_annotations, *spatial),
            "all": (self.num_annotations, *spatial),
            "first": spatial,
            "marginal": (*spatial, self.num_classes),
        }
        return streamed_dataset(
            self._reader(annotation),
            len(self),
            tuple(self.images.shape[1:]),
            label_shapes,
            annotation=annotation,
            **kwargs,
        )


def describe_bytes(size: float) -> str:
    """`size` bytes as a short text: `"512 B"`, `"3.2 MiB"`, `"1.50 GiB"`."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= scale:
            value = size / scale
            return f"{value:.2f} {unit}" if value < 10 else f"{value:.1f} {unit}"
    return f"{int(size)} B"
