"""Image file I/O that never trusts the file: every bad one becomes a one-line `UserError`.

Tensors here are float32 (3, H, W) in [0, 1]; models convert to [-1, 1] themselves.
"""
from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Iterator, Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from fvar_core.atomic import atomic_write_bytes
from fvar_core.errors import UserError
from fvar_core.focus.testimages import BUILTIN_IMAGES

# Pillow warns above MAX_IMAGE_PIXELS and raises above twice that; a decompression bomb is refused
# at the warning already, so a 100k×100k "PNG" of a few kB never reaches memory.
MAX_PIXELS = 16384 * 16384


@contextlib.contextmanager
def bomb_guard(max_pixels: int = MAX_PIXELS) -> Iterator[None]:
    """Pillow's pixel limit at `max_pixels`, its bomb warning raised as an error; restored after.

    This is process-wide Pillow state: wrap a whole batch of (possibly threaded) opens in one guard.
    """
    old_limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = old_limit


# What Pillow raises for a file it cannot read: a bomb, an unknown format, truncated or corrupt data
# (OSError "image file is truncated", SyntaxError, ValueError, EOFError from some decoders).
UNREADABLE = (Image.DecompressionBombWarning, Image.DecompressionBombError, UnidentifiedImageError,
              OSError, SyntaxError, ValueError, EOFError)


def unreadable_reason(path: Union[str, Path], exc: BaseException, max_pixels: int = MAX_PIXELS) -> str:
    """The one-line reason a file could not be read, from the exception Pillow raised."""
    if isinstance(exc, (Image.DecompressionBombWarning, Image.DecompressionBombError)):
        return f"{path}: refused, more than {max_pixels:,} pixels (decompression bomb?)"
    if isinstance(exc, UnidentifiedImageError):
        return f"{path}: not an image file (or a format Pillow cannot read)"
    return f"{path}: corrupt or truncated image ({exc})"


def open_rgb(path: Union[str, Path], max_pixels: int = MAX_PIXELS) -> Image.Image:
    """An image file → a fully decoded RGB PIL image (alpha dropped, greyscale expanded)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"no such file: {path}")
    if path.is_dir():
        raise UserError(f"{path} is a folder, expected an image file")
    try:
        with bomb_guard(max_pixels), Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except UNREADABLE as e:
        raise UserError(unreadable_reason(path, e, max_pixels)) from None


def load_image(path: Union[str, Path], max_pixels: int = MAX_PIXELS) -> torch.Tensor:
    """An image file → (3, H, W) float32 in [0, 1], RGB (alpha dropped, greyscale expanded)."""
    arr = np.asarray(open_rgb(path, max_pixels), dtype=np.float32) / 255.0
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def fit_square(img: torch.Tensor, size: int) -> torch.Tensor:
    """(3, H, W) → (3, size, size): shorter side resized to `size` (antialiased), centre crop."""
    _, h, w = img.shape
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    if (nh, nw) != (h, w):
        img = torch.nn.functional.interpolate(img[None], size=(nh, nw), mode="bicubic",
                                              antialias=True, align_corners=False)[0].clamp(0, 1)
    top, left = (nh - size) // 2, (nw - size) // 2
    return img[:, top:top + size, left:left + size].contiguous()


def to_pil(img: torch.Tensor) -> Image.Image:
    """(3, H, W) in [0, 1] → an 8-bit RGB PIL image (rounded half up: the pixels fvar's PNGs hold)."""
    arr = (img.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255.0 + 0.5).astype(np.uint8)
    return Image.fromarray(arr)


def save_png(img: Union[torch.Tensor, Image.Image], path: Union[str, Path]) -> None:
    """(3, H, W) in [0, 1] or a PIL image → PNG file, written atomically."""
    if isinstance(img, torch.Tensor):
        img = to_pil(img)
    import io

    buf = io.BytesIO()
    img.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def load_or_builtin(spec: str, size: int) -> tuple[torch.Tensor, str]:
    """An image path or a built-in test image name → ((3, size, size) in [0, 1], display name).

    A file of that name wins over a built-in of the same name.
    """
    if not Path(spec).exists() and spec in BUILTIN_IMAGES:
        return BUILTIN_IMAGES[spec](size).float(), f"built-in {spec}"
    if not Path(spec).exists() and not Path(spec).suffix:
        raise UserError(f"no such file or built-in image: {spec} (built-ins: {', '.join(BUILTIN_IMAGES)})")
    return fit_square(load_image(spec), size), Path(spec).name
