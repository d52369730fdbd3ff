"""The one training loop (DESIGN §7): tokenizer, transformer and distillation runs are *tasks*
plugged into `fit`, which owns everything they share.

    fit(task, data, run_dir, cfg, preset, mode)
      devices          accelerate: CPU, one GPU, DDP (`accelerate launch`); bf16/fp16 autocast on
                       CUDA only, fp32 on CPU; gradient accumulation (manual, no_sync between micro-steps)
      optimiser        AdamW (fused on CUDA), per-group weight decay, grad clipping
      schedule         VAR's (var-facts §3.3): linear warm-up from warmup_start·peak, then 'lin0'
                       (flat for 5% of the rest, linear down to lr_end·peak); a config without those
                       fields (the tokenizer's) gets a short warm-up and a constant lr
      data order       an infinite stream of per-epoch permutations seeded by (seed, epoch); step s
                       uses samples [s·B, (s+1)·B) of the stream, each rank a contiguous shard of it,
                       and item i of epoch e is loaded with the dataset at epoch e (its augmentation
                       is a function of (seed, e, i)) — so order and crops survive a resume
      run directory    config.yaml (resolved preset), metrics.jsonl, log.txt, samples/,
                       checkpoints/step-XXXXXXX/ (config.json + model.safetensors + training_state.pt,
                       written atomically by `checkpoints.save_checkpoint`), checkpoints/latest;
                       the last `keep_last` checkpoints are kept plus the best one (lowest value of
                       the task's `best_metric` over the log window ending at a checkpoint step;
                       its name in checkpoints/best)
      resume           the default: the newest complete checkpoint is loaded (weights, optimiser,
                       step, RNG streams of torch/numpy/python, data position, task state)
      guards           a run directory of another preset is refused before anything is written; a
                       NaN/inf loss stops before the update and leaves every checkpoint untouched

A task is anything with the `Task` protocol's methods; optional hooks are looked up by name.
"""
from __future__ import annotations

import json
import math
import random
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Protocol, Tuple, Union

import numpy as np
import torch
import torch.nn as nn

from .atomic import atomic_write_bytes, check_writable, ensure_dir, write_error
from .config import Preset
from .errors import UserError
from .data import SKIPPED_FILES
from .interrupt import mark_interrupt
from .runlock import LOCK_NAME, RunLock

CHECKPOINTS = "checkpoints"
LATEST = "latest"
BEST = "best"
CONFIG_YAML = "config.yaml"
METRICS = "metrics.jsonl"
LOG = "log.txt"
STATE_VERSION = 1
CHECKPOINT_FILES = ("config.json", "model.safetensors", "training_state.pt")  # of a complete training checkpoint

# Fields that may change between a run and its resume: how long it runs and how it reports.
# Anything else (architecture, lr, data processing, seed, ...) makes the run directory another run's.
RESUMABLE_CHANGES = ("steps", "log_every", "ckpt_every", "keep_last", "sample_every", "num_workers",
                     "description")


# --------------------------------------------------------------------------------- the protocol
class Task(Protocol):
    """What `fit` needs from a training mode.

    Required:
        kind: str                         checkpoint kind ("tokenizer", "var", "teacher")
        build() -> nn.Module              every model of the task in one root module (frozen
                                          parameters have requires_grad False); called once, after
                                          the RNG is seeded, on the CPU
        param_groups(model) -> list[dict] AdamW groups: {"params": [...], "weight_decay": bool}
        attach(model) -> None             the prepared module (DDP / autocast wrapped) that step uses
        step(batch, step) -> (loss, metrics)   one micro-batch on the device; loss a 0-d tensor,
                                          metrics {name: float | 0-d tensor}, averaged over a log window
        state_dict() -> {name: Tensor}    the weights of the checkpoint (safetensors)
        load_state_dict(sd) -> None
    Optional (looked up with getattr):
        extra_state() / load_extra_state(d)   non-weight state for training_state.pt (tensors,
                                          numbers, strings, lists, dicts only)
        after_step(step) -> dict | None   after each optimiser step (e.g. dead-code restarts)
        log_metrics(step) -> dict         extra entries of the metrics line, at log steps
        on_sample(run_dir, step)          sample grids, every `sample_every` steps (main process)
        best_metric: str                  metrics entry (lower is better) that picks the best checkpoint
        describe() -> list[str]           lines for the log at start
    """

    kind: str

    def build(self) -> nn.Module: ...
    def param_groups(self, model: nn.Module) -> List[Dict[str, Any]]: ...
    def attach(self, model: nn.Module) -> None: ...
    def step(self, batch: Any, step: int) -> Tuple[torch.Tensor, Dict[str, Any]]: ...
    def state_dict(self) -> Dict[str, torch.Tensor]: ...
    def load_state_dict(self, sd: Mapping[str, torch.Tensor]) -> None: ...


