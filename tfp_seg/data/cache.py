"""The decode cache of users' data: where it lives, its keys, writing it atomically and opening
it only when it is complete.

```none
<root>/<kind>-<source key>/<fingerprint>/   one decoded version of one source
    images.npy         float32 [M, H, W, channels]   rows in decode order
    annotations.npy    uint8 [M, K, H, W]
    order.npy          int64 [N]: the rows of the data set's images in its order (if not 0..M-1)
    ids.json           the N image ids and groups ({"ids": [...], "groups": [...] or null})
    meta.json          written last: format, spec, options, fingerprint, shapes, dtypes and
                       byte sizes of the arrays, size and SHA-256 of ids.json, classes
<root>/<kind>-<source key>/<fingerprint>.tmp-<random>/   a decode in progress (`owner.json`)
```

* root: `cache_dir`, else `$TFP_SEG_CACHE`, else `$XDG_CACHE_HOME/tfp_seg`, else
  `~/.cache/tfp_seg`.
* source key: a hash of the kind, the absolute paths and the loader's options (defaults
  filled in): one folder per source.
* fingerprint: a hash of the format version and every source file's path, size and
  modification time (ns): a changed, added or removed file is a new fingerprint, so the source
  is decoded again; after a successful decode the source's other versions are deleted.
* atomic: a decode writes into `<fingerprint>.tmp-<random>/` (`tfp_seg._io.atomic_dir`:
  every file fsync-ed, then one rename into place), `meta.json` last; an interrupted decode
  leaves only a `.tmp-` folder, which is never opened and is removed by a later decode once the
  process that wrote it (`owner.json`: host and pid) is gone.
* opening checks `meta.json`, then each array's header, shape, dtype and file size against it
  (`open_cache`); anything amiss raises `CacheInvalid` with the reason, and the caller decodes
  again. A file rewritten in place with the same size and header is not detected (the arrays'
  contents are not checksummed: that would read the whole data set at every load).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import struct
from typing import Any, Iterable, Optional

import numpy as np

from tfp_seg._io import atomic_dir, atomic_write_json

__all__ = [
    "CACHE_ENV",
    "CacheInvalid",
    "NpyAppender",
    "CacheBuild",
    "cache_root",
    "fingerprint",
    "open_cache",
    "read_ids",
    "source_folder",
]

CACHE_ENV = "TFP_SEG_CACHE"
"""The environment variable naming the cache root (default `~/.cache/tfp_seg`)."""
FORMAT = 1  # the cache layout and decoders' version: a new value decodes every source again
ARRAYS = ("images", "annotations")


class CacheInvalid(Exception):
    """A cache folder that is missing, partial or corrupt (`str(exc)` says why)."""


def cache_root(cache_dir: Optional[str] = None) -> str:
    """The cache root: `cache_dir`, `$TFP_SEG_CACHE`, `$XDG_CACHE_HOME/tfp_seg` or
    `~/.cache/tfp_seg`, as an absolute path (it need not exist yet)."""
    if cache_dir is not None and not (isinstance(cache_dir, (str, os.PathLike)) and cache_dir):
        raise ValueError(f"`cache_dir` must be a folder path; got {cache_dir!r}.")
    root = cache_dir or os.environ.get(CACHE_ENV)
    if not root:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(base, "tfp_seg")
    return os.path.abspath(os.fspath(root))


def _digest(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:20]


def source_folder(root: str, kind: str, paths: Iterable[str], options: dict) -> str:
    """`<root>/<kind>-<key>`: the folder of one source's caches (key: paths and options)."""
    paths = [os.path.realpath(p) for p in paths]
    return os.path.join(root, f"{kind}-{_digest([kind, paths, options])}")


def fingerprint(files: Iterable[str]) -> str:
    """A hash of `FORMAT` and every file's absolute path, size and mtime (ns), in order: the name of
    the cache of this version of the source (hashed file by file: memory O(1) in their
    number). A missing file is an error naming it."""
    digest = hashlib.sha256(f"{FORMAT}\n".encode())
    for path in files:
        try:
            st = os.stat(path)
        except OSError as exc:
            raise FileNotFoundError(f"cannot read {path!r}: {exc.strerror}") from exc
        line = f"{os.path.abspath(path)}\0{st.st_size}\0{st.st_mtime_ns}\n"
        digest.update(line.encode("utf-8", "surrogateescape"))
    return digest.hexdigest()[:20]


