"""Experiment trackers through accelerate: the numbers `metrics.jsonl` records and the sample
grids, sent to TensorBoard and/or Weights & Biases as a run trains (`train.log_with` /
`tokenizer_train.log_with`, `--log-with`). `metrics.jsonl` stays the record; a tracker is a view.

TensorBoard writes its event files to <run>/tensorboard; W&B follows its own settings
(`WANDB_MODE=offline` works without a network).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

import numpy as np

from fvar_core.config import Preset
from fvar_core.errors import UserError

TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb"}  # name → the package it needs
TENSORBOARD_DIR = "tensorboard"


def tracker_names(log_with: Optional[str]) -> List[str]:
    """'tensorboard' / 'wandb' / 'all' / None → the trackers to start; a missing package is one line."""
    if log_with is None:
        return []
    names = list(TRACKERS) if log_with == "all" else [log_with]
    for n in names:
        if importlib.util.find_spec(TRACKERS[n]) is None:
            raise UserError(f"log_with {n} needs the {TRACKERS[n]} package: pip install {TRACKERS[n]}")
    return names


def _flat(d: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
    """A nested mapping as dotted scalar keys (what TensorBoard's hparams accept)."""
    out: Dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


class Tracking:
    """The run's trackers (none when log_with is unset): `start`, then `log` every metrics line,
    `image` every sample grid, `finish` at the end. Only the main process talks to them."""

    def __init__(self, acc: Any, names: List[str]):
        self.acc, self.names = acc, names

    def start(self, run_dir: Path, preset: Preset) -> None:
        if self.names:
            self.acc.init_trackers(TENSORBOARD_DIR, config=_flat(preset.model_dump(mode="json")),
                                   init_kwargs={"wandb": {"name": run_dir.name, "dir": str(run_dir)}})

    def log(self, line: Mapping[str, Any]) -> None:
        if self.names:
            scalars = {k: v for k, v in line.items() if k != "step" and isinstance(v, (int, float))}
            self.acc.log(scalars, step=int(line["step"]))

    def image(self, path: Path, step: int) -> None:
        """A PNG the run wrote (a sample grid) → the trackers, as 'samples' at `step`."""
        if not self.names or not path.is_file() or not self.acc.is_main_process:
            return
        from PIL import Image

        pixels = np.asarray(Image.open(path).convert("RGB"))  # (H, W, 3) uint8
        for t in self.acc.trackers:
            if t.name == "tensorboard":
                t.writer.add_image("samples", pixels, step, dataformats="HWC")
            elif t.name == "wandb":
                import wandb

                t.log({"samples": wandb.Image(pixels)}, step=step)

    def finish(self) -> None:
        for t in getattr(self.acc, "trackers", []):
            t.finish()
