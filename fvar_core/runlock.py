"""One process per run directory: an advisory lock file, `<dir>/.fvar.lock`.

The lock is `fcntl.flock` on that file, so the kernel releases it when its holder exits in any
way, kill -9 included: a lock file left behind by a dead process never blocks a resume (it is
taken over with a warning naming the dead holder). The file holds the holder's pid, host and
command line, which the refusal of a second process names. The file is removed on release.

flock works across machines on most network filesystems (NFSv4, Lustre, GPFS) but not all; on a
filesystem without it the lock is skipped with a warning rather than blocking every run.
"""
from __future__ import annotations

import errno
import json
import os
import shlex
import socket
import sys
import time
import warnings
from pathlib import Path
from types import TracebackType
from typing import Optional, Type, Union

from fvar_core.errors import FvarWarning, UserError

LOCK_NAME = ".fvar.lock"

try:
    import fcntl
except ImportError:  # Windows: no flock; runs are not locked there
    fcntl = None  # type: ignore[assignment]


def _holder(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _describe(h: dict) -> str:
    if not h:
        return "another process"
    return f"pid {h.get('pid', '?')} on {h.get('host', '?')}" + (f" ({h['command']})" if h.get("command") else "")


class RunLock:
    """`with RunLock(run_dir):` — refuse (UserError) if another live process holds run_dir."""

    def __init__(self, directory: Union[str, Path], what: str = "run directory"):
        self.path = Path(directory) / LOCK_NAME
        self.what = what
        self._fd: Optional[int] = None

    def acquire(self) -> "RunLock":
        if fcntl is None:
            return self
        while True:
            stale = _holder(self.path) if self.path.exists() else {}
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise UserError(f"cannot lock {self.what} {self.path.parent}: {e.strerror or e}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise UserError(f"{self.what} {self.path.parent} is in use by {_describe(_holder(self.path))}; "
                                    f"wait for it to finish or choose another --out") from None
                warnings.warn(f"cannot lock {self.path.parent} ({e.strerror or e}); two processes on it would "
                              f"not be stopped", FvarWarning, stacklevel=2)
                return self
            try:  # the file may have been removed (released) between open and flock: lock the new one
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            break
        if stale and stale.get("pid") != os.getpid():
            warnings.warn(f"{self.path.parent}: taking over the lock of {_describe(stale)}, which is no longer "
                          f"running", FvarWarning, stacklevel=2)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "command": shlex.join(sys.argv),
              "since": time.strftime("%Y-%m-%dT%H:%M:%S")}
        os.ftruncate(fd, 0)
        os.write(fd, (json.dumps(me) + "\n").encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:  # unlink while still holding the lock, so a waiting process never locks a removed file
            os.unlink(self.path)
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, t: Optional[Type[BaseException]], v: Optional[BaseException],
                 tb: Optional[TracebackType]) -> None:
        self.release()
