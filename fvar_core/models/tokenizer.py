"""The dual-path tokenizer: VAR's VQ-VAE (encoder, quant_conv, multi-scale quantizer,
post_quant_conv, decoder) plus FVAR's focus encoding (docs/design.md §5), state-dict compatible with the official one.

    img (B, 3, H, W) in [-1, 1] ──encoder──quant_conv──▶ f (B, Cz, H/16, W/16)
    f ──quantizer──▶ K token maps (B, pn_k²) [+ K alias maps] ──▶ f̂ ──post_quant_conv──decoder──▶ img

With `kernel: area` and no alias codebook this is VAR's VQ-VAE bit for bit; its `state_dict()`
(minus the alias codebook) is the official 324-key set, so `vae_ch160v4096z32.pth` loads through
`Tokenizer.load_official_state_dict` and our weights export through `Tokenizer.official_state_dict`
(the same two methods as `VAR`'s).
"""
from __future__ import annotations

import contextlib
import os
from typing import Dict, List, Mapping, Optional, Sequence

import torch
import torch.nn as nn

from fvar_core.config import PyramidConfig, TokenizerConfig
from fvar_core.checkpoints import key_diff, list_keys
from fvar_core.errors import UserError
from fvar_core.focus.pyramid import focus_images
from fvar_core.models.quantizer import ALIAS_EMBEDDING_KEY, FocusTokens, MultiScaleQuantizer, VQOutput
from fvar_core.models.vqvae import Decoder, Encoder

# Keys of our tokenizer that the official VQVAE does not have.
EXTENSION_KEYS = ("quantize." + ALIAS_EMBEDDING_KEY,)
EMA_KEY = "quantize.ema_vocab_hit_SV"


ENCODE_PRECISIONS = ("fp32", "bf16", "tf32")


@contextlib.contextmanager
def encode_precision(precision: str, device: torch.device):
    """The numerics of a no-grad encode: fp32 as is; bf16 autocast on the device; TF32 for CUDA
    matmuls and convolutions (restored afterwards; on the CPU TF32 does not exist: fp32)."""
    if precision not in ENCODE_PRECISIONS:
        raise UserError(f"encode precision {precision!r}: choose {', '.join(ENCODE_PRECISIONS)}")
    if precision == "bf16":
        with torch.autocast(device.type, dtype=torch.bfloat16):
            yield
    elif precision == "tf32" and device.type == "cuda":
        old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old
    else:
        yield


