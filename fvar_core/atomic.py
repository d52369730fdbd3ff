"""Atomic file writes: a temporary file in the target's folder, fsync, rename over the target.

A crash or a full disk never leaves a half-written file and never destroys the previous one.
"""
from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, Optional, Union

from fvar_core.errors import UserError

PathLike = Union[str, Path]


def umask() -> int:
    """The process umask (mkstemp/mkdtemp ignore it, so atomic writes re-apply it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


# errno → the reason a person reads (the path is named by the caller's message)
_WRITE_ERRORS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
                 errno.EACCES: "permission denied", errno.EPERM: "permission denied",
                 errno.EROFS: "read-only file system", errno.ENOTDIR: "a parent is a file, not a folder",
                 errno.EISDIR: "it is a folder", errno.ENAMETOOLONG: "name too long",
                 errno.EEXIST: "a file is in the way"}


def write_error(e: BaseException) -> Optional[str]:
    """The reason a write failed, for a one-line error, or None when `e` is not an I/O failure.

    torch.save reports a full disk as a RuntimeError ("... unexpected pos ...", "file write
    failed") and safetensors with its own error type; both carry no errno, so they are told apart
    by their message."""
    if isinstance(e, OSError):
        return _WRITE_ERRORS.get(e.errno) or (e.strerror or None)
    text = str(e)
    if type(e).__name__ == "SafetensorError" or (isinstance(e, RuntimeError) and any(
            k in text for k in ("unexpected pos", "file write failed", "PytorchStreamWriter", "No space left"))):
        if "No space left" in text or "os error 28" in text or "unexpected pos" in text:
            return "no space left on device"
        return text.splitlines()[0] if text else type(e).__name__
    return None


def check_writable(path: PathLike, what: str, folder: bool = False) -> Path:
    """Refuse, before any work, an output path that cannot be written: a folder where a file is to
    go (or a file where a folder is), a parent that is a file, a read-only or permission-denied
    place. Nothing is created. Returns the path."""
    path = Path(path)
    if folder and path.exists() and not path.is_dir():
        raise UserError(f"{what} {path}: exists and is not a folder")
    if not folder and path.is_dir():
        raise UserError(f"{what} {path}: is a folder; give a file name")
    probe = path if folder else path.parent
    while not probe.is_dir():
        if probe.exists() or probe.is_symlink():
            raise UserError(f"{what} {path}: {probe} is a file, not a folder")
        if probe == probe.parent:
            break
        probe = probe.parent
    # os.access sees a read-only mount even for root (EROFS), and permissions for everyone else
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"{what} {path}: cannot write in {probe} (read-only or permission denied)")
    return path


def ensure_dir(path: PathLike, what: str) -> Path:
    """path as an existing folder (created with its parents); a file in the way or a folder that
    cannot be made is a one-line UserError naming the option `what`."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{what} {path} exists and is not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{what} {path}: cannot create it ({write_error(e) or e})") from None
    return path


def is_write_temporary(name: str) -> bool:
    """Whether a file name is one of `atomic_write`'s temporaries (.NAME.XXXX.tmp): what a process
    killed while writing leaves behind, never a finished file."""
    return name.startswith(".") and name.endswith(".tmp")


def atomic_write(path: PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Call `write(f)` on a temporary file, then rename it to `path`. A write that fails (full
    disk, read-only place, a folder in the way) is a one-line UserError and leaves any previous
    file untouched."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"cannot write {path}: it is a folder")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise UserError(f"cannot write {path}: {write_error(e) or e}") from None
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
        reason = write_error(e)
        if reason is not None:
            raise UserError(f"cannot write {path}: {reason}; the previous file is untouched") from None
        raise


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically."""
    atomic_write(path, lambda f: f.write(data))
