"""Test material for the evaluation tests: Inception weights the tests make themselves (the real
ones are not on these machines and must never be downloaded in a test), small image sets, ADM
.npz batches and a tiny-64 checkpoint. Built once per session where they cost anything."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import numpy as np
import torch
from PIL import Image

_CACHE: dict = {}


def inception_weights(factory) -> Path:
    """A state dict for torch-fidelity's InceptionV3 structure with seeded random weights.

    torch-fidelity's constructor always loads weights, so the structure is built through a
    subclass whose load is a no-op (from an empty file), then initialised so activations neither
    vanish nor explode through 90-odd layers (He-normal convolutions; BatchNorm left at mean 0,
    var 1), and saved as the plain state dict torch-fidelity's loader expects.
    """
    if "weights" not in _CACHE:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        class _Blank(FeatureExtractorInceptionV3):
            def load_state_dict(self, *args, **kwargs):  # noqa: D102 - structure only
                return None

        d = factory.mktemp("inception")
        torch.save({}, d / "empty.pth")
        model = _Blank("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(d / "empty.pth"))
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, torch.nn.Conv2d):
                    m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / m.weight[0].numel()) ** 0.5)
                elif isinstance(m, torch.nn.Linear):
                    m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (1.0 / m.weight.shape[1]) ** 0.5)
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
        path = d / "inception-test.pth"
        torch.save(model.state_dict(), path)
        _CACHE["weights"] = path
    return _CACHE["weights"]


def blob_image(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """(h, w, 3) uint8: a colour ramp with a few rectangles — structured enough for distinct features."""
    y, x = np.mgrid[0:h, 0:w]
    base = rng.integers(0, 256, 3)
    img = np.stack([(base[c] + (x * rng.integers(1, 6) + y * rng.integers(1, 6))) % 256 for c in range(3)], -1)
    for _ in range(3):
        x0, y0 = rng.integers(0, w - 4), rng.integers(0, h - 4)
        img[y0:y0 + rng.integers(3, h // 2), x0:x0 + rng.integers(3, w // 2)] = rng.integers(0, 256, 3)
    return img.astype(np.uint8)


def image_folder(root: Path, n: int, size: int = 32, seed: int = 0, sizes: Optional[List[tuple]] = None) -> Path:
    """n PNGs 000000.png … in `root`: size × size, or (w, h) from `sizes` in turn."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        w, h = sizes[i % len(sizes)] if sizes else (size, size)
        Image.fromarray(blob_image(rng, w, h)).save(root / f"{i:06d}.png")
    return root


def folder_arrays(root: Path) -> np.ndarray:
    """The PNGs of a folder (sorted) as uint8 (N, H, W, 3)."""
    return np.stack([np.asarray(Image.open(p).convert("RGB")) for p in sorted(root.glob("*.png"))])


def tiny_var_checkpoint(factory) -> Path:
    """A random-init tiny-64 var checkpoint, tokenizer in <ckpt>/tokenizer (runs.find_tokenizer)."""
    if "ckpt" not in _CACHE:
        from fvar_core.checkpoints import save_checkpoint
        from fvar_core.presets import load_preset
        from fvar_core.models.tokenizer import Tokenizer
        from fvar_core.models.transformer import VAR

        preset = load_preset("tiny-64")
        torch.manual_seed(0)
        var = VAR(preset.model, preset.patch_nums, preset.tokenizer.vocab_size,
                              preset.tokenizer.z_channels)
        tok = Tokenizer(preset.tokenizer, preset.patch_nums)
        ck = factory.mktemp("evalckpt") / "var-tiny"
        save_checkpoint(ck, kind="var", preset=preset, state_dict=var.state_dict(), provenance={"step": 3})
        save_checkpoint(ck / "tokenizer", kind="tokenizer", preset=preset, state_dict=tok.state_dict())
        _CACHE["ckpt"] = ck
    return _CACHE["ckpt"]