# -------------------------------------------------------------------------------- loop settings
@dataclass(frozen=True)
class LoopSettings:
    """The loop's knobs, read from a `TrainConfig` or `TokenizerTrainConfig` (fields the config
    lacks take the defaults here: the tokenizer gets a 1% warm-up, a constant lr, no weight decay)."""

    steps: int
    batch_size: int
    peak_lr: float
    warmup_steps: int
    warmup_start: float = 0.005
    schedule: str = "constant"  # "lin0" or "constant"
    lr_end: float = 0.01
    weight_decay: float = 0.0
    weight_decay_end: float = 0.0
    betas: Tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 2.0
    grad_accum: int = 1
    precision: str = "bf16"
    cpu_bf16: bool = False
    seed: int = 0
    log_every: int = 50
    ckpt_every: int = 5000
    keep_last: int = 3
    sample_every: int = 0

    @classmethod
    def from_config(cls, cfg: Any) -> "LoopSettings":
        get = lambda name, default: getattr(cfg, name, default)  # noqa: E731
        steps, bs = int(cfg.steps), int(cfg.batch_size)
        if hasattr(cfg, "warmup_frac"):
            # TrainConfig: VAR's recipe. lr is per 256 images (peak = tblr · bs / 256).
            return cls(steps=steps, batch_size=bs, peak_lr=cfg.lr * bs / 256,
                       warmup_steps=round(cfg.warmup_frac * steps), warmup_start=cfg.warmup_start,
                       schedule="lin0", lr_end=cfg.lr_end, weight_decay=cfg.weight_decay,
                       weight_decay_end=cfg.weight_decay_end, betas=tuple(cfg.betas), grad_clip=cfg.grad_clip,
                       grad_accum=cfg.grad_accum, precision=cfg.precision, cpu_bf16=cfg.cpu_bf16, seed=cfg.seed,
                       log_every=cfg.log_every, ckpt_every=cfg.ckpt_every, keep_last=cfg.keep_last,
                       sample_every=cfg.sample_every)
        return cls(steps=steps, batch_size=bs, peak_lr=float(cfg.lr),
                   warmup_steps=min(round(0.01 * steps), 1000), warmup_start=0.1, schedule=cfg.lr_schedule,
                   lr_end=cfg.lr_end,
                   weight_decay=float(get("weight_decay", 0.0)),
                   weight_decay_end=float(get("weight_decay", 0.0)),
                   grad_clip=float(get("grad_clip", 2.0)), grad_accum=int(get("grad_accum", 1)),
                   precision=cfg.precision, cpu_bf16=cfg.cpu_bf16, seed=cfg.seed, log_every=cfg.log_every,
                   ckpt_every=cfg.ckpt_every, keep_last=cfg.keep_last, sample_every=cfg.sample_every)

    def lr_at(self, it: int) -> float:
        """lr of optimiser step `it` (0-based). Warm-up: linear from warmup_start·peak to peak over
        warmup_steps; then 'lin0' (VAR's `lr_wd_annealing`): flat for the first 5% of the
        remaining steps, then linear to lr_end·peak at the last step; or constant."""
        peak = self.peak_lr
        if it < self.warmup_steps:
            return peak * (self.warmup_start + (1 - self.warmup_start) * it / self.warmup_steps)
        if self.schedule == "constant":
            return peak
        rest = max(self.steps - 1 - self.warmup_steps, 1)  # the last step (steps − 1) ends at lr_end
        t = (it - self.warmup_steps) / rest
        if t < 0.05:
            return peak
        frac = min((t - 0.05) / 0.95, 1.0)
        return peak * (1 + (self.lr_end - 1) * frac)

    def wd_at(self, it: int) -> float:
        """Weight decay of step `it`: cosine from weight_decay to weight_decay_end (var-facts §3.3)."""
        t = min(it / max(self.steps - 1, 1), 1.0)
        return self.weight_decay_end + (self.weight_decay - self.weight_decay_end) * (1 + math.cos(math.pi * t)) / 2


# ----------------------------------------------------------------------------------- data order
def _epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    seq = np.random.SeedSequence([seed, epoch, 0x5EED])
    g = torch.Generator().manual_seed(int(seq.generate_state(1, np.uint64)[0] >> 1))
    return torch.randperm(n, generator=g)


