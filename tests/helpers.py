"""Test data the tests generate: image folders of shapes, gradients and text-like strokes."""
from __future__ import annotations

from pathlib import Path

from fvar_core.focus.testimages import draw_image_folder


def make_folder(root: Path, per_class: int = 8, size: int = 80, corrupt: int = 0) -> Path:
    """2 classes of shapes, gradients and text-like strokes; `corrupt` unreadable files added."""
    draw_image_folder(root, per_class=per_class, size=size, seed=0)
    for j in range(corrupt):
        (root / "shapes" / f"broken{j}.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    return root


def kill_at_step(monkeypatch, task_cls, step: int):
    """Make task_cls.step raise KeyboardInterrupt (what a kill looks like to the loop) at `step`;
    returns a function that undoes it."""
    real = task_cls.step

    def dying(self, batch, s):
        if s == step:
            raise KeyboardInterrupt
        return real(self, batch, s)

    monkeypatch.setattr(task_cls, "step", dying)
    return lambda: monkeypatch.setattr(task_cls, "step", real)
