"""Test data the tests generate: image folders of shapes, gradients and text-like strokes."""
from __future__ import annotations

import random
from pathlib import Path

from PIL import Image, ImageDraw


def make_folder(root: Path, per_class: int = 8, size: int = 80, corrupt: int = 0) -> Path:
    """2 classes of shapes, gradients and text-like strokes; `corrupt` unreadable files added."""
    rng = random.Random(0)
    for c, name in enumerate(("shapes", "strokes")):
        d = root / name
        d.mkdir(parents=True)
        for i in range(per_class):
            im = Image.new("RGB", (size, size + 8 * (i % 3)))
            px = im.load()
            a, b, e = (rng.randrange(256) for _ in range(3))
            for y in range(im.height):  # a smooth colour ramp under the shapes / strokes
                for x in range(im.width):
                    px[x, y] = (a + (255 - a) * x // im.width, b * (im.height - y) // im.height, e)
            dr = ImageDraw.Draw(im)
            for _ in range(4):
                x0, y0 = rng.randrange(size - 20), rng.randrange(size - 20)
                col = tuple(rng.randrange(256) for _ in range(3))
                if c == 0:
                    (dr.ellipse if rng.random() < 0.5 else dr.rectangle)(
                        [x0, y0, x0 + rng.randrange(8, 20), y0 + rng.randrange(8, 20)], fill=col)
                else:
                    dr.text((x0, y0), "fvar" if rng.random() < 0.5 else "VAR 1k", fill=col)
                    dr.line([x0, y0, x0 + 18, y0 + rng.randrange(-9, 9)], fill=col, width=1)
            im.save(d / f"{i:02d}.png")
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
