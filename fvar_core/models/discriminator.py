"""The tokenizer's optional adversarial term: a PatchGAN discriminator, hinge losses, VQGAN's
adaptive weight (Esser et al. 2021), arranged so that ONE backward of ONE summed loss trains both
players correctly — which keeps `train.loop.fit` a single-optimiser loop that DDP can wrap.

    D(x)                 (B, 1, h, w) patch logits of images in [-1, 1]
    d_loss = mean relu(1 − D(x)) + mean relu(1 + D(sg(x̂)))           gradient → D only
    g_loss = −mean D_sg(x̂),  D_sg = D with detached parameters        gradient → tokenizer only
    λ      = ‖∇_w L_rec‖ / (‖∇_w g_loss‖ + 1e-4), clamped to [0, 1e4], w = the decoder's last conv

The tokenizer's loss gets weight · λ · g_loss (λ fixed at 1 with adaptive off); d_loss is added
as it is. Before `disc_start` steps both terms are multiplied by 0 (still computed, so every
parameter gets a gradient every step, as DDP expects).
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from fvar_core.errors import UserError
from fvar_core.models.tokenizer import Tokenizer


class PatchDiscriminator(nn.Module):
    """VQGAN's N-layer PatchGAN: 4×4 convs, stride 2 for the first `layers`, LeakyReLU(0.2),
    GroupNorm instead of BatchNorm (no running statistics to synchronise across ranks)."""

    def __init__(self, ch: int = 64, layers: int = 3):
        super().__init__()
        mods = [nn.Conv2d(3, ch, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        c = ch
        for i in range(1, layers + 1):
            c_out = ch * min(2 ** i, 8)
            mods += [nn.Conv2d(c, c_out, 4, stride=2 if i < layers else 1, padding=1, bias=False),
                     nn.GroupNorm(min(32, c_out // 4), c_out), nn.LeakyReLU(0.2)]
            c = c_out
        mods.append(nn.Conv2d(c, 1, 4, stride=1, padding=1))
        self.net = nn.Sequential(*mods)
        for m in self.modules():  # VQGAN's init: N(0, 0.02) convs, N(1, 0.02) norm scales
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.GroupNorm):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        """img (B, 3, H, W) in [-1, 1] → patch logits (B, 1, h, w)."""
        return self.net(img)


def frozen_call(disc: nn.Module, img: torch.Tensor) -> torch.Tensor:
    """D(img) with D's parameters detached: the gradient reaches img (the generator), not D."""
    params = {k: v.detach() for k, v in disc.named_parameters()}
    return torch.func.functional_call(disc, {**params, **dict(disc.named_buffers())}, (img,))


def hinge_d_loss(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    return F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean()


def adaptive_weight(rec: torch.Tensor, g_loss: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """VQGAN's λ = ‖∇_last rec‖ / (‖∇_last g_loss‖ + 1e-4), clamped to [0, 1e4], detached."""
    g_rec = torch.autograd.grad(rec, last, retain_graph=True)[0]
    g_adv = torch.autograd.grad(g_loss, last, retain_graph=True)[0]
    return (g_rec.norm() / (g_adv.norm() + 1e-4)).clamp(0.0, 1e4).detach()


def adversarial_terms(disc: nn.Module, img: torch.Tensor, recon: torch.Tensor
                      ) -> Tuple[torch.Tensor, torch.Tensor, Dict[str, torch.Tensor]]:
    """(g_loss, d_loss, metrics) for real images and reconstructions (B, 3, H, W) in [-1, 1]."""
    real = disc(img)
    fake = disc(recon.detach())
    d_loss = hinge_d_loss(real, fake)
    g_loss = -frozen_call(disc, recon).mean()
    return g_loss, d_loss, {"d_real": real.detach().mean(), "d_fake": fake.detach().mean()}


def load_discriminator(disc: nn.Module, path: Union[str, Path]) -> None:
    """Start the discriminator from a safetensors file of its state dict (one line on mismatch)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise UserError(f"--disc-weights: no such file {path}")
    try:
        sd = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"--disc-weights {path}: not a safetensors file ({e})") from None
    own = disc.state_dict()
    bad = sorted(set(own) ^ set(sd)) + [k for k in own if k in sd and sd[k].shape != own[k].shape]
    if bad:
        raise UserError(f"--disc-weights {path} does not fit the discriminator (tokenizer_train.disc_ch / "
                        f"disc_layers): {', '.join(bad[:4])}" + (f" and {len(bad) - 4} more" if len(bad) > 4 else ""))
    disc.load_state_dict(sd)


class TokenizerWithDiscriminator(nn.Module):
    """Tokenizer and PatchGAN under one root (one optimiser, one DDP wrapper); forward returns the
    tokenizer's (recon, vq) plus the adversarial (g_loss, d_loss, metrics)."""

    def __init__(self, tokenizer: Tokenizer, disc: nn.Module):
        super().__init__()
        self.tokenizer, self.disc = tokenizer, disc

    def forward(self, img: torch.Tensor, focus_imgs: Sequence[torch.Tensor], focus_grad: bool = True):
        recon, vq = self.tokenizer(img, focus_imgs, focus_grad)
        return (recon, vq, *adversarial_terms(self.disc, img, recon.float()))


def adversarial_loss(nll: torch.Tensor, g_loss: torch.Tensor, d_loss: torch.Tensor, decoder_weight: torch.Tensor,
                     step: int, cfg) -> Tuple[torch.Tensor, torch.Tensor]:
    """The term the tokenizer's loss gets, weight·λ·g_loss + d_loss (× 0 before `cfg.disc_start`,
    not skipped, so every parameter has a gradient for DDP), and λ (VQGAN's adaptive weight
    against the image-space loss `nll`, at the decoder's last conv; 1 with `disc_adaptive` off)."""
    on = step >= cfg.disc_start
    lam = adaptive_weight(nll, g_loss, decoder_weight) if on and cfg.disc_adaptive \
        else torch.ones((), device=nll.device)
    return float(on) * (cfg.adversarial_weight * lam * g_loss + d_loss), lam
