"""Token shards: a dataset encoded once by the tokenizer, so transformer training never runs the
VAE (docs/design.md §5). Written by `tokenize_dataset` (`fvar tokenize`), read by `TokenShards`.

Format `fvar-token-shards`, version 1 — a directory::

    manifest.json                   what the tokens are and which shards are done (below)
    classes.json                    the class index (`data.folders.write_class_index`)
    shard-00000.structure.npy       (N, L) structure tokens, uint16 if vocab_size ≤ 65536 else int32
    shard-00000.alias.npy           (N, L) alias tokens (same dtype rule), only with an alias codebook
    shard-00000.labels.npy          (N,) int64 class ids
    shard-00000.source.npy          (N,) int64 index of the source image in the (validated) folder scan
    shard-00001.* ...

L = Σ pn_k² (680 for VAR's 256px schedule); the tokens of scale k are columns
[Σ_{j<k} pn_j², Σ_{j≤k} pn_j²) in raster order — VAR's `idxBl` concatenated (`per_scale` splits).
Plain `.npy` files: `np.load(..., mmap_mode='r')` maps them, any language can read them.

Shard s holds the source images [s·shard_size, (s+1)·shard_size) of the folder scan, minus those
that failed to decode (counted as `skipped`). With `flip`, every image is stored twice,
interleaved: item 2j is image j, item 2j+1 its horizontal mirror (encoded from the mirrored
centre crop, not mirrored tokens: the tokenizer is not flip-equivariant). A training sampler that
wants VAR-style random flips picks one of the pair per epoch.

manifest.json::

    format "fvar-token-shards", version 1
    patch_nums, seq_len, vocab_size, alias_vocab_size (0 = no alias tokens), structure_dtype,
    alias_dtype, preset (name), preset_config (the resolved preset), tokenizer {path, tensors_sha256}
    (`hashing.tensors_sha256` of the weights; manifests before v0.2 call it sha256), flip, variants (1 or 2), classes,
    images {count, fingerprint} (which files, see `FolderIndex.fingerprint`), shard_size,
    num_shards, noise_batch (batch size the pyramid noise was drawn with; null without noise),
    shards [{name, count, images, skipped, complete}], total (items in complete shards),
    complete (all shards written)

Every file is written atomically (temp file + rename) and the manifest is rewritten after each
shard, so a run killed at any moment leaves complete shards only; a rerun with the same inputs
keeps them and continues with the first incomplete one (nothing is encoded twice). A rerun with
different inputs (another tokenizer, preset, folder, flip, shard size) is refused with the field
that differs, rather than mixing tokens of two runs.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from fvar_core.config import Preset
from fvar_core.errors import UserError
from fvar_core.hashing import tensors_sha256
from fvar_core.jsondocs import read_json_doc
from fvar_core.atomic import atomic_write_bytes
from fvar_core.runs import CLASS_INDEX, SKIPPED_FILES
from fvar_core.runlock import LOCK_NAME
from fvar_core.data.folders import write_class_index

FORMAT = "fvar-token-shards"
VERSION = 1
MANIFEST = "manifest.json"

# Manifest fields that describe what the tokens ARE; a resume compares them. Anything else
# (shard list, totals, tokenizer path) is bookkeeping or provenance.
_IDENTITY = ("patch_nums", "seq_len", "vocab_size", "alias_vocab_size", "structure_dtype", "alias_dtype",
             "preset_config", "tokenizer.tensors_sha256", "flip", "variants", "classes", "images", "shard_size",
             "num_shards", "noise_batch")


def token_dtype(vocab: int) -> str:
    """uint16 holds codes < 65536; larger codebooks need int32."""
    return "uint16" if vocab <= 65536 else "int32"


def shard_name(s: int) -> str:
    return f"shard-{s:05d}"


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def _get(d: Dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


def _first_difference(a: Any, b: Any, prefix: str) -> Optional[str]:
    """Dotted path of the first field where a and b differ (recursing into dicts), or None."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            d = _first_difference(a.get(k), b.get(k), f"{prefix}.{k}")
            if d:
                return d
        return None
    return None if a == b else prefix


def _read_manifest(path: Path) -> Dict[str, Any]:
    doc = read_json_doc(path, FORMAT, VERSION, what="a token-shard manifest", name="token-shard",
                        fix="tokenize again into another --out")
    tok = doc.get("tokenizer")
    if isinstance(tok, dict) and "sha256" in tok and "tensors_sha256" not in tok:  # the name before v0.2
        tok["tensors_sha256"] = tok.pop("sha256")
    return doc


