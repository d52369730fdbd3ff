"""A small CNN trained on a labelled image folder: the feature network of offline evaluation.

Inception (FID's network) must be downloaded; this one is trained here in minutes on a CPU, on
the data a model learns. It classifies (class-conditional accuracy of samples) and its
penultimate layer is the feature space of `feature_metrics` (FID, KID, precision/recall there).

    uint8 RGB (B, 3, H, W) ──resize to R (bilinear, antialiased) · (x/255 − ½)/½──▶
    3 stages [conv3×3 BN ReLU]×2 + max-pool (widths w1, w2, w3) ──global average──▶ (B, w3)
    ──Linear ReLU──▶ features (B, D) ──Dropout Linear──▶ logits (B, C)

Training: AdamW, one-cycle lr (linear warm-up over 10% of the steps, cosine to 0), label
smoothing 0.1, per-image random shifts of up to `shift` px (zero fill: these datasets lie on
black) and horizontal flips. Images are loaded once into memory at R × R (uint8), which is
what small datasets like Fashion-MNIST need; every draw comes from one seeded generator, so a
CPU run is deterministic.

Saved as an fvar checkpoint of kind "classifier": config.json holds the architecture, the class
names, the data fingerprint and the accuracies measured at the end; model.safetensors the weights.
"""
from __future__ import annotations

import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from fvar_core.checkpoints import check_checkpoint_target, load_checkpoint, load_strict, save_checkpoint
from fvar_core.data.folders import scan_image_folder
from fvar_core.devices import pick_device
from fvar_core.errors import UserError
from fvar_core.data.images import open_rgb
from fvar_core.hashing import tensors_sha256
from fvar_core.runs import resolve_checkpoint

PathLike = Union[str, Path]
KIND = "classifier"


class ClassifierConfig(BaseModel):
    """Architecture and training of the feature classifier."""

    model_config = ConfigDict(extra="forbid")

    resolution: int = Field(32, ge=8, le=512, description="images are resized to R × R")
    widths: Tuple[int, int, int] = Field((16, 32, 64), description="channels of the three stages")
    feature_dim: int = Field(128, ge=8, le=4096, description="the penultimate layer: the feature space")
    epochs: float = Field(3.0, gt=0.0, le=1000.0)
    batch_size: int = Field(128, ge=1, le=65536)
    lr: float = Field(3e-3, gt=0.0, le=1.0)
    weight_decay: float = Field(5e-4, ge=0.0, le=1.0)
    label_smoothing: float = Field(0.1, ge=0.0, lt=1.0)
    shift: int = Field(2, ge=0, le=64, description="random translation in pixels")
    hflip: bool = True
    bf16: bool = Field(True, description="bf16 autocast while training (features are always computed in fp32)")
    seed: int = Field(0, ge=0)


def classifier_config(**fields: Any) -> ClassifierConfig:
    """A ClassifierConfig from command-line values; an invalid one is a one-line UserError."""
    from pydantic import ValidationError

    try:
        return ClassifierConfig(**fields)
    except ValidationError as e:
        err = e.errors()[0]
        raise UserError(f"classifier {'.'.join(map(str, err['loc']))}: {err['msg']}") from None


