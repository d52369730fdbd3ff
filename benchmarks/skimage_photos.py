"""Write crops of scikit-image's bundled photographs as an ImageFolder (one class per photograph).

The alias audit (docs/alias-audit.md) uses them as real images with fine texture — brick, grass,
gravel, text, a cat's fur — beside Fashion-MNIST. Crops are taken at the photograph's own
resolution (no resize), so the pixel-level detail that aliases is kept.

    pip install scikit-image        # or: pip install -e ".[experiments]"
    python benchmarks/skimage_photos.py OUT [--size 32] [--per-photo 32] [--seed 0]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

# Photographs shipped inside the wheel (no download); synthetic images (checkerboard, phantom,
# colour wheel, logo, blobs) are left out.
PHOTOS = ("astronaut", "brick", "camera", "chelsea", "clock", "coffee", "coins", "grass", "gravel",
          "hubble_deep_field", "immunohistochemistry", "moon", "page", "retina", "rocket", "text")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--per-photo", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    try:
        import skimage.data as data
    except ImportError:
        print("error: scikit-image is not installed (pip install scikit-image)", file=sys.stderr)
        return 2
    rng = np.random.default_rng(a.seed)
    for name in PHOTOS:
        img = np.asarray(getattr(data, name)())
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, axis=2)
        img = img[..., :3].astype(np.uint8)
        H, W = img.shape[:2]
        d = a.out / name
        d.mkdir(parents=True, exist_ok=True)
        for i in range(a.per_photo):
            y, x = int(rng.integers(0, H - a.size + 1)), int(rng.integers(0, W - a.size + 1))
            Image.fromarray(img[y:y + a.size, x:x + a.size]).save(d / f"{i:03d}.png")
    print(f"wrote {len(PHOTOS)} × {a.per_photo} crops of {a.size} px to {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