class BatchStream:
    """Batches of (item, epoch) for one rank: the global stream is the concatenation of the
    per-epoch permutations (seeded by (seed, epoch)); optimiser step s takes samples
    [s·B, (s+1)·B), split into `accum` micro-batches, each split into contiguous rank shards.
    Starting at `position` (samples already consumed) continues exactly where a run stopped."""

    def __init__(self, n: int, batch_size: int, seed: int, position: int = 0, accum: int = 1,
                 world: int = 1, rank: int = 0):
        if n < 1:
            raise UserError("the training data is empty")
        if batch_size % (accum * world):
            raise UserError(f"batch size {batch_size} must be divisible by grad_accum × processes "
                            f"= {accum} × {world}")
        self.n, self.seed, self.position = n, seed, position
        self.micro = batch_size // accum        # samples of one micro-step, all ranks
        self.per_rank = self.micro // world
        self.rank = rank
        self._perm: Optional[Tuple[int, torch.Tensor]] = None

    def _item(self, pos: int) -> Tuple[int, int]:
        epoch, off = divmod(pos, self.n)
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, _epoch_permutation(self.n, self.seed, epoch))
        return int(self._perm[1][off]), epoch

    def __iter__(self) -> Iterator[List[Tuple[int, int]]]:
        pos = self.position
        while True:
            start = pos + self.rank * self.per_rank
            yield [self._item(p) for p in range(start, start + self.per_rank)]
            pos += self.micro


class EpochItems(torch.utils.data.Dataset):
    """dataset[(i, epoch)] → the dataset's item i at that epoch. Datasets with `set_epoch` (fvar's
    ImageFolderDataset) derive their augmentation from (seed, epoch, i); for others the global RNGs
    are seeded from (seed, epoch, i) around the call and restored after it."""

    def __init__(self, dataset: Any, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: Tuple[int, int]) -> Any:
        i, epoch = key
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
            return self.dataset[i]
        s = int(np.random.SeedSequence([self.seed, epoch, i]).generate_state(1)[0])
        py, npy = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(s), random.seed(s), np.random.seed(s)
            try:
                return self.dataset[i]
            finally:
                random.setstate(py), np.random.set_state(npy)


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch


# ------------------------------------------------------------------------------------ RNG state
def _rng_state(device: torch.device) -> Dict[str, Any]:
    """torch (CPU + CUDA), numpy and python RNG states as weights_only-loadable values."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)},
             "python": list(random.getstate()[1])}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: Mapping[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    npy = state["numpy"]
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["gauss"]))
    random.setstate((3, tuple(state["python"]), None))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


# ------------------------------------------------------------------------------- run directory
def _step_name(step: int) -> str:
    return f"step-{step:07d}"


def complete_checkpoints(run_dir: Path) -> List[Tuple[int, Path]]:
    """(step, dir) of the complete checkpoints of a run, oldest first. `save_checkpoint` renames a
    directory into place only when every file is written, so a `step-*` directory with weights,
    config and training state is complete; temporaries of an interrupted save are not listed."""
    root = Path(run_dir) / CHECKPOINTS
    out = []
    if root.is_dir():
        for d in root.iterdir():
            name = d.name
            if d.is_dir() and name.startswith("step-") and name[5:].isdigit() and all(
                    (d / f).is_file() for f in CHECKPOINT_FILES):
                out.append((int(name[5:]), d))
    return sorted(out)


def usable_checkpoint(run_dir: Union[str, Path]) -> Tuple[Optional[Tuple[int, Path]], List[Tuple[Path, str]]]:
    """The newest checkpoint of a run that is complete and verifies (sizes and sha256 recorded at
    save time, `checkpoints.verify_checkpoint`), as (step, dir) or None; and (dir, reason) for each
    newer `step-*` directory passed over — incomplete (a file missing) or corrupt. Nothing is
    changed on disk."""
    from .checkpoints import verify_checkpoint

    root = Path(run_dir) / CHECKPOINTS
    dirs = sorted(((int(d.name[5:]), d) for d in root.iterdir()
                   if d.is_dir() and d.name.startswith("step-") and d.name[5:].isdigit()),
                  reverse=True) if root.is_dir() else []
    skipped: List[Tuple[Path, str]] = []
    for step, d in dirs:
        missing = [f for f in CHECKPOINT_FILES if not (d / f).is_file()]
        reason = f"incomplete ({', '.join(missing)} missing)" if missing else verify_checkpoint(d)
        if reason is None:
            return (step, d), skipped
        skipped.append((d, reason))
    return None, skipped


def _set_aside(d: Path) -> Path:
    """Rename a broken checkpoint to <name>.bad[-N] (never deleted; no longer a step-* checkpoint)."""
    for n in range(1000):
        aside = d.with_name(f"{d.name}.bad" + (f"-{n}" if n else ""))
        if not aside.exists():
            d.rename(aside)
            return aside
    raise UserError(f"cannot set {d} aside: too many {d.name}.bad-N folders")


def data_identity(source: str, path: Union[str, Path], fingerprint: str) -> Dict[str, str]:
    """What a run trained on: 'images' (folder, `FolderIndex.fingerprint`) or 'tokens' (shards,
    `TokenShards.fingerprint`), the resolved path and the fingerprint."""
    return {"source": source, "path": str(Path(path).resolve()), "fingerprint": fingerprint}


def _check_data_identity(ckpt: Optional[Path], now: Optional[Mapping[str, Any]], allow: bool) -> Optional[str]:
    """Refuse to resume `ckpt` on other data than it was trained on (unless `allow`: then the
    note to log). Checkpoints written before data identities were recorded are not checked."""
    if ckpt is None or not now:
        return None
    from .checkpoints import read_checkpoint_config

    was = read_checkpoint_config(ckpt)[1].get("provenance", {}).get("data_identity")
    if not isinstance(was, dict):
        return None
    diff = [k for k in ("source", "path", "fingerprint") if was.get(k) != now.get(k)]
    if not diff:
        return None
    what = (f"{was.get('source')} {was.get('path')} (fingerprint {str(was.get('fingerprint'))[:12]}) → "
            f"{now.get('source')} {now.get('path')} (fingerprint {str(now.get('fingerprint'))[:12]})")
    if not allow:
        raise UserError(f"{ckpt.parent.parent} was trained on other data ({', '.join(diff)} differ: {what}); "
                        f"pass the same --data/--tokens to resume, --allow-data-change to continue on the new "
                        f"data, or another --out")
    return f"data changed at {ckpt.name} ({what}): continuing on the new data (--allow-data-change)"


def _lock_run_dir(acc: Any, run_dir: Path) -> Optional[RunLock]:
    """The main process creates and locks the run directory; every rank learns whether it could."""
    lock, refusal = None, None
    if acc.is_main_process:
        try:
            ensure_dir(run_dir, "run directory")  # writability: `check_run_dir`, just before
            lock = RunLock(run_dir).acquire()
        except UserError as e:
            refusal = str(e)
    refusal = _gather_objects(acc, refusal)[0]
    if refusal is not None:
        raise UserError(refusal)
    return lock


def _dump_preset(preset: Preset) -> Dict[str, Any]:
    return preset.model_dump(mode="json")


def _differences(a: Any, b: Any, prefix: str = "") -> List[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            out += _differences(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        a, b = list(a), list(b)
    return [] if a == b else [prefix.rstrip(".")]


def check_same_run(run_dir: Path, preset: Preset) -> Optional[Dict[str, Any]]:
    """The stored preset of run_dir (None for a new run); a UserError if it is another run's
    (differences outside RESUMABLE_CHANGES)."""
    import yaml

    path = run_dir / CONFIG_YAML
    stored = None
    if path.is_file():
        try:
            stored = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise UserError(f"{path} is corrupt ({type(e).__name__}); not resuming into {run_dir}") from None
    else:
        ck = complete_checkpoints(run_dir)
        if ck:
            stored = json.loads((ck[-1][1] / "config.json").read_text(encoding="utf-8")).get("preset")
    if stored is None:
        return None
    diff = [d for d in _differences(stored, _dump_preset(preset)) if d.split(".")[-1] not in RESUMABLE_CHANGES]
    if diff:
        shown = ", ".join(diff[:4]) + (f" and {len(diff) - 4} more" if len(diff) > 4 else "")
        raise UserError(f"{run_dir} holds a run of another preset ({stored.get('name', '?')}; differs in {shown}): "
                        f"choose another --out, or the same preset to resume")
    return stored


def check_run_dir(run_dir: Path, preset: Preset) -> Optional[Dict[str, Any]]:
    """Refuse a run directory that is a file, another preset's run, or not a run directory at all
    (a non-empty folder without config.yaml); the stored preset of a run to resume, else None."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"{run_dir} exists and is not a directory")
    check_writable(run_dir, "run directory", folder=True)
    if not run_dir.is_dir():
        return None
    stored = check_same_run(run_dir, preset)
    if stored is None and any(p.name not in (LOG, METRICS, CHECKPOINTS, "samples", "classes.json", "tokenizer",
                                             ".tokenizer.tmp", "teacher", "discriminator.safetensors", LOCK_NAME,
                                             SKIPPED_FILES)
                              for p in run_dir.iterdir()):
        raise UserError(f"{run_dir} exists and is not an fvar run directory (no {CONFIG_YAML}); choose another --out")
    return stored