class FeatureNet(nn.Module):
    """See the module docstring; `forward(images uint8 (B, 3, H, W))` → (features (B, D), logits (B, C))."""

    def __init__(self, num_classes: int, cfg: ClassifierConfig):
        super().__init__()
        self.resolution = cfg.resolution
        layers: List[nn.Module] = []
        cin = 3
        for w in cfg.widths:
            for _ in range(2):
                layers += [nn.Conv2d(cin, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
                cin = w
            layers.append(nn.MaxPool2d(2))
        self.body = nn.Sequential(*layers)
        self.feature = nn.Sequential(nn.Linear(cin, cfg.feature_dim), nn.ReLU(inplace=True))
        self.head = nn.Sequential(nn.Dropout(0.2), nn.Linear(cfg.feature_dim, num_classes))

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) → float (B, 3, R, R) in [−1, 1]."""
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 (B, 3, H, W), got {images.dtype} {tuple(images.shape)}")
        x = images.float().div_(127.5).sub_(1.0)
        if tuple(x.shape[2:]) != (self.resolution, self.resolution):
            x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bilinear", antialias=True,
                              align_corners=False)
        return x

    def forward(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        h = self.body(self.prepare(images)).mean(dim=(2, 3))  # (B, w3)
        feats = self.feature(h)                               # (B, D)
        return feats, self.head(feats)


# ------------------------------------------------------------------------------------- data
def load_images(files: Sequence[Path], resolution: int, threads: int = 4
                ) -> Tuple[torch.Tensor, List[int], List[Tuple[Path, str]]]:
    """Image files → (uint8 (N', 3, R, R), indices of the files decoded, [(path, reason)] of the
    unreadable ones, skipped); files of another size are resized (LANCZOS). One decode per file."""

    def one(path: Path) -> Union[np.ndarray, str]:
        try:
            im = open_rgb(path)
        except UserError as e:
            return str(e)
        if im.size != (resolution, resolution):
            im = im.resize((resolution, resolution), Image.LANCZOS)
        return np.asarray(im, dtype=np.uint8)

    with ThreadPoolExecutor(max_workers=threads) as pool:
        decoded = list(pool.map(one, files))
    keep = [i for i, a in enumerate(decoded) if not isinstance(a, str)]
    bad = [(Path(files[i]), a) for i, a in enumerate(decoded) if isinstance(a, str)]
    if not keep:
        return torch.zeros(0, 3, resolution, resolution, dtype=torch.uint8), keep, bad
    arrays = np.stack([decoded[i] for i in keep])
    return torch.from_numpy(arrays).permute(0, 3, 1, 2).contiguous(), keep, bad


def labelled_folder(data: PathLike, resolution: int, per_class: Optional[int] = None):
    """An ImageFolder → (uint8 images (N, 3, R, R), labels (N,) long, class names, fingerprint of
    the images used); unreadable files are skipped."""
    index = scan_image_folder(data)
    if per_class is not None:
        index = index.first_per_class(per_class)
    images, keep, _bad = load_images(index.files, resolution)
    if not keep:
        raise UserError(f"{data}: no readable images")
    good = index.subset(keep)
    return images, torch.tensor(good.labels, dtype=torch.long), list(good.classes), good.fingerprint()


def augment(x: torch.Tensor, shift: int, hflip: bool, gen: torch.Generator) -> torch.Tensor:
    """Per-image random translation by up to `shift` px (zero fill) and horizontal flip; uint8 in, out."""
    B, C, H, W = x.shape
    if shift:
        pad = F.pad(x, (shift, shift, shift, shift))
        oy = torch.randint(0, 2 * shift + 1, (B,), generator=gen)
        ox = torch.randint(0, 2 * shift + 1, (B,), generator=gen)
        iy = (oy[:, None] + torch.arange(H))[:, :, None]                # (B, H, 1)
        ix = (ox[:, None] + torch.arange(W))[:, None, :]                # (B, 1, W)
        x = pad.permute(0, 2, 3, 1)[torch.arange(B)[:, None, None], iy, ix].permute(0, 3, 1, 2)  # (B, C, H, W)
    if hflip:
        flip = torch.rand(B, generator=gen) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
    return x.contiguous()


# ---------------------------------------------------------------------------------- training
@torch.no_grad()
def predict(net: FeatureNet, images: torch.Tensor, batch_size: int = 512,
            device: Optional[torch.device] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """uint8 (N, 3, H, W) → (features (N, D) float32, predicted class (N,) long), on CPU."""
    device = device or next(net.parameters()).device
    was = net.training
    net.eval()
    feats, preds = [], []
    for i in range(0, len(images), batch_size):
        f, logits = net(images[i:i + batch_size].to(device))
        feats.append(f.float().cpu())
        preds.append(logits.argmax(1).cpu())
    net.train(was)
    if not feats:
        return torch.zeros(0, net.feature[0].out_features), torch.zeros(0, dtype=torch.long)
    return torch.cat(feats), torch.cat(preds)


@torch.no_grad()
def recalibrate_batchnorm(net: FeatureNet, images: torch.Tensor, batch_size: int, gen: torch.Generator,
                          max_images: int = 4096) -> None:
    """BatchNorm's running statistics, recomputed as exact averages over (up to max_images)
    training images drawn at random (folders are sorted by class: the first ones are one class):
    after a short run the momentum averages still remember their initial values, and eval-mode
    predictions would be off."""
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    dev = next(net.parameters()).device
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches below
    net.train()
    pick = torch.randperm(len(images), generator=gen)[:max_images]
    for i in range(0, len(pick), batch_size):
        net(images[pick[i:i + batch_size]].to(dev))
    for m, mom in zip(bns, saved):
        m.momentum = mom
    net.eval()


@dataclass
class ClassifierResult:
    path: Path
    train_accuracy: float
    val_accuracy: Optional[float]
    seconds: float
    images: int


def train_classifier(data: PathLike, out: PathLike, cfg: ClassifierConfig = ClassifierConfig(), *,
                     val: Optional[PathLike] = None, device: Optional[str] = None,
                     say: Callable[[str], None] = lambda s: None) -> ClassifierResult:
    """Train on the ImageFolder `data`, measure on `val` (an ImageFolder with the same classes),
    save to `out` (an fvar checkpoint of kind "classifier")."""
    t0 = time.perf_counter()
    dev = pick_device(device or "auto")
    check_checkpoint_target(out)  # before minutes of training
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    images, labels, classes, fingerprint = labelled_folder(data, cfg.resolution)
    if len(classes) < 2:
        raise UserError(f"{data}: a classifier needs at least two classes, found {len(classes)}")
    val_set = None
    if val is not None:
        vi, vl, vclasses, _ = labelled_folder(val, cfg.resolution)
        if vclasses != classes:
            raise UserError(f"--val {val}: classes {vclasses[:3]}… differ from --data's {classes[:3]}…")
        val_set = (vi, vl)
    say(f"classifier: {len(images)} images, {len(classes)} classes, {cfg.resolution} px, {cfg.epochs:g} epochs "
        f"on {dev}")
    net = FeatureNet(len(classes), cfg).to(dev)
    decay = [p for n, p in net.named_parameters() if p.ndim > 1]
    rest = [p for n, p in net.named_parameters() if p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": rest, "weight_decay": 0.0}], lr=cfg.lr)
    bs = min(cfg.batch_size, len(images))
    steps = max(1, math.ceil(cfg.epochs * len(images) / bs))
    warm = max(1, steps // 10)
    lr_at = lambda s: cfg.lr * ((s + 1) / warm if s < warm else  # noqa: E731
                                0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, steps - warm))))
    order = torch.randperm(len(images), generator=gen)
    pos, correct, seen = 0, 0, 0
    net.train()
    for s in range(steps):
        if pos + bs > len(order):
            order, pos = torch.randperm(len(images), generator=gen), 0
        pick = order[pos:pos + bs]
        pos += bs
        x = augment(images[pick], cfg.shift, cfg.hflip, gen).to(dev)
        y = labels[pick].to(dev)
        for g in opt.param_groups:
            g["lr"] = lr_at(s)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cfg.bf16):
            _, logits = net(x)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if s >= steps - max(1, steps // 10):  # training accuracy over the last 10% of the steps
            correct += int((logits.argmax(1) == y).sum())
            seen += len(y)
        if (s + 1) % max(1, steps // 5) == 0 or s + 1 == steps:
            say(f"  step {s + 1}/{steps} loss {float(loss.detach()):.4f}")
    train_acc = correct / max(1, seen)
    recalibrate_batchnorm(net, images, bs, gen)
    val_acc = None
    if val_set is not None:
        _, pred = predict(net, val_set[0])
        val_acc = float((pred == val_set[1]).float().mean())
    seconds = time.perf_counter() - t0
    meta = {"classifier": {"config": cfg.model_dump(mode="json"), "classes": classes, "num_classes": len(classes)},
            "metrics": {"train_accuracy_last_10pct": train_acc, "val_accuracy": val_acc,
                        "val": str(Path(val).resolve()) if val is not None else None}}
    state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    path = save_checkpoint(out, kind=KIND, preset=None, state_dict=state, extra=meta,
                           provenance={"source": "fvar eval classifier train", "data": str(Path(data).resolve()),
                                       "data_fingerprint": fingerprint, "images": len(images),
                                       "seconds": round(seconds, 1)})
    return ClassifierResult(path, train_acc, val_acc, seconds, len(images))


@dataclass
class LoadedClassifier:
    net: FeatureNet
    classes: List[str]
    path: Path
    weights_sha256: str
    meta: Dict[str, Any]


def load_classifier(path: PathLike, device: Optional[str] = None) -> LoadedClassifier:
    """A checkpoint written by `train_classifier` (the directory or a run holding it)."""
    ck = load_checkpoint(resolve_checkpoint(path, "--feature-net"), expect_kind=KIND)
    info = ck.extra.get("classifier")
    if not isinstance(info, dict) or "config" not in info or "classes" not in info:
        raise UserError(f"{ck.path}: classifier checkpoint without its architecture (config.json 'classifier')")
    try:
        cfg = ClassifierConfig(**info["config"])
    except Exception as e:  # pydantic's ValidationError: the file is wrong
        raise UserError(f"{ck.path}: invalid classifier config ({str(e).splitlines()[0]})") from None
    net = FeatureNet(len(info["classes"]), cfg)
    load_strict(net, ck.state_dict, f"classifier {ck.path}")
    net.to(pick_device(device or "auto")).eval()
    # The tensors' hash, not the file's: safetensors orders its metadata freely, so two saves of the
    # same weights can differ as files, and a retrained identical network must keep its identity.
    return LoadedClassifier(net, list(info["classes"]), ck.path, tensors_sha256(ck.state_dict),
                            {k: v for k, v in ck.extra.items()})
