"""Keep freed CPU memory in the process, so that big activations do not page-fault every time.

Measured (benchmarks/RESULTS.md, "Sampling speed"): a VQ-VAE decode at 256 px allocates fresh
activations of 17 MB per image per layer. glibc's malloc serves blocks that large with mmap and
returns them to the kernel on free, so every layer of every decode faults its output in again,
page by page — 43 % of the decode's wall time on the 2-core test machine. PyTorch's CPU allocator
has no cache of its own (its performance guide recommends jemalloc or tcmalloc for this reason).
`keep_freed_memory()` asks glibc, through mallopt, to serve every block from the heap and not to
trim it, so a freed activation's pages are reused by the next one, and to use one arena, so that
memory freed on one thread is reused on the next (a server answers on many threads). The process
then keeps its peak memory until it exits. Set FVAR_MALLOC=default to leave the allocator alone.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_done = [False]


def keep_freed_memory() -> bool:
    """Tune glibc's malloc once per process (Linux with glibc; a no-op elsewhere or with
    FVAR_MALLOC=default). Returns True when the setting is in effect."""
    if _done[0]:
        return True
    if not sys.platform.startswith("linux") or os.environ.get("FVAR_MALLOC", "") == "default":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        if not hasattr(libc, "gnu_get_libc_version"):  # musl and others have no such mallopt
            return False
        # one arena: memory one thread freed is what the next thread reuses (a server runs every
        # request on some pool thread; with glibc's 8 arenas per core each would keep its own peak)
        ok = (libc.mallopt(_M_ARENA_MAX, 1) == 1 and libc.mallopt(_M_MMAP_MAX, 0) == 1
              and libc.mallopt(_M_TRIM_THRESHOLD, 2 ** 31 - 1) == 1)
    except OSError:
        return False
    _done[0] = ok
    return ok
