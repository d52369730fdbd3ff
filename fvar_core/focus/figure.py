"""One picture of a focus pyramid (`fvar pyramid visualize`): D_k, L_k, A_k side by side.

Rows: D_k (VAR's area pyramid), L_k (the focus pyramid), A_k (alias residual, amplified and centred
on mid-grey). One column per scale. Views are enlarged with nearest-neighbour so the moiré that
area-down produces stays visible instead of being smoothed away by the display resampling.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from fvar_core.focus.pyramid import PyramidViews

_BG = (255, 255, 255)
_INK = (20, 20, 20)


def nice_gain(peak: float, target: float = 0.5) -> float:
    """Largest 1/2/5·10ⁿ gain with gain·peak ≤ target (so ±peak maps within mid-grey ± target)."""
    if not math.isfinite(peak) or peak <= 0:
        return 1.0
    raw = target / peak
    exp = math.floor(math.log10(raw))
    for m in (5, 2, 1):
        if m * 10 ** exp <= raw * (1 + 1e-9):
            return float(m * 10 ** exp)
    return float(10 ** exp)


def _fonts(size: int) -> tuple[ImageFont.FreeTypeFont, ImageFont.FreeTypeFont, bool]:
    """(font, smaller font, has_greek): Pillow's bundled font has no ρ/×/−, so prefer DejaVu Sans
    where the system has it and fall back to ASCII labels otherwise."""
    try:
        return (ImageFont.truetype("DejaVuSans.ttf", size), ImageFont.truetype("DejaVuSans.ttf", size - 3),
                True)
    except OSError:
        return ImageFont.load_default(size=size), ImageFont.load_default(size=size - 3), False


def _fmt_gain(g: float) -> str:
    return f"{g:g}" if g >= 1e-3 else f"{g:.0e}"


def _to_rgb(view: torch.Tensor, cell: int) -> Image.Image:
    """(C, v, v) in [0, 1] → (cell, cell) RGB image, nearest-neighbour."""
    t = view.detach().float().clamp(0, 1).cpu()
    if t.shape[0] == 1:
        t = t.expand(3, *t.shape[1:])
    arr = (t[:3].permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
    return Image.fromarray(arr, "RGB").resize((cell, cell), Image.NEAREST)


def pyramid_figure(views: PyramidViews, title: str = "", cell: int = 160) -> Image.Image:
    """RGB figure of the first image of the batch: 3 rows × K columns of `cell`-px tiles plus labels.

    The residual row shows 0.5 + gain·A_k (clipped) with gain = `nice_gain` of the 99th percentile of
    |A| over all scales, written on the row label ("×gain"). A percentile, not the maximum: a few
    strong edges would otherwise push the gain below 1 and hide the alias patterns.
    """
    k_total = len(views.sizes)
    mags = torch.cat([a[0].detach().abs().flatten().float().cpu() for a in views.A])
    peak = float(torch.quantile(mags[:1_000_000], 0.99)) if mags.numel() else 0.0
    gain = nice_gain(peak)
    fs = max(cell // 10, 12)
    font, small, greek = _fonts(fs)
    rho_s, times, minus = ("ρ", "×", "−") if greek else ("rho", "x", "-")
    rows = [
        ("D  area", "VAR pyramid", [d[0] for d in views.D]),
        ("L  focus", "FVAR pyramid", [l[0] for l in views.L]),
        (f"A = D {minus} L", f"residual {times}{_fmt_gain(gain)}", [0.5 + gain * a[0] for a in views.A]),
    ]
    pad, label_w = 6, 8 * fs
    title_h = fs + 2 * pad if title else 0
    head_h = 2 * fs + 2 * pad
    width = label_w + k_total * (cell + pad) + pad
    height = title_h + head_h + len(rows) * (cell + pad) + pad
    fig = Image.new("RGB", (width, height), _BG)
    draw = ImageDraw.Draw(fig)
    if title:
        draw.text((pad, pad), title, fill=_INK, font=font)
    for k, (v, rho) in enumerate(zip(views.sizes, views.rhos)):
        x = label_w + k * (cell + pad)
        draw.text((x, title_h + pad), f"{v}px", fill=_INK, font=font)
        draw.text((x, title_h + pad + fs), f"{rho_s}={rho:.1f}", fill=_INK, font=small)
    for r, (name, sub, tiles) in enumerate(rows):
        y = title_h + head_h + r * (cell + pad)
        draw.text((pad, y + cell // 2 - fs), name, fill=_INK, font=font)
        draw.text((pad, y + cell // 2 + 2), sub, fill=_INK, font=small)
        for k, tile in enumerate(tiles):
            fig.paste(_to_rgb(tile, cell), (label_w + k * (cell + pad), y))
    return fig