class NpyAppender:
    """A `.npy` file written row by row, for a number of rows not known in advance.

    A header of `HEADER_BYTES` (a multiple of numpy's 64-byte alignment) is reserved, the rows
    are appended as they come (each `[*row_shape]` or `[k, *row_shape]`), and `close()` writes
    the header of the final shape `[rows, *row_shape]` (format version 1.0, C order), so the
    file is an ordinary `.npy` (`np.load(path, mmap_mode="r")`). Memory: one row at a time.
    """

    HEADER_BYTES = 256

    def __init__(self, path: str, row_shape: tuple, dtype: Any):
        self.path, self.row_shape, self.dtype = path, tuple(row_shape), np.dtype(dtype)
        self.rows = 0
        self._file = open(path, "wb")
        self._file.write(b"\0" * self.HEADER_BYTES)

    def append(self, rows: np.ndarray) -> None:
        rows = np.ascontiguousarray(rows, self.dtype)
        if rows.shape == self.row_shape:
            rows = rows[None]
        if rows.shape[1:] != self.row_shape:
            raise ValueError(
                f"{os.path.basename(self.path)}: rows of shape {self.row_shape} expected; got "
                f"{rows.shape}."
            )
        try:
            self._file.write(rows.data)
        except OSError as exc:  # a full disk: say which file, not only why
            message = f"cannot write the data cache file {self.path}: {exc.strerror or exc}"
            raise OSError(exc.errno, message) from exc
        self.rows += rows.shape[0]

    def close(self) -> None:
        shape = (self.rows, *self.row_shape)
        descr = np.lib.format.dtype_to_descr(self.dtype)
        text = "{'descr': %r, 'fortran_order': False, 'shape': %r, }" % (descr, shape)
        length = self.HEADER_BYTES - 10  # magic (6), version (2), header length (2)
        if len(text) + 1 > length:  # pragma: no cover - a shape of dozens of dimensions
            raise ValueError(f"the .npy header of shape {shape} does not fit in {length} bytes")
        header = b"\x93NUMPY\x01\x00" + struct.pack("<H", length)
        self._file.seek(0)
        self._file.write(header + (text.ljust(length - 1) + "\n").encode("latin1"))
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()


def unwritable_error(folder: str, exc: OSError) -> ValueError:
    """The error for a cache folder that cannot be written (names the folder and the fix)."""
    return ValueError(
        f"cannot write the data cache in {folder!r} ({exc.strerror or exc}): pass a writable "
        f"folder as `cache_dir` (tfp-seg --cache-dir) or set ${CACHE_ENV}."
    )


def remove_stale(source_dir: str, keep: str) -> None:
    """Remove the source's other versions, the `.tmp-` folders of decodes whose process is
    gone, and complete caches left aside by an interrupted replacement."""
    host = socket.gethostname()
    for name in os.listdir(source_dir):
        path = os.path.join(source_dir, name)
        if name == keep or not os.path.isdir(path):
            continue
        if ".tmp-" in name and not os.path.isfile(os.path.join(path, "meta.json")):
            try:
                with open(os.path.join(path, "owner.json")) as f:
                    owner = json.load(f)
            except (OSError, ValueError):
                continue  # just created, or not ours to judge
            if owner.get("host") != host or _alive(int(owner.get("pid", 0))):
                continue
        shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class CacheBuild:
    """`with CacheBuild(source_dir, name) as build:` decode into `build.array(...)` and
    `build.meta`; on a clean exit the arrays are closed, `meta.json` written and the folder
    renamed to `<source_dir>/<name>` atomically (replacing a corrupt one); on an error nothing
    is left but a removed temporary folder. Errors creating the folders name `source_dir`."""

    def __init__(self, source_dir: str, name: str):
        self.source_dir, self.name = source_dir, name
        self.meta: dict = {}
        self.order: Optional[np.ndarray] = None
        self.ids: list = []
        self.groups: Optional[list] = None  # None: every image its own group
        self._arrays: dict = {}

    def __enter__(self) -> CacheBuild:
        try:
            os.makedirs(self.source_dir, exist_ok=True)
        except OSError as exc:
            raise unwritable_error(self.source_dir, exc) from exc
        self._context = atomic_dir(os.path.join(self.source_dir, self.name))
        try:
            self.folder = self._context.__enter__()
            atomic_write_json(
                os.path.join(self.folder, "owner.json"),
                {"host": socket.gethostname(), "pid": os.getpid()},
            )
        except OSError as exc:
            raise unwritable_error(self.source_dir, exc) from exc
        return self

    def array(self, name: str, row_shape: tuple, dtype: Any) -> NpyAppender:
        """The appender of `<name>.npy` (`images` or `annotations`)."""
        appender = NpyAppender(os.path.join(self.folder, f"{name}.npy"), row_shape, dtype)
        self._arrays[name] = appender
        return appender

    def __exit__(self, kind, exc, tb) -> bool:
        if kind is not None:
            self._close_files()
            return bool(self._context.__exit__(kind, exc, tb))  # removes the folder
        try:
            self._finish()
        except BaseException as error:
            self._close_files()
            self._context.__exit__(type(error), error, error.__traceback__)
            raise
        self._context.__exit__(None, None, None)  # fsync everything, rename into place
        remove_stale(self.source_dir, keep=self.name)
        return False

    def _close_files(self) -> None:
        for appender in self._arrays.values():
            if not appender._file.closed:
                appender._file.close()

    def _finish(self) -> None:
        missing = [name for name in ARRAYS if name not in self._arrays]
        if missing:
            raise ValueError(f"nothing decoded into the cache: no {missing}")
        meta = dict(self.meta, format=FORMAT, fingerprint=self.name)
        for name in ARRAYS:
            appender = self._arrays[name]
            appender.close()
            meta[name] = {
                "shape": [appender.rows, *appender.row_shape],
                "dtype": appender.dtype.str,
                "bytes": os.path.getsize(appender.path),
            }
        if self.order is not None:
            np.save(os.path.join(self.folder, "order.npy"), np.asarray(self.order, np.int64))
        meta["order"] = self.order is not None
        count = len(self.ids) if self.order is None else len(self.order)
        if len(self.ids) != count or (self.groups is not None and len(self.groups) != count):
            raise ValueError(f"{count} images but {len(self.ids)} ids")  # pragma: no cover
        ids_path = os.path.join(self.folder, "ids.json")
        atomic_write_json(ids_path, {"ids": self.ids, "groups": self.groups}, indent=None)
        meta["num_images"] = count
        meta["ids_file"] = {"bytes": os.path.getsize(ids_path), "sha256": _file_digest(ids_path)}
        os.remove(os.path.join(self.folder, "owner.json"))
        atomic_write_json(os.path.join(self.folder, "meta.json"), meta, sort_keys=False)


