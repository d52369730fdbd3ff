"""`fvar.Pipeline`: load a generator in one line, then sample, inpaint, encode and decode.

    pipe = fvar.Pipeline.from_pretrained("runs/d16")             # a run, or a var checkpoint folder
    pipe = fvar.Pipeline.from_pretrained("var_d16.pth", tokenizer="vae_ch160v4096z32.pth")  # official files
    images = pipe(classes=[207, 388], seed=0)                    # PIL images, one per class
    pipe = fvar.Pipeline.from_pretrained("fmnist-32")            # the model bundled with fvar
    images = pipe(classes=["sneaker", "ankle boot"], n=4)        # class names work wherever ids do

Everything here is a thin layer over `fvar_core` (the same functions `fvar sample` / `fvar inpaint`
call): loading checks that the tokenizer fits the transformer, sampling uses the preset's settings
unless told otherwise, and every image has its own seed (`rng="official"` for VAR's stream).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple, Union

import torch
from PIL import Image

from fvar_core.config import Preset
from fvar_core.data.images import fit_square, load_image
from fvar_core.data.images import to_pil as image_to_pil
from fvar_core.errors import UserError
from fvar_core.sample.inpaint import box_mask, edit, encode_known, load_mask, prepare_inpaint
from fvar_core.sample.loading import Models, attach_refiner, open_models
from fvar_core.sample.sampler import decode_images, sample, settings_from

PathLike = Union[str, Path]
ImageLike = Union[PathLike, Image.Image, torch.Tensor]
Classes = Union[int, str, Sequence[Union[int, str]]]  # ids, names, or '--class' text such as "sneaker,0-3"


def _to_tensor(image: ImageLike) -> torch.Tensor:
    """A path, a PIL image or a (3, H, W) tensor in [0, 1] → (3, H, W) float32 in [0, 1]."""
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != 3:
            raise UserError(f"an image tensor must be (3, H, W) in [0, 1], got shape {tuple(image.shape)}")
        return image.float()
    if isinstance(image, Image.Image):
        rgb = torch.frombuffer(bytearray(image.convert("RGB").tobytes()), dtype=torch.uint8)
        return rgb.view(image.height, image.width, 3).permute(2, 0, 1).float() / 255
    return load_image(image)


def to_pil(images: torch.Tensor) -> List[Image.Image]:
    """(N, 3, H, W) in [0, 1] → N PIL images, the pixels `fvar sample` writes to its PNGs."""
    return [image_to_pil(i) for i in images]


class Pipeline:
    """A transformer and the tokenizer that decodes it, on one device, ready to generate."""

    def __init__(self, models: Models):
        self.models = models

    @classmethod
    def from_pretrained(cls, source: PathLike, *, tokenizer: Optional[PathLike] = None,
                        device: Union[str, torch.device, None] = "auto", preset: Optional[str] = None,
                        overrides: Sequence[str] = (), refiner: Optional[PathLike] = None) -> "Pipeline":
        """source: a run directory (its newest complete checkpoint), a var checkpoint folder, or an
        official `var_d*.pth` (then `tokenizer` is the official VQ-VAE `.pth`, and `preset` /
        `overrides` pick its architecture as `fvar convert import` does). tokenizer: default the
        one stored with the checkpoint. device: 'auto' (CUDA, MPS, CPU), 'cpu', 'cuda:N', …
        refiner: a second checkpoint over the same tokenizer for draft-and-refine sampling
        (`pipe(..., refine_from=K)`)."""
        models = open_models(source, tokenizer, device, preset, overrides)
        return cls(attach_refiner(models, refiner) if refiner is not None else models)

    # -------------------------------------------------------------------------------- facts
    @property
    def preset(self) -> Preset:
        return self.models.preset

    @property
    def device(self) -> torch.device:
        return self.models.device

    @property
    def num_classes(self) -> int:
        return self.models.var.num_classes

    @property
    def class_names(self) -> Optional[List[str]]:
        """The classes' names (the checkpoint's classes.json; ImageNet's for a 1,000-class official
        model), which `sample`/`inpaint` accept in place of ids; None when unknown."""
        return self.models.class_names

    @property
    def resolution(self) -> int:
        return self.preset.resolution

    # ------------------------------------------------------------------------------ generate
    def __call__(self, classes: Classes, **kwargs: Any):
        """`sample(classes, ...)`."""
        return self.sample(classes, **kwargs)

    def sample(self, classes: Classes, *, n: int = 1, seed: int = 0, output: str = "pil",
               batch_size: Optional[int] = None, **settings: Any):
        """n images of each class (ids or names, in the order given; num_classes = unconditional). Image i has
        seed seed + i. settings: any `SampleConfig` field (cfg, top_k, top_p, more_smooth, rng, and the
        speed-ups cfg_scales, prune, refine_from, kv_budget, decode_precision), default the checkpoint's
        preset. output 'pil' (list of PIL images) or 'tensor' ((N, 3, H, W)
        in [0, 1]; the per-scale tokens are `sample_tokens`)."""
        return self._output(self._sample(classes, n, seed, batch_size, settings).images, output)

    def sample_tokens(self, classes: Classes, *, n: int = 1, seed: int = 0,
                      batch_size: Optional[int] = None, **settings: Any) -> List[torch.Tensor]:
        """The per-scale tokens `sample` would draw: K tensors (N, pn_k²) long."""
        return self._sample(classes, n, seed, batch_size, settings, decode=False).tokens

    def _sample(self, classes: Classes, n: int, seed: int, batch_size: Optional[int],
                settings: dict, decode: bool = True):
        """n images of each class, image i with seed seed + i (the `fvar sample` rule)."""
        labels = [c for c in self.models.class_ids(classes, "classes") for _ in range(n)]
        cfg = settings_from(self.preset.sample, **settings)
        m = self.models
        return sample(m.var, m.tokenizer, labels, [seed + i for i in range(len(labels))], cfg,
                      batch_size=batch_size, decode=decode, refiner=m.refiner)

    def inpaint(self, image: ImageLike, *, box: Optional[Tuple[int, int, int, int]] = None,
                mask: Optional[Union[PathLike, torch.Tensor]] = None, cls: Optional[Union[int, str]] = None,
                seed: int = 0,
                output: str = "pil", **settings: Any):
        """Regenerate a region of `image` (VAR's zero-shot editing): `box` = (x0, y0, x1, y1) in the
        image's pixels, or `mask` (a path: white = generate; or an (H, W) bool tensor, True =
        generate). cls: the class to edit towards (None = unconditional). Returns one image."""
        img = _to_tensor(image)
        _, H, W = img.shape
        if (box is None) == (mask is None):
            raise UserError("inpaint needs exactly one of box=(x0, y0, x1, y1) or mask=")
        if box is not None:
            generate = box_mask(tuple(int(v) for v in box), W, H)
        elif isinstance(mask, torch.Tensor):
            generate = mask.bool()
        else:
            generate = load_mask(mask, W, H)
        label = self.num_classes if cls is None else self.models.class_ids([cls], "cls")[0]
        inp = prepare_inpaint(img, generate, self.resolution, self.preset.patch_size)
        res = edit(self.models.var, self.models.tokenizer, inp, label, seed, settings_from(self.preset.sample, **settings),
                   self.preset.pyramid)
        return self._output(res.image[None], output)[0]

    # ------------------------------------------------------------------------ tokens ⇄ images
    @torch.no_grad()
    def encode(self, image: Union[ImageLike, Sequence[ImageLike]]) -> List[torch.Tensor]:
        """Images (resized and centre-cropped to the model's resolution) → their per-scale tokens
        under the checkpoint's focus pyramid: K tensors (N, pn_k²) long — what `decode` reads."""
        many = image if isinstance(image, (list, tuple)) else [image]
        x = torch.stack([fit_square(_to_tensor(i), self.resolution) for i in many]).to(self.device)
        return [t.cpu() for t in encode_known(self.models.tokenizer, x, self.preset.pyramid)]

    @torch.no_grad()
    def decode(self, tokens: Sequence[torch.Tensor], output: str = "pil"):
        """Per-scale tokens (K tensors (N, pn_k²)) → N images."""
        quant = self.models.tokenizer.quantize
        f_hat = quant.idx_to_fhat([t.to(self.device) for t in tokens])
        return self._output(decode_images(self.models.tokenizer, f_hat).cpu(), output)

    @staticmethod
    def _output(images: torch.Tensor, output: str):
        if output == "tensor":
            return images
        if output == "pil":
            return to_pil(images)
        raise UserError(f"output must be 'pil' or 'tensor', got {output!r}")