# -------------------------------------------------------------------------------- writing
class ShardWriter:
    """Writes shards into `out_dir` under `meta` (the manifest's identity fields, see the module
    docstring; `meta["images"]["count"]` and `shard_size` fix the number of shards).

    An existing directory is resumed: its manifest must agree with `meta` on every identity
    field (else UserError naming the first that differs); its complete shards are kept and
    `is_complete(s)` says which to skip. A non-empty directory without a manifest is refused.
    """

    def __init__(self, out_dir: Union[str, Path], meta: Dict[str, Any], shard_size: int):
        if shard_size < 1:
            raise UserError(f"shard size must be ≥ 1, got {shard_size}")
        self.dir = Path(out_dir)
        count = int(meta["images"]["count"])
        self.shard_size = int(shard_size)
        self.num_shards = max(1, math.ceil(count / self.shard_size))
        new = {"format": FORMAT, "version": VERSION, **meta, "shard_size": self.shard_size,
               "num_shards": self.num_shards}
        self.resumed = False
        man = self.dir / MANIFEST
        if self.dir.exists() and not self.dir.is_dir():
            raise UserError(f"{self.dir} is a file, expected a folder for token shards")
        if man.exists():
            old = _read_manifest(man)
            for key in _IDENTITY:
                diff = _first_difference(_get(old, key), _get(new, key), key)
                if diff:
                    raise UserError(
                        f"{self.dir} holds token shards made with a different {diff} "
                        f"({_short(_get(old, diff))} there, {_short(_get(new, diff))} now); "
                        f"use another --out folder, or delete it to start over")
            shards = {e["name"]: e for e in old.get("shards", []) if e.get("complete")}
            self.manifest = {**new, "shards": [shards[shard_name(s)] for s in range(self.num_shards)
                                              if shard_name(s) in shards]}
            self.resumed = True
        else:
            ours = (CLASS_INDEX, LOCK_NAME, SKIPPED_FILES)
            if self.dir.exists() and any(p.name not in ours for p in self.dir.iterdir()):
                raise UserError(f"{self.dir} exists, is not empty and is not a token-shard folder "
                                f"(no {MANIFEST}); choose an empty or new --out folder")
            self.manifest = {**new, "shards": []}
        self._save()

    def _save(self) -> None:
        done = [e for e in self.manifest["shards"] if e["complete"]]
        self.manifest["total"] = sum(e["count"] for e in done)
        self.manifest["complete"] = len(done) == self.num_shards
        atomic_write_bytes(self.dir / MANIFEST, (json.dumps(self.manifest, indent=1) + "\n").encode())

    def is_complete(self, s: int) -> bool:
        return any(e["name"] == shard_name(s) and e["complete"] for e in self.manifest["shards"])

    @property
    def complete_shards(self) -> List[int]:
        return [s for s in range(self.num_shards) if self.is_complete(s)]

    def _entry(self, s: int, entry: Dict[str, Any]) -> None:
        rest = [e for e in self.manifest["shards"] if e["name"] != shard_name(s)]
        self.manifest["shards"] = sorted(rest + [entry], key=lambda e: e["name"])
        self._save()

    def begin(self, s: int) -> None:
        """Mark shard s as in progress in the manifest (readers skip it until it is complete)."""
        self._entry(s, {"name": shard_name(s), "count": 0, "images": 0, "skipped": 0, "complete": False})

    def write(self, s: int, structure: np.ndarray, alias: Optional[np.ndarray], labels: np.ndarray,
              source: np.ndarray, images: int, skipped: int = 0) -> None:
        """Write shard s — structure (N, L), alias (N, L) or None, labels (N,), source (N,) — each
        file atomically, then the manifest entry with complete=true."""
        m = self.manifest
        N = structure.shape[0]
        if structure.shape != (N, m["seq_len"]) or labels.shape != (N,) or source.shape != (N,):
            raise ValueError(f"shard arrays of shapes {structure.shape}, {labels.shape}, {source.shape} "
                             f"for L={m['seq_len']}")
        if (alias is None) != (not m["alias_vocab_size"]):
            raise ValueError("alias tokens must be given exactly when the manifest has an alias codebook")
        base = self.dir / shard_name(s)
        atomic_write_bytes(f"{base}.structure.npy", _npy_bytes(structure.astype(m["structure_dtype"])))
        if alias is not None:
            if alias.shape != structure.shape:
                raise ValueError(f"alias {alias.shape} vs structure {structure.shape}")
            atomic_write_bytes(f"{base}.alias.npy", _npy_bytes(alias.astype(m["alias_dtype"])))
        atomic_write_bytes(f"{base}.labels.npy", _npy_bytes(labels.astype(np.int64)))
        atomic_write_bytes(f"{base}.source.npy", _npy_bytes(source.astype(np.int64)))
        self._entry(s, {"name": shard_name(s), "count": int(N), "images": int(images),
                        "skipped": int(skipped), "complete": True})


