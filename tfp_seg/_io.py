"""Atomic, durable file writes: the one policy every writer of `tfp_seg` follows.

A file is written to a temporary name in the target's own folder, flushed and `fsync`-ed, renamed
over the target with `os.replace` (atomic on POSIX and Windows), and the folder is `fsync`-ed
where the platform supports it (so the rename itself survives a power cut). On any error the
temporary file is removed and the old target, if any, is left as it was: a reader sees either
the complete old file or the complete new one, never a half-written one.

```none
atomic_write_bytes(path, data)
atomic_write_text(path, text)                  UTF-8
atomic_write_json(path, obj, **json_kwargs)    indent=2, sort_keys=True unless given; ends in \\n
with atomic_path(path) as tmp: writer(tmp)     for writers that need a path (np.savez, model.save,
                                               savefig); `tmp` keeps the target's suffix
with atomic_dir(path) as tmp: writer(tmp)      the same for a folder (e.g. DeepEnsemble.save)
```

Temporary names are `<stem>.tmp-<random><suffix>` (`model.keras` -> `model.tmp-1a2b3c4d.keras`,
`x.weights.h5` -> `x.tmp-1a2b3c4d.weights.h5`): numpy, Keras and matplotlib choose the format
from the suffix, and `.tmp` in a name marks a leftover of an interrupted write.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
from typing import Any, Iterator, Union

__all__ = [
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_write_json",
    "atomic_path",
    "atomic_dir",
]

PathLike = Union[str, os.PathLike]


def _split_name(name: str) -> tuple:
    """`("model", ".keras")` for `model.keras`; the suffix starts at the first dot after any
    leading dots, so compound suffixes (`.weights.h5`, `.tar.gz`) stay whole."""
    lead = len(name) - len(name.lstrip("."))
    dot = name.find(".", lead)
    if dot <= lead:
        return name, ""
    return name[:dot], name[dot:]


def _temp_name(path: str) -> str:
    folder, name = os.path.split(path)
    stem, suffix = _split_name(name)
    return os.path.join(folder, f"{stem}.tmp-{secrets.token_hex(4)}{suffix}")


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(folder: str) -> None:
    """fsync a folder (makes a rename in it durable); a no-op where folders cannot be opened
    (Windows) or fsync-ed (some network file systems)."""
    if not hasattr(os, "O_DIRECTORY"):
        return
    try:
        fd = os.open(folder or ".", os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(folder: str) -> None:
    for root, _, files in os.walk(folder):
        for name in files:
            _fsync_file(os.path.join(root, name))
        _fsync_dir(root)


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[str]:
    """Yield a temporary path next to `path`; on a clean exit it replaces `path` atomically.

    The temporary file exists (empty) when the block starts, so its name is reserved; the block
    writes it (by name or by opening it). If the block raises, the temporary file is removed,
    `path` is left untouched and the exception propagates.

    #### Examples

    ```python
    with atomic_path("runs/r/model.keras") as tmp:     # tmp = "runs/r/model.tmp-....keras"
        model.save(tmp)
    ```
    """
    path = os.fspath(path)
    while True:  # reserve a fresh name (permissions follow the umask, like open(path, "w"))
        tmp = _temp_name(path)
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            break
        except FileExistsError:  # pragma: no cover - 32 random bits
            continue
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


@contextlib.contextmanager
def atomic_dir(path: PathLike) -> Iterator[str]:
    """Yield a temporary folder next to `path`; on a clean exit it takes the place of `path`.

    Everything in the folder is fsync-ed first. An existing `path` is moved aside and deleted
    only once the new folder is in place (a folder cannot be renamed over a non-empty one, so
    there is a moment without `path`, but never a half-written one). If the block raises, the
    temporary folder is removed and `path` is left untouched.
    """
    path = os.fspath(path)
    while True:
        tmp = _temp_name(path)
        try:
            os.mkdir(tmp)
            break
        except FileExistsError:  # pragma: no cover
            continue
    try:
        yield tmp
        _fsync_tree(tmp)
        old = None
        if os.path.lexists(path):
            old = _temp_name(path)
            os.replace(path, old)
        try:
            os.replace(tmp, path)
        except BaseException:
            if old is not None:
                os.replace(old, path)
            raise
    except BaseException:
        _remove(tmp)
        raise
    _fsync_dir(os.path.dirname(os.path.abspath(path)))
    if old is not None:
        _remove(old)


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically and durably."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def atomic_write_text(path: PathLike, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically and durably."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)


def atomic_write_json(path: PathLike, obj: Any, **json_kwargs: Any) -> None:
    """Write `obj` as JSON to `path` atomically and durably.

    `json_kwargs` go to `json.dumps`; `indent=2` and `sort_keys=True` unless given. The text
    ends with a newline. Nothing is written if `obj` is not serialisable.
    """
    json_kwargs.setdefault("indent", 2)
    json_kwargs.setdefault("sort_keys", True)
    atomic_write_text(path, json.dumps(obj, **json_kwargs) + "\n")
