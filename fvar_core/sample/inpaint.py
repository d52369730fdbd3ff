"""Zero-shot in-/out-painting (docs/design.md §8, docs/var-compat.md §5): sample with the image's own tokens kept.

The image is encoded with the checkpoint's tokenizer; at every scale the tokens inside the known
region are replaced by the image's own (in the tokens and in f̂, so every later scale is
teacher-forced on them) and the rest is sampled — VAR's `autoregressive_infer_cfg_with_mask`.

Masks. Users draw a mask in the input image's pixels: **white = generate, black = keep** (a box
marks the region to generate). The pixel mask goes through the same resize + centre crop as the
image, is thresholded at ½, and a token is generated when any pixel of its patch (16 × 16 px for
VAR's tokenizer) is — the generated region covers every white pixel, rounded outwards to the
token grid. Per scale, VAR's rule resamples that (P, P) keep mask (P the last patch number):
bilinear to pn × pn (align_corners False), keep where > ½, and the 1 × 1 scale is always kept.

Outpainting is canvas extension: the model only makes images of its preset's resolution R, so the
canvas is R × R (that is what 'supported' means) and the input, at its own pixel size (at most
R × R), sits at the canvas centre. Outside it the canvas is filled by repeating the image's edge
pixels (the encoder sees image-like colours instead of a flat grey; those tokens are generated
anyway) and every token not wholly inside the image is generated.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from fvar_core.checks import check_labels
from fvar_core.config import PyramidConfig, SampleConfig
from fvar_core.errors import UserError
from fvar_core.sample.sampler import SampleResult, sample_batch
from fvar_core.atomic import ensure_dir
from fvar_core.data.images import fit_square, load_image, open_rgb, save_png
from fvar_core.sample.outputs import write_json

PathLike = Union[str, Path]
Box = Tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels, x1 / y1 exclusive


# ------------------------------------------------------------------------------------------------
# Masks in the user's pixels
# ------------------------------------------------------------------------------------------------

def parse_box(spec: str, width: int, height: int) -> Box:
    """'x0,y0,x1,y1' in the input image's pixels (integers; x1, y1 exclusive), or as fractions of its
    width and height when any value has a decimal point ('0.1,0.1,0.8,0.8', VAR's notebook form)."""
    parts = [p.strip() for p in str(spec).split(",")]
    try:
        vals = [float(p) for p in parts]
    except ValueError:
        vals = []
    if len(parts) != 4 or len(vals) != 4:
        raise UserError(f"--box {spec!r}: expected x0,y0,x1,y1 (pixels, or fractions like 0.1,0.1,0.8,0.8)")
    if any("." in p for p in parts):
        x0, y0, x1, y1 = (round(v * s) for v, s in zip(vals, (width, height, width, height)))
    elif all(v.is_integer() for v in vals):
        x0, y0, x1, y1 = (int(v) for v in vals)
    else:  # pragma: no cover - float() of a digit string without '.' is an integer
        raise UserError(f"--box {spec!r}: pixel coordinates must be integers")
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        raise UserError(f"--box {spec}: box ({x0},{y0})-({x1},{y1}) is empty or outside the image "
                        f"({width}x{height}; need 0 ≤ x0 < x1 ≤ {width}, 0 ≤ y0 < y1 ≤ {height})")
    return x0, y0, x1, y1


def box_mask(box: Box, width: int, height: int) -> torch.Tensor:
    """(H, W) bool, True (generate) inside the box."""
    x0, y0, x1, y1 = box
    m = torch.zeros(height, width, dtype=torch.bool)
    m[y0:y1, x0:x1] = True
    return m


def load_mask(path: PathLike, width: int, height: int) -> torch.Tensor:
    """A mask image of the input's size, pure black / white (white = generate) → (H, W) bool."""
    import numpy as np

    im = open_rgb(path)
    if im.size != (width, height):
        raise UserError(f"mask {path} is {im.size[0]}x{im.size[1]}, the image is {width}x{height}: the mask must "
                        f"have the input image's size (white = generate, black = keep)")
    a = np.asarray(im)  # (H, W, 3) uint8
    white, black = (a == 255).all(-1), (a == 0).all(-1)
    bad = int((~(white | black)).sum())
    if bad:
        raise UserError(f"mask {path} is not binary: {bad} pixel(s) are neither black (0) nor white (255) "
                        f"(save it as PNG, without anti-aliasing; white = generate)")
    m = torch.from_numpy(white.copy())
    if not m.any():
        raise UserError(f"mask {path} has no white pixel: nothing to generate (white = generate, black = keep)")
    return m


# ------------------------------------------------------------------------------------------------
# Geometry: the model's R × R frame and its token grid
# ------------------------------------------------------------------------------------------------

def _fit_size(h: int, w: int, size: int) -> Tuple[int, int, int, int]:
    """(nh, nw, top, left) of images.fit_square: shorter side to `size`, centre crop."""
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    return nh, nw, (nh - size) // 2, (nw - size) // 2


def fit_mask(mask: torch.Tensor, size: int) -> torch.Tensor:
    """(H, W) bool in the input's pixels → (size, size) bool with the image's resize + centre crop
    (bilinear on the 0/1 mask, then ≥ ½)."""
    h, w = mask.shape
    nh, nw, top, left = _fit_size(h, w, size)
    m = mask.float()[None, None]
    if (nh, nw) != (h, w):
        m = F.interpolate(m, size=(nh, nw), mode="bilinear", align_corners=False, antialias=(nh < h or nw < w))
    return m[0, 0, top:top + size, left:left + size] >= 0.5


def token_mask(pixel_generate: torch.Tensor, patch: int) -> torch.Tensor:
    """(R, R) bool pixels to generate → (P, P) bool tokens to generate: any pixel of the patch."""
    R = pixel_generate.shape[-1]
    P = R // patch
    return pixel_generate.view(P, patch, P, patch).any(dim=3).any(dim=1)


def keep_masks(generate: torch.Tensor, patch_nums: Sequence[int]) -> List[torch.Tensor]:
    """VAR's per-scale edit mask (docs/var-compat.md §5): (P, P) tokens to generate → K tensors (1, pn²) bool,
    True = keep the given token. keep (P, P) is bilinearly resampled to pn × pn (align_corners
    False), kept where > ½; the 1 × 1 scale (pn² ≤ 3) is always kept."""
    keep = (~generate).float()[None, None]  # (1, 1, P, P)
    out = []
    for pn in patch_nums:
        if pn * pn <= 3:
            m = torch.ones(1, pn * pn, dtype=torch.bool)
        else:
            m = (F.interpolate(keep, size=(pn, pn), mode="bilinear", align_corners=False) > 0.5).view(1, pn * pn)
        out.append(m)
    return out


@dataclass
class EditInput:
    """What the model edits: image (3, R, R) in [0, 1] as encoded; pixels (R, R) bool and tokens
    (P, P) bool: True = generate."""

    image: torch.Tensor
    pixels: torch.Tensor
    tokens: torch.Tensor
    mode: str  # 'inpaint' | 'outpaint'


def prepare_inpaint(image: torch.Tensor, generate: torch.Tensor, resolution: int, patch: int) -> EditInput:
    """image (3, H, W) in [0, 1] and its (H, W) bool mask (True = generate) → the R × R edit input."""
    if tuple(generate.shape) != tuple(image.shape[1:]):
        raise UserError(f"mask {tuple(generate.shape)} does not match the image {tuple(image.shape[1:])}")
    img = fit_square(image, resolution)
    pix = fit_mask(generate, resolution)
    if not pix.any():
        raise UserError("the region to generate vanishes at the model's resolution "
                        f"({resolution}x{resolution} after resize + centre crop): draw a larger one")
    return EditInput(img, pix, token_mask(pix, patch), "inpaint")


def parse_canvas(spec: str) -> Tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*", str(spec))
    if not m:
        raise UserError(f"--canvas {spec!r}: expected WIDTHxHEIGHT, e.g. 256x256")
    return int(m.group(1)), int(m.group(2))


def prepare_outpaint(image: torch.Tensor, canvas: Tuple[int, int], resolution: int, patch: int,
                     preset_name: str = "", fit: Optional[float] = None) -> EditInput:
    """image (3, h, w) in [0, 1] centred on a canvas (W, H) that must be R × R: at its own size, or
    with `fit` resized (antialiased bicubic) so that its longer side is fit · R."""
    W, H = canvas
    R = resolution
    if (W, H) != (R, R):
        raise UserError(f"--canvas {W}x{H} is not supported: {preset_name or 'this model'} makes {R}x{R} images "
                        f"only, so outpainting extends the image to a {R}x{R} canvas")
    if fit is not None:
        if not 0 < fit < 1:
            raise UserError(f"--fit {fit}: the image's share of the canvas side must lie strictly between 0 and 1")
        _, h, w = image.shape
        s = fit * R / max(h, w)
        size = (max(1, round(h * s)), max(1, round(w * s)))
        image = F.interpolate(image[None], size=size, mode="bicubic", antialias=True, align_corners=False)[0].clamp(0, 1)
    _, h, w = image.shape
    if h > R or w > R:
        raise UserError(f"image {w}x{h} does not fit the {R}x{R} canvas: shrink it into the canvas with --fit "
                        f"(e.g. --fit 0.75), or use inpainting")
    if (h, w) == (R, R):
        raise UserError(f"image is already {R}x{R}, the whole canvas: nothing to outpaint; shrink it into the "
                        f"canvas with --fit (e.g. --fit 0.75)")
    top, left = (R - h) // 2, (R - w) // 2
    canvas_img = F.pad(image[None], (left, R - w - left, top, R - h - top), mode="replicate")[0]
    pix = torch.ones(R, R, dtype=torch.bool)
    pix[top:top + h, left:left + w] = False
    tok = token_mask(pix, patch)
    if tok.all():
        raise UserError(f"image {w}x{h} covers no whole {patch}x{patch} token of the canvas: nothing to keep")
    return EditInput(canvas_img.contiguous(), pix, tok, "outpaint")


# ------------------------------------------------------------------------------------------------
# Editing
# ------------------------------------------------------------------------------------------------

@torch.no_grad()
def encode_known(tokenizer, image: torch.Tensor, pyramid: Optional[PyramidConfig] = None) -> List[torch.Tensor]:
    """image (B, 3, R, R) in [0, 1] → K token maps (B, pn²) long, coded as the transformer's training
    tokens were: with the transformer preset's focus pyramid (the one its token shards were checked
    against; noise off: editing is deterministic), VAR's plain pyramid when `pyramid` is None or
    kernel 'area'."""
    x = image * 2 - 1
    if pyramid is None or pyramid.kernel == "area":
        return tokenizer.img_to_idx(x)
    return tokenizer.encode_with_pyramid(x, pyramid.model_copy(update={"noise": False}), tokenizer.resolution).structure


@dataclass
class EditResult:
    """tokens: K (1, pn²) sampled tokens; image (3, R, R) in [0, 1]; given: K (1, pn²) the input's
    tokens; keep: K (1, pn²) bool, True where the input's tokens were kept."""

    tokens: List[torch.Tensor]
    image: torch.Tensor
    given: List[torch.Tensor]
    keep: List[torch.Tensor]


def edit(var, tokenizer, inp: EditInput, label: int, seed: int, settings: SampleConfig,
         pyramid: Optional[PyramidConfig] = None) -> EditResult:
    """Sample one image keeping the input's tokens outside `inp.tokens` at every scale.
    label = var.num_classes for unconditional in-/out-painting."""
    device = var.pos_1LC.device
    given = [t.cpu() for t in encode_known(tokenizer, inp.image[None].to(device), pyramid)]
    keep = keep_masks(inp.tokens, var.patch_nums)
    res: SampleResult = sample_batch(var, tokenizer, torch.tensor([int(label)]), [int(seed)], settings,
                                     known=given, known_mask=keep)
    return EditResult(res.tokens, res.images[0], given, keep)


def mask_image(generate: torch.Tensor, size: int) -> torch.Tensor:
    """(P, P) or (R, R) bool → (3, size, size) white-on-black picture (nearest upsampling)."""
    m = generate.float()[None, None]
    return F.interpolate(m, size=(size, size), mode="nearest")[0].expand(3, -1, -1).contiguous()


def side_by_side(inp: EditInput, result: torch.Tensor, pad: int = 4) -> torch.Tensor:
    """input | token mask (white = generated) | result, each (3, R, R) → (3, R, 3R + 2·pad)."""
    R = inp.image.shape[-1]
    sep = torch.ones(3, R, pad)
    return torch.cat([inp.image.cpu(), sep, mask_image(inp.tokens, R), sep, result.cpu()], dim=2)


# ------------------------------------------------------------------------------------------------
# `fvar inpaint`: from files to files
# ------------------------------------------------------------------------------------------------

@dataclass
class EditRun:
    compare: Path
    result: Path
    sidecar: Path
    mode: str
    generated_tokens: int
    total_tokens: int


def check_edit_request(*, box: Optional[str], mask: Optional[PathLike], outpaint: bool, canvas: Optional[str],
                       fit: Optional[float]) -> None:
    """The option combinations of `fvar inpaint`, checked before any model is loaded."""
    if outpaint and (box is not None or mask is not None):
        raise UserError("--outpaint generates everything around the image: give no --box or --mask with it")
    if (canvas is not None or fit is not None) and not outpaint:
        raise UserError("--canvas and --fit are for --outpaint")
    if not outpaint and (box is None) == (mask is None):
        raise UserError("give exactly one of --box x0,y0,x1,y1 or --mask MASK.png (the region to generate), "
                        "or --outpaint")


def edit_to_dir(models, image_path: PathLike, out_dir: PathLike, *, box: Optional[str] = None,
                mask: Optional[PathLike] = None, outpaint: bool = False, canvas: Optional[str] = None,
                fit: Optional[float] = None, label: Optional[int] = None, seed: int = 0,
                settings: SampleConfig) -> EditRun:
    """Validate the request, edit, write compare.png (input | mask | result), result.png, edit.json.
    label None = unconditional (the null class)."""
    check_edit_request(box=box, mask=mask, outpaint=outpaint, canvas=canvas, fit=fit)
    preset = models.preset
    R, patch = preset.resolution, preset.patch_size
    num_classes = models.var.num_classes
    label = num_classes if label is None else int(label)
    check_labels([label], num_classes, "--class", allow_null=True)
    image = load_image(image_path)  # (3, H, W)
    _, H, W = image.shape
    if outpaint:
        inp = prepare_outpaint(image, parse_canvas(canvas) if canvas else (R, R), R, patch, preset.name, fit=fit)
        kept = (~inp.pixels).nonzero()
        (y0, x0), (y1, x1) = kept.min(0).values.tolist(), kept.max(0).values.tolist()
        region = {"canvas": [R, R], "placed_at": [x0, y0], "placed_size": [x1 - x0 + 1, y1 - y0 + 1],
                  "fit": fit}
    else:
        if box is not None:
            b = parse_box(box, W, H)
            gen, region = box_mask(b, W, H), {"box": list(b)}
        else:
            gen, region = load_mask(mask, W, H), {"mask": str(mask)}
        inp = prepare_inpaint(image, gen, R, patch)
    out_dir = ensure_dir(Path(out_dir), "--out")
    res = edit(models.var, models.tokenizer, inp, label, seed, settings, pyramid=preset.pyramid)

    compare, result, sidecar = out_dir / "compare.png", out_dir / "result.png", out_dir / "edit.json"
    save_png(side_by_side(inp, res.image), compare)
    save_png(res.image, result)
    n_gen = int(inp.tokens.sum())
    write_json(sidecar, {
        "format": "fvar-edit", "version": 1, "mode": inp.mode, "input": str(image_path),
        "input_size": [W, H], "resolution": R, **region,
        "mask_convention": "white = generate, black = keep",
        "class": label, "unconditional": label == num_classes, "seed": seed,
        "settings": settings.model_dump(mode="json"),
        "checkpoint": models.identity["checkpoint"], "tokenizer": models.identity["tokenizer"],
        "generated_tokens_last_scale": n_gen, "tokens_last_scale": inp.tokens.numel(),
        "kept_tokens_per_scale": [int(k.sum()) for k in res.keep],
        "files": {"compare": compare.name, "result": result.name}})
    return EditRun(compare, result, sidecar, inp.mode, n_gen, inp.tokens.numel())