def _short(v: Any) -> str:
    s = json.dumps(v) if not isinstance(v, str) else v
    return s if len(s) <= 40 else s[:37] + "..."


# -------------------------------------------------------------------------------- reading
class TokenShards:
    """Memory-mapped token shards: item i → (structure (L,) int64, alias (L,) int64 | None, label).

    Only complete shards are read. An unfinished directory (the run was interrupted) is refused
    unless allow_incomplete=True; then it reads the complete shards it has.
    """

    def __init__(self, path: Union[str, Path], allow_incomplete: bool = False):
        self.dir = Path(path)
        man = self.dir / MANIFEST
        if not man.exists():
            raise UserError(f"{self.dir}: no {MANIFEST}; not a token-shard folder (make one with `fvar tokenize`)")
        self.manifest = _read_manifest(man)
        m = self.manifest
        if not m.get("complete") and not allow_incomplete:
            done = sum(1 for e in m["shards"] if e["complete"])
            raise UserError(f"{self.dir}: token shards are incomplete ({done} of {m['num_shards']} shards); "
                            f"rerun the same `fvar tokenize` command to finish them")
        self.patch_nums: Tuple[int, ...] = tuple(m["patch_nums"])
        self.classes: List[str] = list(m["classes"])
        self.seq_len: int = int(m["seq_len"])
        self._structure, self._alias, self._labels = [], [], []
        for e in m["shards"]:
            if not e["complete"]:
                continue
            base = self.dir / e["name"]
            try:
                st = np.load(f"{base}.structure.npy", mmap_mode="r")
                al = np.load(f"{base}.alias.npy", mmap_mode="r") if m["alias_vocab_size"] else None
                lb = np.load(f"{base}.labels.npy", mmap_mode="r")
            except (OSError, ValueError) as err:
                raise UserError(f"{base}: missing or unreadable shard file ({err})") from None
            if st.shape != (e["count"], self.seq_len) or lb.shape != (e["count"],):
                raise UserError(f"{base}: shapes {st.shape}, {lb.shape} disagree with the manifest "
                                f"({e['count']} items of {self.seq_len} tokens)")
            self._structure.append(st)
            self._alias.append(al)
            self._labels.append(lb)
        self._offsets = np.cumsum([0] + [a.shape[0] for a in self._structure])

    @property
    def has_alias(self) -> bool:
        return bool(self.manifest["alias_vocab_size"])

    @property
    def tokenizer_sha256(self) -> Optional[str]:
        """`hashing.tensors_sha256` of the tokenizer the shards were encoded with (None if unknown)."""
        return (self.manifest.get("tokenizer") or {}).get("tensors_sha256")

    def fingerprint(self) -> str:
        """sha256 of what the shards hold: the tokenizer weights, the source files (their
        fingerprint), the pyramid's configuration, flip, and the item counts."""
        m = self.manifest
        ident = {"tokenizer": self.tokenizer_sha256, "images": m.get("images"),
                 "pyramid": (m.get("preset_config") or {}).get("pyramid"), "patch_nums": m.get("patch_nums"),
                 "flip": m.get("flip"), "shards": [e.get("count") for e in m["shards"] if e.get("complete")]}
        return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def _locate(self, i: int) -> Tuple[int, int]:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"item {i} of {n}")
        i %= n
        s = int(np.searchsorted(self._offsets, i, side="right") - 1)
        return s, i - int(self._offsets[s])

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, Optional[torch.Tensor], int]:
        s, j = self._locate(i)
        structure = torch.from_numpy(self._structure[s][j].astype(np.int64))  # (L,)
        alias = None if self._alias[s] is None else torch.from_numpy(self._alias[s][j].astype(np.int64))
        return structure, alias, int(self._labels[s][j])

    def labels(self) -> np.ndarray:
        """(N,) int64, all items (e.g. for class-balanced sampling)."""
        return np.concatenate([np.asarray(lb) for lb in self._labels]) if self._labels else np.zeros(0, np.int64)

    def per_scale(self, tokens: torch.Tensor) -> List[torch.Tensor]:
        """(..., L) → K tensors (..., pn_k²), VAR's per-scale token maps (for `idx_to_img`)."""
        return list(torch.split(tokens, [p * p for p in self.patch_nums], dim=-1))


