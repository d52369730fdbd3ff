"""Inception features for FID / IS / KID / precision-recall (docs/design.md §9).

The extractor is torch-fidelity's `inception-v3-compat`: the TensorFlow Inception graph of the
original FID code (and of ADM's evaluator, which VAR's numbers use) ported to PyTorch. Per image:

    uint8 RGB (3, H, W) ──bilinear to 299×299, TensorFlow-1.x compatible──▶ (x − 128) / 128
    ──InceptionV3──▶ pool3 (2048,) float32   and   logits_unbiased = pool3 · W (1008,)

We never resize or crop images ourselves before the extractor: the resize to 299 is the graph's
own (torch-fidelity's `interpolate_bilinear_2d_like_tensorflow1x`, ADM's TF `ResizeBilinear`).

Weights, in this order, never anything else (no silent fallback to other weights):
1. a local file passed by the caller (`fvar eval --feature-weights PATH`, or the environment
   variable FVAR_FEATURE_WEIGHTS, which the CLI reads into the same option);
2. torch-fidelity's own file, `weights-inception-2015-12-05-6726825d.pth`, from torch hub's cache
   (`$TORCH_HOME/hub/checkpoints`, where torch-fidelity keeps it), downloaded there from
   torch-fidelity's release URL when absent and checked against its sha256 prefix.
If neither works, one UserError line names both ways out. The file is read with
`weights_only=True` first (a file holding pickled Python objects is refused) and its sha256 goes
into every evaluation's protocol; `official` says whether it is torch-fidelity's file.
"""
from __future__ import annotations

import urllib.error
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, Optional, Union

import numpy as np
import torch

from fvar_core import envvars
from fvar_core.hashing import file_sha256
from fvar_core.errors import UserError

ENV_WEIGHTS = envvars.FEATURE_WEIGHTS
EXTRACTOR = "inception-v3-compat"
POOL_LAYER = "2048"             # pool3, FID / KID / precision-recall
LOGITS_LAYER = "logits_unbiased"  # pool3 · W without the bias, the Inception score's classifier
FEATURE_DIM = 2048
RESIZE = ("none by fvar; the extractor resizes uint8 RGB to 299×299 with TensorFlow-1.x-compatible bilinear "
          "interpolation (torch-fidelity interpolate_bilinear_2d_like_tensorflow1x, as ADM's TF graph)")
OFFICIAL_SHA256_PREFIX = "6726825d"  # torch hub's convention: the prefix is in the file name

PathLike = Union[str, Path]
Progress = Callable[[int, int], None]


def _official_url() -> str:
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    return URL_INCEPTION_V3


def official_filename() -> str:
    return _official_url().rsplit("/", 1)[-1]


def _torch_fidelity_version() -> str:
    try:
        from importlib.metadata import version
        return version("torch-fidelity")
    except Exception:
        return "unknown"


@dataclass(frozen=True)
class WeightsInfo:
    """Which Inception weights an evaluation used: the file, its sha256, and how it was found."""

    path: str
    sha256: str
    source: str  # "path" (given by the user) | "torch-hub cache" | "download"
    official: bool  # torch-fidelity's converted TF weights (sha256 prefix 6726825d)


def _way_out() -> str:
    return (f"pass --feature-weights PATH or set {ENV_WEIGHTS}=PATH to a local copy of {official_filename()} "
            f"(torch-fidelity's InceptionV3 weights, {_official_url()})")


def resolve_weights(path: Optional[PathLike] = None, download: bool = True) -> WeightsInfo:
    """The Inception weights file to use (see the module docstring); UserError if there is none."""
    if path is not None:
        p = Path(path).expanduser()
        if not p.is_file():
            raise UserError(f"feature-extractor weights {p}: no such file "
                            f"(--feature-weights / {ENV_WEIGHTS}; unset it to use torch-fidelity's download)")
        sha = file_sha256(p)
        return WeightsInfo(str(p.resolve()), sha, "path", sha.startswith(OFFICIAL_SHA256_PREFIX))
    dst = Path(torch.hub.get_dir()) / "checkpoints" / official_filename()
    source = "torch-hub cache"
    if not dst.is_file():
        if not download:
            raise UserError(f"no Inception weights in torch hub's cache ({dst}): {_way_out()}")
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            torch.hub.download_url_to_file(_official_url(), str(dst), hash_prefix=OFFICIAL_SHA256_PREFIX,
                                           progress=False)
        except (urllib.error.URLError, OSError, RuntimeError, ValueError) as e:
            reason = str(getattr(e, "reason", None) or e).splitlines()[0] if str(e) else type(e).__name__
            raise UserError(f"cannot download the Inception weights ({reason}); offline? {_way_out()}") from None
        source = "download"
    sha = file_sha256(dst)
    return WeightsInfo(str(dst), sha, source, sha.startswith(OFFICIAL_SHA256_PREFIX))


