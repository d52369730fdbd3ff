"""What a command interrupted by Ctrl-C says: where it stopped, for the CLI to print with the
command that resumes it (every long command resumes when rerun: training from its newest
checkpoint, tokenize from its last complete shard, sample/eval from the images already written).

    with on_interrupt(lambda: f"at step {step} of {total} in {run_dir}"):
        ...long work...

The innermost active description wins (it marks the KeyboardInterrupt as it passes, so the outer
blocks leave it alone) and is kept as the process's `last_interrupt()`: Typer turns the interrupt
into an exit code before the CLI sees it, and the blocks have unwound by then.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Optional

_ATTR = "fvar_where"
_last: list = [None]


def mark_interrupt(exc: BaseException, text: str) -> None:
    """Attach `text` to an interrupt unless an inner block already described it."""
    if getattr(exc, _ATTR, None) is None:
        setattr(exc, _ATTR, text)
        _last[0] = text


def last_interrupt() -> Optional[str]:
    """The description of this process's latest interrupt since `reset()`, or None."""
    return _last[0]


def reset() -> None:
    _last[0] = None


@contextmanager
def on_interrupt(describe: Callable[[], str]) -> Iterator[None]:
    """While active, a KeyboardInterrupt carries `describe()` (evaluated when it happens)."""
    try:
        yield
    except KeyboardInterrupt as e:
        try:
            mark_interrupt(e, describe())
        except Exception:  # a description must never replace the interrupt with another error
            pass
        raise