# ------------------------------------------------------------------------------ tokenizing
@dataclass
class TokenizeStats:
    """What one `tokenize_dataset` call did (shards kept from an earlier run are not counted)."""

    images: int = 0                  # source images encoded by this call
    items: int = 0                   # token items written by this call (×2 with flip)
    shards_written: int = 0
    shards_resumed: int = 0          # complete shards found and kept
    total_items: int = 0             # items in the directory after this call
    skipped: List[Tuple[Path, str]] = field(default_factory=list)  # decode failures, (path, reason)
    seconds: float = 0.0

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


class _Items(torch.utils.data.Dataset):
    """dataset.load(i) that reports failures instead of raising, so they survive worker processes."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        try:
            img, label = self.dataset.load(i)
            return i, img, label, None
        except UserError as e:
            return i, None, self.dataset.index.labels[i], (self.dataset.index.files[i], str(e))


def _as_list(batch):
    return batch


def _noise_seed(seed: int, start: int) -> int:
    return int(np.random.SeedSequence([seed, start]).generate_state(1)[0])


def shard_meta(preset: Preset, tokenizer, index, flip: bool, batch_size: int,
               tokenizer_path: Optional[Union[str, Path]] = None) -> Dict[str, Any]:
    """The manifest's identity fields for encoding `index` with `tokenizer` under `preset`."""
    tcfg = tokenizer.cfg
    alias_vocab = tcfg.alias_tokens
    return {
        "patch_nums": list(preset.patch_nums),
        "seq_len": preset.seq_len,
        "vocab_size": tcfg.vocab_size,
        "alias_vocab_size": alias_vocab,
        "structure_dtype": token_dtype(tcfg.vocab_size),
        "alias_dtype": token_dtype(alias_vocab) if alias_vocab else None,
        "preset": preset.name,
        "preset_config": preset.model_dump(mode="json"),
        "tokenizer": {"path": None if tokenizer_path is None else str(tokenizer_path),
                      "tensors_sha256": tensors_sha256(tokenizer)},
        "flip": bool(flip),
        "variants": 2 if flip else 1,
        "classes": list(index.classes),
        "images": {"count": len(index), "fingerprint": index.fingerprint()},
        # The pyramid's β_k ε noise is drawn per batch (one generator per batch, seeded by the
        # batch's first image), so with noise the tokens depend on the batch size too.
        "noise_batch": int(batch_size) if preset.pyramid.noise else None,
    }


@torch.no_grad()
def _encode_items(tokenizer, preset: Preset, items: Sequence[tuple], flip: bool, gen: Optional[torch.Generator],
                  device: Union[str, torch.device], meta: Dict[str, Any]) -> Dict[str, Optional[np.ndarray]]:
    """Readable items (index, image (3, R, R), label, None) → the shard rows, in the file dtypes:
    structure / alias (B·v, L), labels / source (B·v,), v = 2 with flip (orig, mirror interleaved)."""
    x = torch.stack([b[1] for b in items]).to(device, non_blocking=True)  # (B, 3, R, R) in [-1, 1]
    if flip:
        x = torch.cat([x, x.flip(-1)])                                    # (2B, 3, R, R)
    tok = tokenizer.encode_with_pyramid(x, preset.pyramid, preset.resolution, generator=gen)
    structure = torch.cat(tok.structure, dim=1)                            # (B·v, L)
    alias = torch.cat(tok.alias, dim=1) if tok.alias is not None else None
    if (alias is not None) != bool(meta["alias_vocab_size"]):
        raise RuntimeError("the tokenizer's alias output disagrees with its config")
    labels = torch.tensor([b[2] for b in items], dtype=torch.int64)
    source = torch.tensor([b[0] for b in items], dtype=torch.int64)
    if flip:  # [orig; mirrored] → interleaved orig_0, mirror_0, orig_1, ...
        B = len(items)
        structure = structure.view(2, B, -1).transpose(0, 1).reshape(2 * B, -1)
        alias = alias.view(2, B, -1).transpose(0, 1).reshape(2 * B, -1) if alias is not None else None
        labels, source = labels.repeat_interleave(2), source.repeat_interleave(2)
    # held in the file dtype: a 10k-image shard of a 1024px preset stays in the hundreds of MB
    return {"structure": structure.cpu().numpy().astype(meta["structure_dtype"]),
            "alias": alias.cpu().numpy().astype(meta["alias_dtype"]) if alias is not None else None,
            "labels": labels.numpy(), "source": source.numpy()}