def _truncate_metrics(path: Path, last_step: int) -> None:
    """Drop metrics lines written after the checkpoint a run resumes from (they will be redone)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if int(json.loads(line).get("step", 0)) <= last_step:
                keep.append(line)
        except (ValueError, AttributeError):
            continue  # a torn last line of a killed run
    atomic_write_bytes(path, ("\n".join(keep) + "\n" if keep else "").encode())


def append_line(path: Path, line: str) -> None:
    """Append one line to a log; a full disk or lost permission is a one-line UserError (the run's
    checkpoints are untouched: they are written atomically, apart from the logs)."""
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
    except OSError as e:
        raise UserError(f"cannot write {path}: {write_error(e) or e}; the run's checkpoints are untouched, "
                        f"rerun to resume") from None


class RunLog:
    """log.txt + the console (rich when it is a terminal, plain lines otherwise)."""

    def __init__(self, run_dir: Path, console: Any = None, enabled: bool = True):
        from rich.console import Console

        self.path = run_dir / LOG
        self.console = console if console is not None else Console(stderr=True)
        self.enabled = enabled

    @property
    def interactive(self) -> bool:
        return bool(self.enabled and self.console.is_terminal)

    def info(self, msg: str) -> None:
        if not self.enabled:
            return
        append_line(self.path, f"{time.strftime('%Y-%m-%d %H:%M:%S')} {msg}")
        self.console.print(msg, markup=False, highlight=False, soft_wrap=True)


@dataclass
class FitResult:
    run_dir: Path
    step: int                               # optimiser steps done in total
    resumed_from: Optional[int]             # the checkpoint step a resumed run started at
    checkpoint: Optional[Path]              # the last checkpoint written or loaded
    metrics: Dict[str, Any] = field(default_factory=dict)  # the last metrics line
    main_process: bool = True               # False on the other ranks of a multi-process run


def _fmt_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _scalar(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.detach().float().item() if v.numel() == 1 else v.detach().float().tolist()
    return v


# ------------------------------------------------------------------------------------------ fit
def fit(task: Task, data: Any, run_dir: Union[str, Path], cfg: Any, preset: Preset, mode: str, *,
        device: Optional[str] = None, console: Any = None, num_workers: Optional[int] = None,
        provenance: Optional[Mapping[str, Any]] = None, checkpoints: bool = True,
        prepare: Optional[Callable[[Path], None]] = None, data_identity: Optional[Mapping[str, Any]] = None,
        allow_data_change: bool = False) -> FitResult:
    """Train `task` on `data` (a map-style dataset) for cfg.steps optimiser steps in `run_dir`.

    cfg: the preset's section for this mode (`preset.tokenizer_train` or `preset.train`);
    mode: "tokenizer" / "train" / "distill" (recorded in checkpoint provenance; a checkpoint of
    another mode is refused on resume). device: None = CUDA when available, else "cpu".
    Resumes from the newest complete checkpoint in run_dir. Returns a FitResult.
    checkpoints=False writes none (`fvar bench train` times the loop without its I/O).
    prepare(run_dir) writes the caller's own run files (class index, tokenizer copy): on the main
    process only, after every rank has checked the directory, before any rank trains.
    data_identity ({"source", "path", "fingerprint"}, see `data_identity`) is recorded in every
    checkpoint; resuming on other data is refused unless allow_data_change (then logged).
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    from .checkpoints import load_checkpoint, load_training_state, save_checkpoint
    from .presets import preset_to_yaml

    run_dir = Path(run_dir)
    S = LoopSettings.from_config(cfg)
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    mp = {"bf16": "bf16", "fp16": "fp16"}.get(S.precision, "no") if use_cuda else "no"
    acc = Accelerator(cpu=not use_cuda, mixed_precision=mp)
    # fp32 on CPU (the exact path) unless asked: bf16 autocast is ~1.6× on AVX512-BF16 CPUs. Applied
    # here, not through accelerate, whose process-wide state refuses a second precision in one process.
    cpu_bf16 = not use_cuda and S.cpu_bf16
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if cpu_bf16 else acc.autocast
    dev, main = acc.device, acc.is_main_process
    if acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM):
        # Checkpoints, the "ranks agree" check and sample grids read full state dicts on one rank:
        # right for replicated (DDP) weights, wrong for sharded ones. Refuse rather than save shards.
        raise UserError(f"accelerate is configured for {acc.distributed_type.name}; fvar's loop supports one "
                        f"device and DDP (accelerate launch --multi_gpu) so far: choose DDP in `accelerate config`")

    # 1. The run directory: refuse another run's, or one another process holds, before writing to it;
    #    then the newest checkpoint that verifies (newer broken ones are named, kept and set aside).
    check_run_dir(run_dir, preset)
    lock = _lock_run_dir(acc, run_dir)
    try:
        chosen, skipped = usable_checkpoint(run_dir)
        if skipped and chosen is None:
            raise UserError(f"{run_dir}: no usable checkpoint ({skipped[0][0].name}: {skipped[0][1]}); the files are "
                            f"kept: move {run_dir / CHECKPOINTS} away to start over")
        data_note = _check_data_identity(chosen[1] if chosen else None, data_identity, allow_data_change)
        acc.wait_for_everyone()  # every rank has read the directory before the main process writes to it
        if main:
            # set aside, not deleted: saving that step again would otherwise replace the evidence
            asides = [_set_aside(d) for d, _ in skipped]
            atomic_write_bytes(run_dir / CONFIG_YAML, preset_to_yaml(preset).encode())
            for leftover in (run_dir / CHECKPOINTS).glob(".step-*") if (run_dir / CHECKPOINTS).is_dir() else []:
                shutil.rmtree(leftover, ignore_errors=True)  # temporaries of an interrupted save
            if prepare is not None:
                prepare(run_dir)
        acc.wait_for_everyone()
        log = RunLog(run_dir, console, enabled=main)
        for (d, reason), aside in zip(skipped, asides if main else [d for d, _ in skipped]):
            log.info(f"skipped checkpoint {d.name}: {reason}; kept as {aside.name}, resuming from "
                     f"{chosen[1].name}")
        if data_note:
            log.info(data_note)

        # 2. Model, optimiser; the RNG seeded first so a fresh run's initialisation is reproducible.
        seed_everything(S.seed)
        model = task.build()
        groups = []
        for g in task.param_groups(model):
            params = [p for p in g["params"] if p.requires_grad]
            if params:
                groups.append({"params": params, "wd_mult": 1.0 if g.get("weight_decay", True) else 0.0,
                               "lr_mult": float(g.get("lr_mult", 1.0)), "lr": S.peak_lr, "weight_decay": 0.0})
        if not groups:
            raise UserError("nothing to train: every parameter of the model is frozen")
        model = model.to(dev)
        opt = torch.optim.AdamW(groups, lr=S.peak_lr, betas=S.betas, weight_decay=0.0,
                                **({"fused": True} if dev.type == "cuda" else {}))

        # 3. Resume.
        start, resumed_from, last_ckpt, position = 0, None, None, 0
        best_metric = getattr(task, "best_metric", None)
        best: Optional[Dict[str, Any]] = None  # {"metric", "value", "step"} of the best checkpoint so far
        if chosen is not None:
            step0, path = chosen
            ck = load_checkpoint(path, expect_kind=task.kind)
            state = load_training_state(path)
            if state is None or state.get("mode") != mode:
                raise UserError(f"{path} is a checkpoint of a '{state.get('mode') if state else '?'}' run, "
                                f"not '{mode}'; choose another --out")
            task.load_state_dict(ck.state_dict)
            if hasattr(task, "load_extra_state") and state.get("task") is not None:
                task.load_extra_state(state["task"])  # first: its messages name what differs
            try:
                opt.load_state_dict(state["optimizer"])
            except ValueError as e:  # another set of trainable parameters than the run had
                raise UserError(f"{path}: the run's optimiser state does not fit this model ({e}); resume with the "
                                f"same options, or choose another --out") from None
            rngs = state["rng"]
            _set_rng_state(rngs[acc.process_index] if acc.process_index < len(rngs) else rngs[0], dev)
            if acc.process_index >= len(rngs):
                torch.manual_seed(S.seed + 7919 * acc.process_index)  # a new rank: a new, seeded stream
            start, position = int(state["step"]), int(state["data_position"])
            best = state.get("best")
            resumed_from, last_ckpt = start, path
        elif acc.num_processes > 1:
            torch.manual_seed(S.seed + 7919 * acc.process_index)

        if main:
            _truncate_metrics(run_dir / METRICS, start)
        model, opt = acc.prepare(model, opt)
        task.attach(model)

        # 4. Data.
        stream = BatchStream(len(data), S.batch_size, S.seed, position, S.grad_accum, acc.num_processes,
                             acc.process_index)
        workers = int(num_workers if num_workers is not None else getattr(preset.data, "num_workers", 0))
        loader = torch.utils.data.DataLoader(EpochItems(data, S.seed), batch_sampler=stream, num_workers=workers,
                                             pin_memory=dev.type == "cuda", prefetch_factor=2 if workers else None,
                                             # its own generator: creating the iterator draws a worker base
                                             # seed, which must not come from (and shift) the global stream
                                             generator=torch.Generator().manual_seed(S.seed))

        for line in (getattr(task, "describe", lambda: [])() or []):
            log.info(line)
        if resumed_from is not None:
            log.info(f"resuming {run_dir} from step {resumed_from} ({last_ckpt.name})")
            planned = (state.get("scheduler") or {}).get("steps")
            if planned is not None and planned != S.steps and resumed_from < S.steps:
                log.info(f"note: the run was planned for {planned} steps, now {S.steps}: warm-up and decay are laid "
                         f"over {S.steps} steps, so the lr from step {resumed_from} on is not the original plan's")
        else:
            log.info(f"new run in {run_dir}: {preset.name}, {mode}, {S.steps} steps of {S.batch_size} images "
                     f"on {dev.type} ({acc.num_processes} process{'es' if acc.num_processes > 1 else ''}, "
                     f"{'bf16 autocast' if cpu_bf16 else 'fp32' if mp == 'no' else mp})")

        def save(step: int) -> Path:
            nonlocal last_ckpt, best
            rngs = _gather_objects(acc, _rng_state(dev))
            extra = task.extra_state() if hasattr(task, "extra_state") else None
            # "best" = the lowest `best_metric` of the log window that ends at a checkpoint
            value = last_metrics.get(best_metric) if last_metrics.get("step") == step else None
            is_best = isinstance(value, float) and math.isfinite(value) and (best is None or value < best["value"])
            if is_best:
                best = {"metric": best_metric, "value": value, "step": step}
            if main:
                state = {"version": STATE_VERSION, "mode": mode, "step": step,
                         "data_position": step * S.batch_size, "optimizer": opt.state_dict(),
                         "scheduler": {"name": S.schedule, "step": step, "steps": S.steps}, "rng": rngs, "task": extra,
                         "best": best}
                prov = {"source": "fvar training", "mode": mode, "step": step, **dict(provenance or {}),
                        **({"data_identity": dict(data_identity)} if data_identity else {})}
                root = run_dir / CHECKPOINTS
                final = save_checkpoint(root / _step_name(step), kind=task.kind, preset=preset,
                                        state_dict=task.state_dict(), provenance=prov, training_state=state)
                atomic_write_bytes(root / LATEST, (final.name + "\n").encode())
                if is_best:
                    atomic_write_bytes(root / BEST, (final.name + "\n").encode())
                keep = _step_name(best["step"]) if best else None
                for _, old in complete_checkpoints(run_dir)[:-S.keep_last]:
                    if old != final and old.name != keep:
                        shutil.rmtree(old, ignore_errors=True)
                last_ckpt = final
            acc.wait_for_everyone()
            return run_dir / CHECKPOINTS / _step_name(step)

        # 5. The loop.
        params = [p for g in opt.param_groups for p in g["params"]]
        window: Dict[str, torch.Tensor] = {}
        n_window, t_window, t0 = 0, time.perf_counter(), time.perf_counter()
        last_metrics: Dict[str, Any] = {}
        progress = _Progress(log, S.steps, start) if log.interactive else None
        it = iter(loader)
        model.train()
        step = start
        try:
            for step in range(start, S.steps):
                lr, wd = S.lr_at(step), S.wd_at(step)
                for g in opt.param_groups:
                    g["lr"] = lr * g["lr_mult"]
                    g["weight_decay"] = wd * g["wd_mult"]
                metrics_step: Dict[str, torch.Tensor] = {}
                for micro in range(S.grad_accum):
                    batch = _to_device(next(it), dev)
                    sync = micro == S.grad_accum - 1
                    with (nullcontext() if sync else acc.no_sync(model)), autocast():
                        loss, metrics = task.step(batch, step)
                    bad = torch.tensor(0.0 if bool(torch.isfinite(loss.detach())) else 1.0, device=dev)
                    if acc.reduce(bad, reduction="sum").item() > 0:
                        where = f"; the last good checkpoint, {last_ckpt}, is untouched" if last_ckpt else \
                            "; no checkpoint was written"
                        raise UserError(f"loss is {loss.detach().float().item()} at step {step + 1}: stopped before "
                                        f"the update{where}. Lower the lr (--set …lr=) or check the data")
                    acc.backward(loss / S.grad_accum)
                    for k, v in {"loss": loss, **metrics}.items():
                        v = v.detach().float() if isinstance(v, torch.Tensor) else torch.tensor(float(v))
                        metrics_step[k] = metrics_step.get(k, 0) + v / S.grad_accum
                if S.grad_clip > 0:
                    gn = acc.clip_grad_norm_(params, S.grad_clip)
                    metrics_step["grad_norm"] = (gn.detach().float() if isinstance(gn, torch.Tensor)
                                                 else torch.tensor(gn))
                opt.step()
                opt.zero_grad(set_to_none=True)
                extra = getattr(task, "after_step", None)
                if extra is not None:
                    for k, v in (extra(step + 1) or {}).items():
                        metrics_step[k] = torch.as_tensor(float(v))
                for k, v in metrics_step.items():
                    window[k] = window.get(k, 0) + v
                n_window += 1
                done = step + 1

                if done % S.log_every == 0 or done == S.steps:
                    dt = time.perf_counter() - t_window
                    line = {"step": done}
                    line.update({k: _scalar(v / n_window) for k, v in window.items()})
                    line["lr"] = lr
                    line["img_per_s"] = n_window * S.batch_size / max(dt, 1e-9)
                    if hasattr(task, "log_metrics"):
                        line.update({k: _scalar(v) for k, v in (task.log_metrics(done) or {}).items()})
                    line["elapsed_s"] = time.perf_counter() - t0
                    last_metrics = line
                    if main:
                        append_line(run_dir / METRICS, json.dumps(line))
                        eta = (S.steps - done) * dt / n_window
                        if progress is None:
                            log.info(f"step {done}/{S.steps} loss {line['loss']:.4f} lr {lr:.3g} "
                                     f"{line['img_per_s']:.1f} img/s eta {_fmt_eta(eta)}"
                                     + "".join(f" {k} {v:.4g}" for k, v in line.items()
                                               if k not in ("step", "loss", "lr", "img_per_s", "elapsed_s")
                                               and isinstance(v, float)))
                    window, n_window, t_window = {}, 0, time.perf_counter()
                if progress is not None:
                    progress.update(done, last_metrics)
                if S.sample_every and done % S.sample_every == 0 and main and hasattr(task, "on_sample"):
                    model.eval()
                    task.on_sample(run_dir, done)
                    model.train()
                if checkpoints and (done % S.ckpt_every == 0 or done == S.steps):
                    save(done)
        except KeyboardInterrupt as e:
            newest = f"its newest checkpoint is {last_ckpt.name}" if last_ckpt else "no checkpoint was written yet"
            mark_interrupt(e, f"at step {step} of {S.steps} in {run_dir} ({newest})")
            raise
        finally:
            if progress is not None:
                progress.stop()
            del it
        if acc.num_processes > 1:
            # DDP keeps replicas equal by construction; check it, since a divergence (a rank-local
            # update, a non-deterministic op) would silently train N different models.
            from .shards import weights_sha256

            digests = _gather_objects(acc, weights_sha256(task.state_dict()))
            if len(set(digests)) > 1:
                raise UserError(f"the {acc.num_processes} processes ended with different weights ({digests}): "
                                f"a bug or a non-deterministic operation; report it")
            log.info(f"all {acc.num_processes} processes hold identical weights (sha256 {digests[0][:16]})")
        if resumed_from is not None and resumed_from >= S.steps:
            log.info(f"{run_dir} already has {resumed_from} of {S.steps} steps; nothing to do")
        else:
            log.info(f"done: {S.steps} steps, checkpoint {last_ckpt}")
        return FitResult(run_dir=run_dir, step=max(start, S.steps), resumed_from=resumed_from, checkpoint=last_ckpt,
                         metrics=last_metrics, main_process=main)
    finally:
        if lock is not None:
            lock.release()


def _gather_objects(acc: Any, obj: Any) -> List[Any]:
    if acc.num_processes == 1:
        return [obj]
    from accelerate.utils import gather_object

    return gather_object([obj])


class _Progress:
    """A rich progress bar: step, loss, lr, img/s, ETA (only on a terminal)."""

    def __init__(self, log: RunLog, total: int, start: int):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.p = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                          TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=log.console,
                          transient=False)
        self.p.start()
        self.t = self.p.add_task("train", total=total, completed=start, info="")

    def update(self, done: int, m: Mapping[str, Any]) -> None:
        info = (f"loss {m['loss']:.4f} lr {m['lr']:.2e} {m['img_per_s']:.1f} img/s" if m else "")
        self.p.update(self.t, completed=done, info=info)

    def stop(self) -> None:
        self.p.stop()
