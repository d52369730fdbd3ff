"""An image folder → token shards with a tokenizer checkpoint (`fvar tokenize`, `fvar quickstart`).

The steps: load the tokenizer (a checkpoint or a run), apply `--set` pyramid overrides (never the
architecture: `check_tokenizer_fits`), scan and check the folder, optionally keep the first N
images of each class, then `shards.tokenize_dataset` (centre crops, resumable shards) with the
folder locked (`runlock`); every file left out is listed in OUT/skipped-files.txt.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple, Union

from fvar_core.atomic import check_writable, ensure_dir
from fvar_core.checkpoints import load_checkpoint
from fvar_core.checks import check_tokenizer_fits
from fvar_core.data.folders import FolderIndex, check_folder, write_skipped
from fvar_core.data.shards import MANIFEST, TokenizeStats, tokenize_dataset
from fvar_core.devices import pick_device
from fvar_core.errors import UserError
from fvar_core.interrupt import on_interrupt
from fvar_core.models.loading import build_tokenizer
from fvar_core.models.tokenizer import ENCODE_PRECISIONS
from fvar_core.presets import override_preset
from fvar_core.runlock import RunLock
from fvar_core.runs import SKIPPED_FILES, resolve_checkpoint

PathLike = Union[str, Path]
Progress = Callable[[int, int], None]


@dataclass
class TokenizeRun:
    """What `tokenize_folder` did: the checked index, the files it refused, the encode's stats."""

    tokenizer: Path
    preset_name: str
    device: str
    index: FolderIndex
    bad: List[Tuple[Path, str]]
    stats: TokenizeStats


def tokenize_folder(tokenizer: PathLike, data: PathLike, out: PathLike, *, overrides: Sequence[str] = (),
                    per_class: Optional[int] = None, flip: bool = False, batch_size: int = 64,
                    shard_size: int = 10000, device: str = "auto", workers: Optional[int] = None,
                    full_check: bool = False, check_progress: Optional[Progress] = None,
                    progress: Optional[Progress] = None,
                    on_checked: Optional[Callable[[FolderIndex, List[Tuple[Path, str]], str], None]] = None,
                    encode_chunk: Optional[int] = None, encode_precision: str = "fp32") -> TokenizeRun:
    """See the module docstring. `on_checked(index, bad, description)` runs once the folder is
    checked, before the (long) encode. encode_chunk: encoder rows per call (None: from the
    device's free memory, `models.tokenizer.encode_rows_budget`); the tokens do not depend on it.
    encode_precision: fp32 (default: exact), bf16 or tf32 (faster; tokens move, RESULTS.md)."""
    if encode_precision not in ENCODE_PRECISIONS:  # before anything is read or written
        raise UserError(f"--encode-precision {encode_precision!r}: choose {', '.join(ENCODE_PRECISIONS)}")
    dev = pick_device(device)
    ckpt = load_checkpoint(resolve_checkpoint(tokenizer, "--tokenizer"), expect_kind="tokenizer")
    preset = override_preset(ckpt.preset, list(overrides), f"tokenizer {ckpt.path}'s preset")
    check_tokenizer_fits(preset, ckpt.preset, f"tokenizer {ckpt.path}",
                         hint="--set may change the pyramid, not the tokenizer's architecture")
    tok = build_tokenizer(ckpt)
    tok.encode_chunk, tok.encode_precision = encode_chunk, encode_precision
    folder = check_folder(data, per_class=per_class, decode=full_check, progress=check_progress)
    good, bad = folder.good, folder.bad
    if on_checked is not None:
        on_checked(good, bad, f"{len(good)} images, {len(good.classes)} classes in {data}; tokenizer {ckpt.path} "
                              f"({preset.name}, {preset.resolution}px, {preset.num_scales} scales) on {dev}")
    dataset = folder.dataset(preset.resolution, preset.data, train=False)
    out = ensure_dir(check_writable(out, "--out", folder=True), "--out")
    with RunLock(out, "token-shard folder"), on_interrupt(lambda: _stopped_at(out)):
        stats = tokenize_dataset(tok, preset, dataset, out, batch_size=batch_size, shard_size=shard_size, flip=flip,
                                 device=dev, progress=progress,
                                 num_workers=preset.data.num_workers if workers is None else workers,
                                 tokenizer_path=ckpt.path.resolve())
        write_skipped(out / SKIPPED_FILES, [*bad, *stats.skipped])
    return TokenizeRun(ckpt.path, preset.name, str(dev), good, bad, stats)


def _stopped_at(out: Path) -> str:
    """Where an interrupted tokenize stands (its manifest's complete shards are kept)."""
    try:
        m = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
        done = sum(1 for e in m["shards"] if e.get("complete"))
        return f"in {out} with {done} of {m['num_shards']} shards complete (kept)"
    except (OSError, ValueError, KeyError, TypeError):
        return f"in {out} before the first shard was complete"