def encode_rows_budget(ch: int, resolution: int, device: torch.device, share: float = 0.5) -> int:
    """Encoder rows per call that fit in `share` of the device's free memory (CUDA: mem_get_info;
    CPU: available RAM), at ~8 live float32 tensors of the first level's size per row (no grad)."""
    per_row = 8 * 4 * ch * resolution * resolution
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):  # not a POSIX system: no chunking
            return 1 << 30
    return max(1, int(share * free) // per_row)


class Tokenizer(nn.Module):
    """VAR-compatible multi-scale VQ-VAE with an optional alias codebook."""

    def __init__(self, cfg: TokenizerConfig, patch_nums: Sequence[int]):
        super().__init__()
        self.cfg = cfg
        self.patch_nums = tuple(int(p) for p in patch_nums)
        self.downsample = cfg.downsample
        arch = dict(ch=cfg.ch, ch_mult=tuple(cfg.ch_mult), num_res_blocks=cfg.num_res_blocks,
                    z_channels=cfg.z_channels, dropout=cfg.dropout)
        # Registration order = official state_dict order: encoder, decoder, quantize, quant_conv, post_quant_conv.
        self.encoder = Encoder(**arch)
        self.decoder = Decoder(**arch)
        self.quantize = MultiScaleQuantizer(cfg, self.patch_nums)
        Cz = cfg.z_channels
        self.quant_conv = nn.Conv2d(Cz, Cz, kernel_size=3, stride=1, padding=1)
        self.post_quant_conv = nn.Conv2d(Cz, Cz, kernel_size=3, stride=1, padding=1)
        self.encode_chunk: Optional[int] = None  # rows per encoder call without grad; None = from free memory
        self.encode_precision = "fp32"            # of no-grad encodes (tokenizing): fp32, bf16 or tf32

    @property
    def resolution(self) -> int:
        return self.downsample * self.patch_nums[-1]

    def _check_img(self, img: torch.Tensor, what: str = "image") -> None:
        R = self.resolution
        if img.ndim != 4 or img.shape[1] != 3 or tuple(img.shape[2:]) != (R, R):
            raise UserError(f"{what} of shape {tuple(img.shape)} does not match the tokenizer's "
                            f"(B, 3, {R}, {R}) (downsample {self.downsample} × last patch number "
                            f"{self.patch_nums[-1]})")

    # ------------------------------------------------------------------------------- VAR's API
    def encode_latent(self, img: torch.Tensor) -> torch.Tensor:
        """img (B, 3, H, W) in [-1, 1] → f = quant_conv(encoder(img)) (B, Cz, H/16, W/16).

        Without autograd the rows go through the encoder in chunks of `encode_chunk` (None: as many
        as `encode_rows_budget` allows), so a batched focus encode (B × distinct views rows; 42 MB of
        first-level activation per 256 px row at ch 160) fits its device. Each row's latent is the
        same whatever the chunk (tests/test_tokenizer_compat.py). `encode_precision` ('fp32', the
        default: the official tokens exactly; 'bf16' autocast; 'tf32' matmuls/convs on CUDA) applies
        to these no-grad encodes only; the latent is returned in float32 either way."""
        if torch.is_grad_enabled():
            return self.quant_conv(self.encoder(img))
        chunk = self.encode_chunk or encode_rows_budget(self.cfg.ch, img.shape[-1], img.device)
        with encode_precision(self.encode_precision, img.device):
            parts = [self.quant_conv(self.encoder(part)).float() for part in img.split(chunk)]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    @torch.no_grad()
    def img_to_idx(self, img: torch.Tensor) -> List[torch.Tensor]:
        """VAR's `img_to_idxBl`: K token maps (B, pn_k²) long."""
        self._check_img(img)
        return self.quantize.f_to_idx(self.encode_latent(img))

    def fhat_to_img(self, f_hat: torch.Tensor) -> torch.Tensor:
        """f̂ (B, Cz, h, w) → image (B, 3, 16h, 16w) clamped to [-1, 1] (the decoder has no tanh)."""
        return self.decoder(self.post_quant_conv(f_hat)).clamp_(-1, 1)

    @torch.no_grad()
    def idx_to_img(self, idx_list: Sequence[torch.Tensor], last_only: bool = True):
        """Decode K token maps: the final image (B, 3, H, W), or one image per partial f̂."""
        if last_only:
            return self.fhat_to_img(self.quantize.idx_to_fhat(idx_list, last_only=True))
        return [self.fhat_to_img(f) for f in self.quantize.idx_to_fhat(idx_list, last_only=False)]

    @torch.no_grad()
    def img_to_recon(self, img: torch.Tensor) -> torch.Tensor:
        """Encode, quantize over all scales and decode: (B, 3, H, W) in [-1, 1]."""
        return self.fhat_to_img(self.quantize.f_to_fhat_per_scale(self.encode_latent(img))[-1])

    # ------------------------------------------------------------------------------ FVAR's API
    def encode_views(self, img: torch.Tensor, focus_imgs: Sequence[torch.Tensor], focus_grad: bool = True):
        """E(img) and z_k = E(focus_imgs[k]) with ONE encoder call on img + the distinct focus
        images: an entry that is img itself (or the same tensor object as another scale's) reuses
        that latent, which is how scales with ρ_k below half a pixel get z_k = E(x) for free.
        focus_grad False encodes the blurred views in a second call without autograd (their
        latents become constants: no backward through them). Returns (f (B, Cz, h, w), K latents)."""
        K = len(self.patch_nums)
        if len(focus_imgs) != K:
            raise UserError(f"{len(focus_imgs)} focus images given for {K} scales")
        self._check_img(img)
        distinct: List[torch.Tensor] = []
        slot: List[int] = []  # latent of each scale: 0 = E(img), j ≥ 1 = E(distinct[j−1])
        seen: Dict[int, int] = {id(img): 0}
        for x in focus_imgs:
            if id(x) not in seen:
                self._check_img(x, "focus image")
                distinct.append(x)
                seen[id(x)] = len(distinct)
            slot.append(seen[id(x)])
        B = img.shape[0]
        if focus_grad or not distinct or not torch.is_grad_enabled():
            latents = self.encode_latent(torch.cat([img, *distinct], dim=0) if distinct else img).split(B, dim=0)
        else:
            with torch.no_grad():
                blurred = self.encode_latent(torch.cat(distinct, dim=0)).split(B, dim=0)
            latents = (self.encode_latent(img), *blurred)
        return latents[0], [latents[j] for j in slot]

    @torch.no_grad()
    def encode_focus_images(self, img: torch.Tensor, focus_imgs: Sequence[torch.Tensor],
                            with_margin: bool = False, with_energy: bool = False) -> FocusTokens:
        """Dual-path tokens of img (B, 3, H, W) given one focus image PSF_ρk ⋆ img per scale
        (K of them, the same object as img where ρ_k < ½ px); the K focus encodes are batched."""
        f, zs = self.encode_views(img, focus_imgs)
        return self.quantize.encode_focus(f, zs, with_margin=with_margin, with_energy=with_energy)

    @torch.no_grad()
    def encode_with_pyramid(self, img: torch.Tensor, pyramid_cfg: PyramidConfig, resolution: int,
                            generator: Optional[torch.Generator] = None, with_energy: bool = False) -> FocusTokens:
        """Dual-path tokens of img under a focus pyramid, its views from `pyramid.focus_images`
        (sharp scales reuse E(x); β_k ε with `noise`, never on the sharp view)."""
        if resolution != self.resolution:
            raise UserError(f"pyramid resolution {resolution} does not match the tokenizer's {self.resolution}")
        if pyramid_cfg.space == "pixel":
            views = focus_images(img, pyramid_cfg, self.patch_nums, resolution, generator)
            return self.encode_focus_images(img, views, with_energy=with_energy)
        # Latent-grid variant (an experiment, docs/design.md §4): the PSF acts on f, ρ in grid cells.
        self._check_img(img)
        f = self.encode_latent(img)
        zs = focus_images(f, pyramid_cfg, self.patch_nums, self.patch_nums[-1], generator)
        return self.quantize.encode_focus(f, zs, with_energy=with_energy)

    # -------------------------------------------------------------------------------- training
    def forward(self, img: torch.Tensor, focus_imgs: Optional[Sequence[torch.Tensor]] = None,
                focus_grad: bool = True):
        """Tokenizer training step body: (reconstruction (B, 3, H, W) unclamped, VQOutput).

        With focus images, the encoder runs once on img plus the distinct focus images (batched);
        focus_grad False: see `encode_views`.
        """
        if focus_imgs is None:
            self._check_img(img)
            f, f_focus = self.encode_latent(img), None
        else:
            f, f_focus = self.encode_views(img, focus_imgs, focus_grad)
        vq: VQOutput = self.quantize(f, f_focus)
        return self.decoder(self.post_quant_conv(vq.f_hat)), vq

    # --- official checkpoints (the same two methods as VAR's) ---
    def official_state_dict(self) -> Dict[str, torch.Tensor]:
        """The weights under the official VQVAE keys only (no alias codebook), in the official
        order: what `VQVAE.load_state_dict(..., strict=True)` accepts (324 keys at ch=160)."""
        return {k: v.detach().clone() for k, v in self.state_dict().items() if k not in EXTENSION_KEYS}

    def load_official_state_dict(self, sd: Mapping[str, torch.Tensor]) -> None:
        """Load an official-format VQVAE state dict (e.g. `vae_ch160v4096z32.pth`).

        Strict on the official keys: a missing, unexpected or mis-shaped key raises a UserError that
        lists them. Like the official loader, `quantize.ema_vocab_hit_SV` is replaced by the model's
        own buffer when the number of scales differs (e.g. the 14-scale 1024px schedule). The alias
        codebook (not in the official format) keeps its current values.
        """
        own = self.state_dict()
        expected = {k: v for k, v in own.items() if k not in EXTENSION_KEYS}
        sd = dict(sd)
        if EMA_KEY in sd and EMA_KEY in own and sd[EMA_KEY].ndim == 2 and sd[EMA_KEY].shape[0] != own[EMA_KEY].shape[0]:
            sd[EMA_KEY] = own[EMA_KEY]
        diff = key_diff(expected, sd)
        problems = [f"{what}: {list_keys(keys)}" for what, keys in
                    (("shape mismatch", diff.mismatched), ("missing keys", diff.missing),
                     ("unexpected keys", diff.unexpected)) if keys]
        if problems:
            cfg = self.cfg
            raise UserError(f"checkpoint does not fit the tokenizer (V={cfg.vocab_size}, z={cfg.z_channels}, "
                            f"ch={cfg.ch}, {len(self.patch_nums)} scales): " + "; ".join(problems))
        self.load_state_dict({**own, **sd}, strict=True)
