"""Atomic file writes: a reader (or a crash) never sees half a file or directory."""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

from utils.errors import UserError


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to a temporary file beside `path`, fsync, then rename over it."""
    path = pathlib.Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes files private; these are ordinary outputs
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[pathlib.Path]:
    """Yield a temporary directory that becomes `path` only if the block succeeds."""
    path = pathlib.Path(path)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def build_once(
    path: str | os.PathLike, build: Callable[[pathlib.Path], object], *, complete: str
) -> tuple[pathlib.Path, bool]:
    """The finished directory `path`, built by `build(tmp)` only if it is not there yet.

    For caches keyed by a hash of their inputs, built by processes (or hosts)
    that may race: `build` fills a temporary sibling, which `atomic_directory`
    renames into place, so `path` only ever appears whole. When another
    builder of the same key renamed its directory first, ours is discarded and
    theirs used: the same key means the same content.

    Args:
        path: where the finished directory lives.
        build: writes the directory's content into the temporary directory it
            is given; if it raises, nothing is left behind.
        complete: a file that every finished directory holds (written last).

    Returns:
        (path, built): built is False when `path` was already finished, so
        `build` was not called.
    """
    path = pathlib.Path(path)
    if (path / complete).is_file():
        return path, False
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_directory(path) as tmp:
            build(tmp)
    except OSError:
        if (path / complete).is_file():  # another builder of the same key finished first
            return path, True
        if path.is_dir():  # in the way, and not ours to delete
            raise UserError(
                f"{path} holds an unfinished build (no {complete}; an interrupted older run?): "
                "remove it and run again"
            ) from None
        raise
    return path, True