def _check_weights_file(path: str) -> None:
    """Refuse anything but a plain state dict of tensors before torch-fidelity unpickles it."""
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"feature-extractor weights {path} are not a plain PyTorch state dict "
                        f"(read with weights_only=True: {detail[:200]})") from None
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserError(f"feature-extractor weights {path} are not a state dict of tensors")


class InceptionFeatures:
    """torch-fidelity's InceptionV3 with pool3 and unbiased logits, on one device.

    `__call__(images)`: uint8 (B, 3, H, W) → {"pool": (B, 2048) float32, "logits": (B, 1008) float32}.
    """

    def __init__(self, weights: WeightsInfo, device: Union[str, torch.device] = "cpu"):
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        _check_weights_file(weights.path)
        try:
            model = FeatureExtractorInceptionV3(EXTRACTOR, [POOL_LAYER, LOGITS_LAYER],
                                                feature_extractor_weights_path=weights.path)
        except RuntimeError as e:  # load_state_dict(strict) names missing / unexpected / mis-shaped keys
            first = " ".join(str(e).split())[:240]
            raise UserError(f"feature-extractor weights {weights.path} do not fit torch-fidelity's InceptionV3 "
                            f"({first})") from None
        self.weights = weights
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> Dict[str, np.ndarray]:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 (B, 3, H, W), got {images.dtype} {tuple(images.shape)}")
        pool, logits = self.model(images.to(self.device))
        return {"pool": pool.float().cpu().numpy(), "logits": logits.float().cpu().numpy()}

    def protocol(self) -> dict:
        """What a report needs to say about the extractor to be reproducible."""
        return {"name": f"torch-fidelity {EXTRACTOR} (torch-fidelity {_torch_fidelity_version()})",
                "fid_kid_prc_layer": f"{POOL_LAYER} (pool3)", "is_layer": f"{LOGITS_LAYER} (1008 classes, no bias)",
                "weights": asdict(self.weights), "resize": RESIZE, "input": "uint8 RGB"}


def load_extractor(weights: Optional[PathLike] = None, device: Union[str, torch.device] = "cpu",
                   download: bool = True) -> InceptionFeatures:
    """Resolve the weights (see the module docstring) and build the extractor on `device`."""
    return InceptionFeatures(resolve_weights(weights, download=download), device)


@dataclass
class FeatureSet:
    """Features of N images: pool (N, 2048) float32, logits (N, 1008) float32."""

    pool: np.ndarray
    logits: np.ndarray

    def __len__(self) -> int:
        return len(self.pool)


def extract_batch(batch: np.ndarray, extractor: InceptionFeatures) -> FeatureSet:
    """uint8 (B, H, W, 3) images (HWC, as files and ADM's arr_0 hold them) → their FeatureSet."""
    # a copy: batches streamed from an .npz are read-only views, which torch will not wrap
    out = extractor(torch.from_numpy(np.array(batch, dtype=np.uint8, order="C")).permute(0, 3, 1, 2))  # (B, 3, H, W)
    return FeatureSet(out["pool"], out["logits"])


def batched(items: Iterator[np.ndarray], batch_size: int) -> Iterator[np.ndarray]:
    """Single (H, W, 3) uint8 images → stacked (B, H, W, 3) batches."""
    buf = []
    for im in items:
        buf.append(im)
        if len(buf) == batch_size:
            yield np.stack(buf)
            buf = []
    if buf:
        yield np.stack(buf)
