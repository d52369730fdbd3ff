"""Training the dual-path tokenizer (docs/design.md §5, paper §4.2) as a task of the one loop (`train.loop.fit`).

Per step, on a batch x (B, 3, R, R) in [-1, 1]:
    focus images   PSF_ρk ⋆ x per scale (`psf.blur`, ρ_k from `schedules.radii`; scales with
                   ρ_k < ½ px reuse x itself, so the tokenizer's batched encode skips them)
    forward        recon, vq = Tokenizer(x, focus)        (K focus encodes batched inside)
    loss           l1·|recon − x| + l2·(recon − x)² + vq·L_vq(structure) + alias·L_vq(alias)
                   [+ perceptual·d_feat(recon, x) when a feature-net file is given]
                   [+ adversarial·λ·g_loss + d_loss with --disc / --disc-weights: `discriminator`]
Every `dead_code_every` steps, codes of either codebook unused since the last restart are
re-seeded from random quantizer inputs of the current batch (`train.codebook`). Metrics: the loss
parts, PSNR (on [0, 1]), and per scale the fraction of each codebook's codes used during the log
window.

Perceptual loss: `perceptual_weights` is a TorchScript file of a frozen feature network
x (B, 3, H, W) in [-1, 1] → a feature map or a list/tuple of them; the loss is LPIPS's form with
uniform layer weights, Σ_l mean ‖n(F_l(recon)) − n(F_l(x))‖² with n = unit norm over channels.
LPIPS's learned linear heads are not applied (export a model that includes them if wanted).

Adversarial term: a PatchGAN trained with the tokenizer in the same step and optimiser (see
`models.discriminator` for how one backward serves both players); its weights travel in the training
state (resume) and are written to <run>/discriminator.safetensors at the end, which
`--disc-weights` accepts to start another run from.

`init_from` a converted VAR VAE (or any tokenizer checkpoint of the same architecture): the weights
are loaded and only the alias codebook trains; everything else is frozen.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn

from fvar_core.checkpoints import load_checkpoint, load_strict
from fvar_core.config import Preset
from fvar_core.errors import UserError
from fvar_core.focus.pyramid import focus_images
from fvar_core.focus.schedules import radii
from fvar_core.models.discriminator import (PatchDiscriminator, TokenizerWithDiscriminator, adversarial_loss,
                                            load_discriminator)
from fvar_core.models.tokenizer import EXTENSION_KEYS, Tokenizer
from fvar_core.runs import CLASS_INDEX, SKIPPED_FILES, check_run_dir, data_identity, resolve_checkpoint
from fvar_core.sample.outputs import make_grid
from fvar_core.train.codebook import CodebookMonitor
from fvar_core.data.folders import (check_folder, write_class_index, write_skipped)
from fvar_core.data.images import save_png
from fvar_core.train.loop import fit
from fvar_core.atomic import atomic_write_bytes

ALIAS_PARAM = "quantize.alias_embedding.weight"
DISCRIMINATOR_FILE = "discriminator.safetensors"


def psnr(recon: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
    """Mean over images of 10·log10(1 / MSE) on [0, 1] pixels; both (B, 3, H, W) in [-1, 1]."""
    mse = ((recon.clamp(-1, 1) - img) / 2).square().flatten(1).mean(1).clamp_min(1e-10)
    return (-10 * torch.log10(mse)).mean()


class FeatureDistance(nn.Module):
    """LPIPS-form distance through a frozen TorchScript feature net (see the module docstring)."""

    def __init__(self, path: Union[str, Path]):
        super().__init__()
        path = Path(path)
        if not path.is_file():
            raise UserError(f"perceptual weights: no such file {path}")
        try:
            self.net = torch.jit.load(str(path), map_location="cpu")
        except Exception as e:  # noqa: BLE001 — any load failure is the file's fault
            raise UserError(f"perceptual weights {path}: not a TorchScript feature network "
                            f"({str(e).splitlines()[0] if str(e) else type(e).__name__}); export one with "
                            f"torch.jit.script/trace (image in [-1, 1] → feature map or list of maps)") from None
        self.net.eval()
        for p in self.net.parameters():
            p.requires_grad_(False)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        fa, fb = self.net(a), self.net(b)
        if isinstance(fa, torch.Tensor):
            fa, fb = [fa], [fb]
        n = lambda f: f / (f.float().square().sum(1, keepdim=True).sqrt() + 1e-10)  # noqa: E731
        return sum((n(x.float()) - n(y.float())).square().sum(1).mean() for x, y in zip(fa, fb)) / len(fa)


def init_alias_only(tok: Tokenizer, path: Union[str, Path]) -> None:
    """`--init-from`: load a tokenizer checkpoint's VAR-format weights (e.g. a converted VAR VAE)
    and freeze everything but the alias codebook, which keeps its initialisation and trains."""
    ck = load_checkpoint(resolve_checkpoint(path, "--init-from"), expect_kind="tokenizer")
    tok.load_official_state_dict({k: v for k, v in ck.state_dict.items() if k not in EXTENSION_KEYS})
    for name, p in tok.named_parameters():
        p.requires_grad_(name == ALIAS_PARAM)


class TokenizerTask:
    """The tokenizer mode of `train.loop.fit` (see `train.loop.Task`)."""

    kind = "tokenizer"
    mode = "tokenizer"
    best_metric = "recon"
    # No `shard_units`: the loop refuses strategy fsdp with this line (docs/design.md §7.1).
    fsdp_refusal = ("tokenizer_train.strategy fsdp is refused: a tokenizer's whole training state (16 bytes per "
                    "parameter: 1.6 GiB for the presets' 109M-parameter tokenizer) fits every GPU, and its dead-code restarts "
                    "rewrite whole codebook rows that sharding would split; train it with ddp")

    def __init__(self, preset: Preset, *, sample_images: Optional[torch.Tensor] = None,
                 init_from: Optional[Union[str, Path]] = None, perceptual_weights: Optional[Union[str, Path]] = None,
                 disc: bool = False, disc_weights: Optional[Union[str, Path]] = None, notes: Sequence[str] = ()):
        self.preset = preset
        self.cfg = self.loop_config = preset.tokenizer_train
        pyr = preset.pyramid
        if pyr.space != "pixel":
            raise UserError("train-tokenizer supports pyramid.space 'pixel' only (the latent-grid variant is an "
                            "encoding-time experiment); set pyramid.space=pixel")
        self.rhos = radii(pyr.schedule, pyr.rho_max, preset.patch_nums, preset.resolution)  # for the log
        self.init_from = Path(init_from) if init_from is not None else None
        if self.init_from is not None and not preset.tokenizer.alias_vocab_size:
            raise UserError(f"--init-from trains only the alias codebook, and preset {preset.name} has none "
                            f"(tokenizer.alias_vocab_size 0)")
        self.perceptual = FeatureDistance(perceptual_weights) if perceptual_weights is not None else None
        self.use_disc = bool(disc or disc_weights is not None)
        self.disc_weights = Path(disc_weights) if disc_weights is not None else None
        if self.use_disc and self.init_from is not None:
            raise UserError("--init-from trains only the alias codebook (the decoder is frozen): an adversarial "
                            "term has nothing to train; drop --disc / --disc-weights")
        self.disc = None
        self.sample_images = sample_images
        self.notes = list(notes)

    # ------------------------------------------------------------------------------ model
    def build(self) -> nn.Module:
        tok = Tokenizer(self.preset.tokenizer, self.preset.patch_nums)
        if self.init_from is not None:
            init_alias_only(tok, self.init_from)
        self.tok = tok
        self.q = tok.quantize
        model: nn.Module = tok
        if self.use_disc:
            self.disc = PatchDiscriminator(self.cfg.disc_ch, self.cfg.disc_layers)
            if self.disc_weights is not None:
                load_discriminator(self.disc, self.disc_weights)
            model = TokenizerWithDiscriminator(tok, self.disc)
        self.codebooks = CodebookMonitor(self.preset.num_scales, self.q.vocab_size,
                                         self.preset.tokenizer.alias_vocab_size)
        return model

    def param_groups(self, model: nn.Module) -> List[Dict[str, Any]]:
        # Weight decay (if the config ever has any) on conv weights only; never on codebooks, biases, norms.
        decay, no_decay = [], []
        for name, p in model.named_parameters():
            (decay if p.ndim > 1 and "embedding" not in name else no_decay).append(p)
        return [{"params": decay}, {"params": no_decay, "weight_decay": False}]

    def attach(self, model: nn.Module) -> None:
        self.model = model
        self.codebooks.to(next(self.tok.parameters()).device)

    def describe(self) -> List[str]:
        c = self.cfg
        lines = list(self.notes)
        rho = ", ".join(f"{r:.2f}" for r in self.rhos)
        lines.append(f"focus pyramid: {self.preset.pyramid.kernel} PSF, ρ = [{rho}] px"
                     + (" + noise" if self.preset.pyramid.noise else ""))
        if self.perceptual is None:
            lines.append("perceptual loss: off (no --perceptual-weights given)")
        else:
            lines.append(f"perceptual loss: on, weight {c.perceptual_weight}")
        if self.disc is None:
            lines.append("adversarial loss: off (no --disc or --disc-weights given)")
        else:
            n = sum(p.numel() for p in self.disc.parameters())
            src = f"from {self.disc_weights}" if self.disc_weights else "from scratch"
            lines.append(f"adversarial loss: on, PatchGAN ({n / 1e6:.2f}M parameters, {src}), hinge, weight "
                         f"{c.adversarial_weight}{' × adaptive λ' if c.disc_adaptive else ''}, from step {c.disc_start}")
        if self.init_from is not None:
            lines.append(f"initialised from {self.init_from}: training only the alias codebook")
        return lines

    # ------------------------------------------------------------------------------- step
    def focus_images(self, img: torch.Tensor) -> List[torch.Tensor]:
        """`pyramid.focus_images` of img under the preset, noise from the global RNG (seeded and
        restored with the run, so resume is bitwise)."""
        return focus_images(img, self.preset.pyramid, self.preset.patch_nums, self.preset.resolution)

    def step(self, batch: Any, step: int):
        img = batch[0].float()  # (B, 3, R, R) in [-1, 1]
        focus = self.focus_images(img)
        out = self.model(img, focus, self.cfg.focus_grad)
        recon, vq = out[0].float(), out[1]
        c = self.cfg
        l1 = (recon - img).abs().mean()
        l2 = (recon - img).square().mean()
        rec = c.l1_weight * l1 + c.l2_weight * l2
        metrics: Dict[str, Any] = {"recon": rec.detach(), "l1": l1.detach(), "l2": l2.detach(),
                                   "vq": vq.vq_loss.detach(), "psnr": psnr(recon.detach(), img)}
        nll = rec  # the image-space terms: what VQGAN's adaptive weight balances the generator against
        if self.perceptual is not None and c.perceptual_weight > 0:
            self.perceptual.to(img.device)
            p = self.perceptual(recon, img)
            nll = nll + c.perceptual_weight * p
            metrics["perceptual"] = p.detach()
        loss = nll + c.vq_weight * vq.vq_loss
        if vq.alias_loss is not None:
            loss = loss + c.alias_weight * vq.alias_loss
            metrics["alias_vq"] = vq.alias_loss.detach()
            metrics["alias_energy"] = vq.alias_energy.detach()
            metrics["alias_ratio"] = vq.alias_ratio.detach()
        if self.disc is not None:
            g_loss, d_loss, d_metrics = out[2], out[3], out[4]
            adv, lam = adversarial_loss(nll, g_loss, d_loss, self.tok.decoder.conv_out.weight, step, c)
            loss = loss + adv
            metrics.update(g_loss=g_loss.detach(), d_loss=d_loss.detach(), disc_lambda=lam, **d_metrics)
        self.codebooks.record(vq)
        self._last = (img, focus)  # data: no graph to hold; the same object the sharp views are
        return loss, metrics

    # ------------------------------------------------------------------------- codebooks
    def after_step(self, step: int) -> None:
        every = self.cfg.dead_code_every
        if every and step % every == 0:
            self.codebooks.restart(self.tok, *self._last)

    def log_metrics(self, step: int) -> Dict[str, Any]:
        return self.codebooks.log_metrics()

    @torch.no_grad()
    def on_sample(self, run_dir: Path, step: int) -> None:
        if self.sample_images is None:
            return
        dev = next(self.tok.parameters()).device
        img = self.sample_images.to(dev)
        was = self.tok.training
        self.tok.eval()
        recon, _ = self.tok(img, self.focus_images(img))
        self.tok.train(was)
        # two rows: the images, their reconstructions; [-1, 1] → [0, 1]
        grid = make_grid((torch.cat([img, recon]).float().clamp(-1, 1) + 1) / 2, cols=len(img), pad=0)
        save_png(grid, Path(run_dir) / "samples" / f"step-{step:07d}.png")

    # ----------------------------------------------------------------------- checkpoints
    def state_dict(self) -> Dict[str, torch.Tensor]:
        return self.tok.state_dict()

    def load_state_dict(self, sd: Mapping[str, torch.Tensor]) -> None:
        load_strict(self.tok, sd, "run checkpoint")

    def extra_state(self) -> Dict[str, Any]:
        disc = {k: v.detach().cpu() for k, v in self.disc.state_dict().items()} if self.disc is not None else None
        return {"record_hit": int(self.q.record_hit), **self.codebooks.state(), "discriminator": disc}

    def load_extra_state(self, d: Mapping[str, Any]) -> None:
        if self.disc is not None:
            if not d.get("discriminator"):
                raise UserError("this run's checkpoint holds no discriminator: it was trained without --disc; "
                                "resume it without --disc / --disc-weights, or choose another --out")
            load_strict(self.disc, d["discriminator"], "run checkpoint (discriminator)")
        elif d.get("discriminator"):
            raise UserError("this run was trained with a discriminator: resume it with --disc")
        self.q.record_hit = int(d["record_hit"])
        self.codebooks.load_state(d)


def train_tokenizer(preset: Preset, data_root: Union[str, Path], run_dir: Union[str, Path], *,
                    init_from: Optional[Union[str, Path]] = None,
                    perceptual_weights: Optional[Union[str, Path]] = None, disc: bool = False,
                    disc_weights: Optional[Union[str, Path]] = None,
                    device: Optional[str] = None, console: Any = None, num_samples: int = 8,
                    allow_data_change: bool = False):
    """`fvar train-tokenizer`: scan and check the image folder (unreadable files are reported and
    skipped, and listed in the run's skipped-files.txt), then train (or resume) the tokenizer in
    run_dir; resuming on another folder needs allow_data_change. Returns `train.loop.FitResult`."""
    run_dir = Path(run_dir)
    folder = check_folder(data_root)
    good = folder.good
    notes = [f"data: {folder.summary()}", *filter(None, [folder.report(listed_in=run_dir / SKIPPED_FILES)])]
    run = check_run_dir(run_dir, preset)  # before the slow set-up; `fit` writes the files (main process)

    seed = preset.tokenizer_train.seed
    data = folder.dataset(preset.resolution, preset.data, train=True, seed=seed)
    view = folder.dataset(preset.resolution, preset.data, train=False, seed=seed)
    n = min(num_samples, len(good))
    picks = torch.linspace(0, len(good) - 1, n).round().long().tolist()
    samples = torch.stack([view[i][0] for i in picks]) if n else None

    task = TokenizerTask(preset, sample_images=samples, init_from=init_from,
                         perceptual_weights=perceptual_weights, disc=disc, disc_weights=disc_weights, notes=notes)
    prov = {"data": str(Path(data_root).resolve()), "data_fingerprint": good.fingerprint(),
            "init_from": str(init_from) if init_from else None}

    def prepare(d: Path) -> None:
        write_class_index(d / CLASS_INDEX, good.classes)
        write_skipped(d / SKIPPED_FILES, folder.bad)

    res = fit(task, data, run, device=device, console=console,
              provenance=prov, prepare=prepare, data_identity=data_identity("images", data_root, good.fingerprint()),
              allow_data_change=allow_data_change)
    if task.disc is not None and res.main_process:
        from safetensors.torch import save

        atomic_write_bytes(run_dir / DISCRIMINATOR_FILE,
                           save({k: v.detach().cpu().contiguous() for k, v in task.disc.state_dict().items()}))
    return res
