"""Atomic file writes: a temporary file in the target's folder, fsync, rename over the target.

A crash or a full disk never leaves a half-written file and never destroys the previous one.
"""
from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, Union

from .errors import UserError

PathLike = Union[str, Path]


def umask() -> int:
    """The process umask (mkstemp/mkdtemp ignore it, so atomic writes re-apply it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def ensure_dir(path: PathLike, what: str) -> Path:
    """path as an existing folder (created with its parents); a file in the way or a folder that
    cannot be made is a one-line UserError naming the option `what`."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{what} {path} exists and is not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{what} {path}: cannot create it ({e.strerror or e})") from None
    return path


def atomic_write(path: PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Call `write(f)` on a temporary file, then rename it to `path`; ENOSPC → UserError."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            raise UserError(f"no space left on device writing {path}; the previous file is untouched") from None
        raise


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically."""
    atomic_write(path, lambda f: f.write(data))