def tokenize_dataset(tokenizer, preset: Preset, dataset, out_dir: Union[str, Path], batch_size: int = 64,
                     shard_size: int = 10000, flip: bool = False, device: Union[str, torch.device] = "cpu",
                     progress: Optional[Callable[[int, int], None]] = None, num_workers: int = 0,
                     seed: int = 0, tokenizer_path: Optional[Union[str, Path]] = None) -> TokenizeStats:
    """Encode every image of `dataset` (an eval-mode `ImageFolderDataset`: centre crops, no random
    flip, so the tokens are a function of the files) with `encode_with_pyramid` and write token
    shards to `out_dir` (format: module docstring). Resumes an interrupted run.

    batch_size images are encoded at once (2 × with flip; the K focus encodes are batched inside
    the tokenizer). `progress(done, total)` is called after every batch, counting source images,
    those of kept shards included. `seed` seeds the pyramid noise when the preset has it.
    """
    if dataset.train or dataset.hflip:
        raise ValueError("tokenize_dataset needs an eval-mode dataset (train=False, hflip=False): "
                         "centre crops make the tokens reproducible")
    if dataset.resolution != preset.resolution:
        raise UserError(f"dataset resolution {dataset.resolution} does not match preset {preset.name}'s "
                        f"{preset.resolution}")
    if tuple(tokenizer.patch_nums) != tuple(preset.patch_nums):
        raise UserError(f"tokenizer patch numbers {list(tokenizer.patch_nums)} differ from preset "
                        f"{preset.name}'s {list(preset.patch_nums)}")
    if batch_size < 1:
        raise UserError(f"batch size must be ≥ 1, got {batch_size}")
    t0 = time.perf_counter()
    index = dataset.index
    N = len(index)
    meta = shard_meta(preset, tokenizer, index, flip, batch_size, tokenizer_path)
    writer = ShardWriter(out_dir, meta, shard_size)
    write_class_index(writer.dir / CLASS_INDEX, index.classes)
    S = writer.shard_size
    stats = TokenizeStats(shards_resumed=len(writer.complete_shards))

    todo = [s for s in range(writer.num_shards) if not writer.is_complete(s)]
    batches = [list(range(b, min(b + batch_size, (s + 1) * S, N)))
               for s in todo for b in range(s * S, min((s + 1) * S, N), batch_size)]
    done = sum(min(S, N - s * S) for s in writer.complete_shards)
    if progress is not None:
        progress(done, N)
    if not batches:
        stats.total_items = writer.manifest["total"]
        stats.seconds = time.perf_counter() - t0
        return stats

    tokenizer = tokenizer.to(device).eval()
    loader = torch.utils.data.DataLoader(_Items(dataset), batch_sampler=batches, collate_fn=_as_list,
                                         num_workers=num_workers, pin_memory=torch.device(device).type == "cuda")
    has_alias = bool(meta["alias_vocab_size"])
    cur: Optional[int] = None
    parts: Dict[str, List[np.ndarray]] = {}
    skipped_in_shard = 0

    def flush(s: int) -> None:
        cat = lambda k: np.concatenate(parts[k]) if parts[k] else None  # noqa: E731
        L = meta["seq_len"]
        structure = cat("structure")
        structure = structure if structure is not None else np.zeros((0, L), np.int64)
        alias = (cat("alias") if parts["alias"] else np.zeros((0, L), np.int64)) if has_alias else None
        labels = cat("labels") if parts["labels"] else np.zeros(0, np.int64)
        source = cat("source") if parts["source"] else np.zeros(0, np.int64)
        writer.write(s, structure, alias, labels, source, images=min(S, N - s * S), skipped=skipped_in_shard)
        stats.shards_written += 1
        stats.items += structure.shape[0]

    for batch in loader:
        s = batch[0][0] // S
        if s != cur:
            cur, parts, skipped_in_shard = s, {k: [] for k in ("structure", "alias", "labels", "source")}, 0
            writer.begin(s)
        ok = [b for b in batch if b[3] is None]
        for b in batch:
            if b[3] is not None:
                stats.skipped.append(b[3])
                skipped_in_shard += 1
        if ok:
            gen = (torch.Generator().manual_seed(_noise_seed(seed, batch[0][0]))
                   if preset.pyramid.noise else None)
            arrays = _encode_items(tokenizer, preset, ok, flip, gen, device, meta)
            for k, a in arrays.items():
                if a is not None:
                    parts[k].append(a)
            stats.images += len(ok)
        if batch[-1][0] == min((s + 1) * S, N) - 1:
            flush(s)
        done += len(batch)
        if progress is not None:
            progress(done, N)
    stats.total_items = writer.manifest["total"]
    stats.seconds = time.perf_counter() - t0
    return stats
