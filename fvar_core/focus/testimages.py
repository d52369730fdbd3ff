"""Built-in images: test patterns to look at the focus pyramid with (`fvar pyramid ...`), a small
drawn image folder for demos, tests (`draw_image_folder`, `fvar quickstart`).

Each built-in is a float32 (3, N, N) tensor in [0, 1]: a zone plate (every frequency up to
Nyquist, radially) and a resolution chart (sharp strokes, line-pair groups, a Siemens star,
letters) — both moiré visibly when area-downsampled.
"""
from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Callable, Union

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont


def zone_plate(n: int = 256) -> torch.Tensor:
    """(3, n, n): 0.5 + 0.5·cos(π r²/n)·w(r); local frequency r/n cycles/px reaches Nyquist at the rim.

    r is the distance of the pixel centre from the image centre (coordinates arange(n) − n/2 + ½);
    w is a raised-cosine taper, 1 for r < n/2 − 8 and 0 from r = n/2 on, so the corners are flat grey.
    This exact image is what docs/design.md §4's 20–30 dB leakage figures were measured on: keep it.
    """
    c = torch.arange(n, dtype=torch.float64) - n / 2 + 0.5
    r = torch.sqrt(c[:, None] ** 2 + c[None, :] ** 2)
    w = 0.5 + 0.5 * torch.cos(math.pi * torch.clamp((r - (n / 2 - 8)) / 8, 0, 1))
    z = 0.5 + 0.5 * torch.cos(math.pi * r ** 2 / n) * w
    return z.to(torch.float32).expand(3, n, n).contiguous()


def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=max(size, 6))


def resolution_chart(n: int = 256) -> torch.Tensor:
    """(3, n, n) grey chart drawn at n pixels with hard (non-anti-aliased) edges.

    Layout in fractions of n so it scales: a Siemens star and concentric rings (left), line-pair
    groups of 2–8 px period both ways (top right), a 1-px checkerboard and fine diagonal hatching
    (middle right), and letters at several sizes (bottom). Dark 15/255 on light 235/255.
    """
    img = Image.new("L", (n, n), 235)
    d = ImageDraw.Draw(img)
    u = n / 256  # layout unit: 1 px at 256²

    # Siemens star: 36 black/white spoke pairs, so the spoke period falls below 2 px near the centre.
    cx, cy, rad = 64 * u, 64 * u, 56 * u
    spokes = 36
    for i in range(spokes):
        a0 = 2 * math.pi * i / spokes
        a1 = a0 + math.pi / spokes
        d.polygon([(cx, cy), (cx + rad * math.cos(a0), cy + rad * math.sin(a0)),
                   (cx + rad * math.cos(a1), cy + rad * math.sin(a1))], fill=15)

    # Concentric rings of 4 px period under the star: every orientation at one frequency.
    for rr in range(int(28 * u), 0, -int(2 * u) or -1):
        d.ellipse([64 * u - rr, 150 * u - rr, 64 * u + rr, 150 * u + rr],
                  fill=15 if (rr // max(int(2 * u), 1)) % 2 == 0 else 235)

    # Line-pair groups of period 2, 4, 6, 8 px, vertical bars above horizontal ones.
    x0, y0 = 132 * u, 8 * u
    for gi, half_period in enumerate((1, 2, 3, 4)):
        gx = x0 + gi * 30 * u
        w = max(int(round(half_period * u)), 1)
        for j in range(max(int(24 * u) // (2 * w), 2)):
            xs = int(gx + j * 2 * w)
            d.rectangle([xs, y0, xs + w - 1, y0 + 40 * u], fill=15)
            ys = int(y0 + 48 * u + j * 2 * w)
            d.rectangle([gx, ys, gx + 24 * u, ys + w - 1], fill=15)

    # 1-px checkerboard and 45° hatching: pure Nyquist content that area-down turns into flat grey
    # or bold moiré depending on the phase.
    arr = np.asarray(img).copy()
    ys, ye, xs, xe = int(132 * u), int(176 * u), int(132 * u), int(188 * u)
    yy, xx = np.mgrid[ys:ye, xs:xe]
    arr[ys:ye, xs:xe] = np.where((yy + xx) % 2 == 0, 15, 235)
    xs2, xe2 = int(196 * u), int(248 * u)
    yy, xx = np.mgrid[ys:ye, xs2:xe2]
    arr[ys:ye, xs2:xe2] = np.where((yy + xx) % 5 < 2, 15, 235)
    img = Image.fromarray(arr)
    d = ImageDraw.Draw(img)
    d.fontmode = "1"  # binary glyphs: keep every edge hard

    # Letters at several sizes: text-like strokes, the content a generator most visibly garbles.
    y = 184 * u
    for size in (28, 16, 10, 7):
        d.text((8 * u, y), "FVAR focus 0123", fill=15, font=_font(int(size * u)))
        y += (size + 3) * u
    d.rectangle([0, 0, n - 1, n - 1], outline=15)

    t = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)
    return t.expand(3, n, n).contiguous()


BUILTIN_IMAGES: dict[str, Callable[[int], torch.Tensor]] = {
    "zone-plate": zone_plate,
    "chart": resolution_chart,
}


DRAWN_CLASSES = ("shapes", "strokes")


def draw_image_folder(root: Union[str, Path], per_class: int = 8, size: int = 80, seed: int = 0) -> Path:
    """An ImageFolder of 2 classes drawn from `seed`: 'shapes' (ellipses and rectangles) and
    'strokes' (text and thin lines), each over a smooth colour ramp; PNGs of size × (size + 0|8|16)
    px, so loaders see more than one aspect ratio. Returns root."""
    root = Path(root)
    rng = random.Random(seed)
    for c, name in enumerate(DRAWN_CLASSES):
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            im = Image.new("RGB", (size, size + 8 * (i % 3)))
            px = im.load()
            a, b, e = (rng.randrange(256) for _ in range(3))
            for y in range(im.height):
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
    return root