def open_array(folder: str, name: str, meta: dict) -> np.ndarray:
    """Memory-map `folder/name.npy` read-only, checked against the shape, dtype and size that
    `meta[name]` recorded; `CacheInvalid` when it differs or cannot be opened."""
    path = os.path.join(folder, f"{name}.npy")
    expected = meta.get(name) or {}
    try:
        array = np.load(path, mmap_mode="r")
    except (OSError, ValueError, EOFError) as exc:
        raise CacheInvalid(f"{name}.npy cannot be opened ({type(exc).__name__}: {exc})") from exc
    size = os.path.getsize(path)
    if (
        list(array.shape) != list(expected.get("shape", ()))
        or array.dtype.str != expected.get("dtype")
        or size != expected.get("bytes")
        or size != array.offset + array.nbytes
    ):
        raise CacheInvalid(
            f"{name}.npy is {array.dtype.str} {list(array.shape)} in {size} bytes; meta.json "
            f"says {expected.get('dtype')} {expected.get('shape')} in {expected.get('bytes')}"
        )
    return array


def read_meta(folder: str, fmt: str, fingerprint: str, what: str) -> dict:
    """The parsed `meta.json` of the complete cache `folder`, checked to be of format `fmt`
    and fingerprint `fingerprint`. Raises `FileNotFoundError` if there is no such folder and
    `CacheInvalid` if meta.json is missing, unreadable or of another format or version of
    the `what` (e.g. "source")."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(folder)
    try:
        with open(os.path.join(folder, "meta.json"), encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError) as exc:
        raise CacheInvalid(f"meta.json is missing or unreadable ({exc})") from exc
    if (
        not isinstance(meta, dict)
        or meta.get("format") != fmt
        or meta.get("fingerprint") != fingerprint
    ):
        raise CacheInvalid(f"meta.json is of another format or version of the {what}")
    return meta


def open_cache(folder: str, name: str) -> tuple:
    """`(images, annotations, order, meta)` of the complete cache `folder` of fingerprint
    `name`: read-only memory maps `[M, ...]`, int64 `order [N]` (None: 0..M-1) and the
    parsed `meta.json`. Raises `FileNotFoundError` if there is no such folder and
    `CacheInvalid` (with the reason) if it is partial or corrupt. The ids are read apart
    (`read_ids`)."""
    meta = read_meta(folder, FORMAT, name, "source")
    images, annotations = (open_array(folder, name, meta) for name in ARRAYS)
    rows = images.shape[0]
    if annotations.shape[0] != rows:
        raise CacheInvalid(f"{rows} images but {annotations.shape[0]} annotation rows")
    order = None
    if meta.get("order"):
        try:
            order = np.load(os.path.join(folder, "order.npy"))
        except (OSError, ValueError, EOFError) as exc:
            raise CacheInvalid(f"order.npy cannot be read ({exc})") from exc
        if (
            order.ndim != 1
            or order.dtype != np.int64
            or (order.size and not (0 <= order.min() and order.max() < rows))
        ):
            raise CacheInvalid(f"order.npy is not rows of the {rows} images")
    count = rows if order is None else order.size
    if meta.get("num_images") != count:
        raise CacheInvalid(f"meta.json's num_images is not the {count} images")
    ids_path = os.path.join(folder, "ids.json")
    expected = meta.get("ids_file") or {}
    try:
        intact = os.path.getsize(ids_path) == expected.get("bytes") and _file_digest(
            ids_path
        ) == expected.get("sha256")
    except OSError as exc:
        raise CacheInvalid(f"ids.json cannot be read ({exc})") from exc
    if not intact:
        raise CacheInvalid("ids.json is not the file meta.json describes")
    return images, annotations, order, meta


def _file_digest(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_ids(folder: str) -> tuple:
    """`(ids, groups)` of a cache `open_cache` accepted (`groups` None: every image its own
    group). Read apart from `meta.json`, once the decode's objects are gone, so that the N
    strings do not pin the memory they would share pages with."""
    with open(os.path.join(folder, "ids.json"), encoding="utf-8") as f:
        content = json.load(f)
    return content["ids"], content["groups"]
