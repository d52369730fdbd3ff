"""The one training loop (docs/design.md §7): tokenizer, transformer, distillation runs are
*tasks* plugged into `fit`, which owns everything they share. `fit` reads as its steps:

    fit(task, data, run_dir)
      _accelerator     accelerate: CPU, one GPU, DDP or FSDP (`accelerate launch`); bf16/fp16 autocast
                       on CUDA only, fp32 on CPU unless cpu_bf16
      _open_run        the run directory (`runs`): checked, locked, config.yaml written, the
                       checkpoint to resume from picked (the newest that verifies)
      _resume          weights, step, RNG streams of torch/numpy/python, data position, task state
      shard            train.strategy fsdp: FSDP2 over the task's units, then the root
                       (`train.sharding`, docs/design.md §7.1); DDP is accelerate's `prepare`
      build_optimizer  AdamW (fused), per-group weight decay and lr multipliers; the saved state
                       loaded whole, or sliced onto the shards
      _loader          an infinite stream of per-epoch permutations seeded by (seed, epoch); step s
                       uses samples [s·B, (s+1)·B) of the stream, each rank a contiguous shard of it,
                       and item i of epoch e is loaded with the dataset at epoch e (its augmentation
                       is a function of (seed, e, i)) — so order and crops survive a resume
      _train           the loop: lr (`config.LoopConfig.lr_at`: VAR's schedule, docs/var-compat.md
                       §3), micro-steps (no_sync between them), clip, step, log, sample, save; a
                       NaN/inf loss stops before the update and leaves every checkpoint untouched
      _Saver           checkpoints/step-N, latest and best (the lowest `best_metric` of a log window
                       ending at a checkpoint step), the last `keep_last` kept plus the best; weights
                       and optimiser state always full (gathered to the main process when sharded)

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
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Protocol, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn

from fvar_core.atomic import atomic_write_bytes, ensure_dir
from fvar_core.checkpoints import load_checkpoint, load_training_state, save_checkpoint
from fvar_core.config import LoopConfig, Preset
from fvar_core.data.folders import read_class_index
from fvar_core.devices import pick_device
from fvar_core.errors import UserError
from fvar_core.hashing import tensors_sha256
from fvar_core.interrupt import mark_interrupt
from fvar_core.presets import preset_to_yaml
from fvar_core.runlock import RunLock
from fvar_core.runs import (BEST, CHECKPOINTS, CLASS_INDEX, CONFIG_YAML, LATEST, METRICS, CheckedRunDir, RunLog,
                            append_line, check_data_identity, check_run_dir, complete_checkpoints, set_aside,
                            step_name, truncate_metrics, usable_checkpoint)
from fvar_core.train.sharding import (check_strategy, gathered, gathered_optimizer, gathered_tree, load_optimizer,
                                     local_state_bytes, replicated_state, shard)
from fvar_core.train.tracking import Tracking, tracker_names

STATE_VERSION = 1


# --------------------------------------------------------------------------------- the protocol
class Task(Protocol):
    """What `fit` needs from a training mode.

    Required:
        kind: str                         checkpoint kind ("tokenizer", "var", "teacher")
        mode: str                         "tokenizer", "train" or "distill" (in the checkpoints)
        preset: Preset                    the run's preset
        loop_config: LoopConfig           the preset's section the loop reads (train / tokenizer_train)
        build() -> nn.Module              every model of the task in one root module (frozen
                                          parameters have requires_grad False); called once, after
                                          the RNG is seeded, on the CPU
        param_groups(model) -> list[dict] AdamW groups: {"params": [...], "weight_decay": bool}
        attach(model) -> None             the prepared module (DDP / autocast wrapped) that step uses
        step(batch, step) -> (loss, metrics)   one micro-batch on the device; loss a 0-d tensor,
                                          metrics {name: float | 0-d tensor}, averaged over a log window
        state_dict() -> {name: Tensor}    the weights of the checkpoint (safetensors); sharded ones
                                          as DTensors: the loop gathers them (`sharding.gathered`)
        load_state_dict(sd) -> None
    Optional (looked up with getattr):
        extra_state() / load_extra_state(d)   non-weight state for training_state.pt (tensors,
                                          numbers, strings, lists, dicts only)
        after_step(step) -> dict | None   after each optimiser step (e.g. dead-code restarts)
        log_metrics(step) -> dict         extra entries of the metrics line, at log steps
        on_sample(run_dir, step[, weights])   sample grids, every `sample_every` steps (main process;
                                          sharded runs pass the gathered full weights)
        best_metric: str                  metrics entry (lower is better) that picks the best checkpoint
        describe() -> list[str]           lines for the log at start
        shard_units(model) -> list[nn.Module]   the FSDP groups under train.strategy fsdp (a task
                                          without it refuses fsdp, with its `fsdp_refusal` line)
    """

    kind: str
    mode: str
    preset: Preset
    loop_config: LoopConfig

    def build(self) -> nn.Module: ...
    def param_groups(self, model: nn.Module) -> List[Dict[str, Any]]: ...
    def attach(self, model: nn.Module) -> None: ...
    def step(self, batch: Any, step: int) -> Tuple[torch.Tensor, Dict[str, Any]]: ...
    def state_dict(self) -> Dict[str, torch.Tensor]: ...
    def load_state_dict(self, sd: Mapping[str, torch.Tensor]) -> None: ...


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
        self._perm: Optional[Tuple[int, List[int]]] = None

    def _item(self, pos: int) -> Tuple[int, int]:
        epoch, off = divmod(pos, self.n)
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, _epoch_permutation(self.n, self.seed, epoch).tolist())
        return self._perm[1][off], epoch

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


def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
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


# ------------------------------------------------------------------------------------ set-up
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
def fit(task: Task, data: Any, run_dir: Union[str, Path, CheckedRunDir], *, device: Optional[str] = None,
        console: Any = None, num_workers: Optional[int] = None, provenance: Optional[Mapping[str, Any]] = None,
        checkpoints: bool = True, prepare: Optional[Callable[[Path], None]] = None,
        data_identity: Optional[Mapping[str, Any]] = None, allow_data_change: bool = False) -> FitResult:
    """Train `task` on `data` (a map-style dataset) for `task.loop_config.steps` optimiser steps in
    run_dir, resuming from its newest usable checkpoint. Returns a FitResult.

    The task brings the preset, the mode ("tokenizer" / "train" / "distill": recorded in checkpoint
    provenance; a checkpoint of another mode is refused on resume) and the loop's config. run_dir:
    a path, or the `runs.CheckedRunDir` a caller got from `runs.check_run_dir` before its own slow
    set-up (then not checked again). device: `devices.pick_device`'s names (None = auto).
    checkpoints=False writes none (`fvar bench train` times the loop without its I/O).
    prepare(run_dir) writes the caller's own run files (class index, tokenizer copy): on the main
    process only, after every rank has checked the directory, before any rank trains.
    data_identity ({"source", "path", "fingerprint"}, see `runs.data_identity`) is recorded in every
    checkpoint; resuming on other data is refused unless allow_data_change (then logged).
    """
    preset, cfg = task.preset, task.loop_config
    run = run_dir if isinstance(run_dir, CheckedRunDir) else check_run_dir(run_dir, preset)
    trackers = tracker_names(cfg.log_with)  # a missing tracker package: one line, before any work
    acc, autocast, precision = _accelerator(cfg, device, trackers, run.path)
    sharded = _sharded(task, cfg, acc)
    lock = _lock_run_dir(acc, run.path)
    tracking = Tracking(acc, trackers)
    try:
        log, chosen = _open_run(acc, run.path, preset, console, prepare, data_identity, allow_data_change)
        tracking.start(run.path, preset)
        seed_everything(cfg.seed)  # before build: a fresh run's initialisation is reproducible
        model = task.build().to(acc.device)
        resumed = _resume(task, chosen, acc, cfg)  # the weights go into the whole model, before sharding
        if sharded:
            shard(model, task.shard_units(model))
        opt = build_optimizer(task, model, cfg, acc.device)
        if resumed.optimizer is not None:
            _load_optimizer(opt, resumed, sharded)
        if acc.is_main_process:
            truncate_metrics(run.path / METRICS, resumed.step)
        if not sharded:  # accelerate wraps DDP; a sharded model is already what the step runs
            model, opt = acc.prepare(model, opt)
        task.attach(model)
        workers = num_workers if num_workers is not None else preset.data.num_workers
        loader = _loader(data, cfg, resumed.position, acc, workers)
        _log_start(log, task, run.path, cfg, acc, precision, resumed, sharded)
        saver = _Saver(task, opt, acc, run.path, cfg, provenance, data_identity, resumed, enabled=checkpoints)
        metrics = _train(task, model, opt, loader, cfg, acc, autocast, resumed.step, log, saver, run.path, tracking,
                         sharded)
        _check_replicas(acc, task, log, model if sharded else None)
        if resumed.from_step is not None and resumed.from_step >= cfg.steps:
            log.info(f"{run.path} already has {resumed.from_step} of {cfg.steps} steps; nothing to do")
        else:
            log.info(f"done: {cfg.steps} steps, checkpoint {saver.last}")
        return FitResult(run_dir=run.path, step=max(resumed.step, cfg.steps), resumed_from=resumed.from_step,
                         checkpoint=saver.last, metrics=metrics, main_process=acc.is_main_process)
    finally:
        tracking.finish()
        if lock is not None:
            lock.release()
        if acc.num_processes > 1:
            # Leave no process group for the interpreter's exit to tear down: gloo's threads, destroyed
            # unjoined there, aborted a rank now and then ("terminate called without an active
            # exception", exit -6) after a run that had finished and saved.
            acc.state.destroy_process_group()


def _accelerator(cfg: LoopConfig, device: Optional[str], trackers: Sequence[str] = (),
                 project_dir: Optional[Path] = None) -> Tuple[Any, Callable[[], Any], str]:
    """The Accelerator for `device` (`devices.pick_device`: CUDA, MPS or CPU), the autocast context
    of a micro-step, and the precision in words. bf16/fp16 through accelerate on CUDA; fp32
    elsewhere unless cfg.cpu_bf16."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    dev = pick_device(device or "auto")
    use_cuda = dev.type == "cuda"
    mp = {"bf16": "bf16", "fp16": "fp16"}.get(cfg.precision, "no") if use_cuda else "no"
    acc = Accelerator(cpu=dev.type == "cpu", mixed_precision=mp, log_with=list(trackers) or None,
                      project_dir=str(project_dir) if trackers else None)
    if acc.distributed_type in (DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM):
        raise UserError(f"accelerate is configured for {acc.distributed_type.name}; fvar's loop runs one device, "
                        f"DDP or FSDP: choose one of those in `accelerate config`")
    # fp32 on CPU (the exact path) unless asked: bf16 autocast is ~1.6× on AVX512-BF16 CPUs. Applied
    # here, not through accelerate, whose process-wide state refuses a second precision in one process.
    cpu_bf16 = not use_cuda and cfg.cpu_bf16
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if cpu_bf16 else acc.autocast
    return acc, autocast, "bf16 autocast" if cpu_bf16 else "fp32" if mp == "no" else mp


def _sharded(task: Task, cfg: LoopConfig, acc: Any) -> bool:
    """Whether this run shards its state (FSDP2): the config's strategy, or accelerate's own config
    (`accelerate launch` with an FSDP config file), whose sharding fvar applies itself (`shard`:
    each block, then the root; accelerate's wrap policy options are not read)."""
    from accelerate.utils import DistributedType

    strategy = "fsdp" if acc.distributed_type == DistributedType.FSDP else cfg.strategy
    if strategy == "fsdp" and not hasattr(task, "shard_units"):
        raise UserError(getattr(task, "fsdp_refusal", f"strategy fsdp is not available for {task.mode} runs"))
    check_strategy(strategy, processes=acc.num_processes, precision=cfg.precision, device_type=acc.device.type)
    return strategy == "fsdp"


def _open_run(acc: Any, run_dir: Path, preset: Preset, console: Any, prepare: Optional[Callable[[Path], None]],
              identity: Optional[Mapping[str, Any]], allow_data_change: bool
              ) -> Tuple[RunLog, Optional[Tuple[int, Path]]]:
    """Pick the checkpoint to resume from (newer broken ones are named, kept and set aside), refuse
    other data, write config.yaml and the caller's files; (the run's log, (step, dir) or None)."""
    main = acc.is_main_process
    chosen, skipped = usable_checkpoint(run_dir)
    if skipped and chosen is None:
        raise UserError(f"{run_dir}: no usable checkpoint ({skipped[0][0].name}: {skipped[0][1]}); the files are "
                        f"kept: move {run_dir / CHECKPOINTS} away to start over")
    data_note = check_data_identity(chosen[1] if chosen else None, identity, allow_data_change)
    acc.wait_for_everyone()  # every rank has read the directory before the main process writes to it
    asides = [d for d, _ in skipped]
    if main:
        # set aside, not deleted: saving that step again would otherwise replace the evidence
        asides = [set_aside(d) for d in asides]
        atomic_write_bytes(run_dir / CONFIG_YAML, preset_to_yaml(preset).encode())
        for leftover in (run_dir / CHECKPOINTS).glob(".step-*") if (run_dir / CHECKPOINTS).is_dir() else []:
            shutil.rmtree(leftover, ignore_errors=True)  # temporaries of an interrupted save
        if prepare is not None:
            prepare(run_dir)
    acc.wait_for_everyone()
    log = RunLog(run_dir, console, enabled=main)
    for (d, reason), aside in zip(skipped, asides):
        log.info(f"skipped checkpoint {d.name}: {reason}; kept as {aside.name}, resuming from {chosen[1].name}")
    if data_note:
        log.info(data_note)
    return log, chosen


def build_optimizer(task: Task, model: nn.Module, cfg: LoopConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW over the task's groups (frozen parameters left out). Each group keeps its multipliers:
    the loop sets lr = lr_at(step)·lr_mult and weight decay = wd_at(step)·wd_mult. Fused on every
    device: the fused kernel takes `found_inf`, which is how the loop skips the update of a step with
    non-finite gradients without waiting for the device (`_skip_if_not_finite`)."""
    groups = []
    for g in task.param_groups(model):
        params = [p for p in g["params"] if p.requires_grad]
        if params:
            groups.append({"params": params, "wd_mult": 1.0 if g.get("weight_decay", True) else 0.0,
                           "lr_mult": float(g.get("lr_mult", 1.0)), "lr": cfg.peak_lr, "weight_decay": 0.0})
    if not groups:
        raise UserError("nothing to train: every parameter of the model is frozen")
    return torch.optim.AdamW(groups, lr=cfg.peak_lr, betas=cfg.betas, weight_decay=0.0, fused=True)


@dataclass
class _Resumed:
    """Where the loop starts: optimiser steps done, samples consumed, the best checkpoint so far
    ({"metric", "value", "step"}), and for a resumed run its checkpoint and planned length."""

    step: int = 0
    position: int = 0
    best: Optional[Dict[str, Any]] = None
    from_step: Optional[int] = None
    path: Optional[Path] = None
    planned_steps: Optional[int] = None
    optimizer: Optional[Dict[str, Any]] = None  # the saved optimiser state, loaded once the optimiser exists


def _resume(task: Task, chosen: Optional[Tuple[int, Path]], acc: Any, cfg: LoopConfig) -> _Resumed:
    """Load weights, task state and RNG streams from `chosen` (each rank its own stream; a rank the
    run did not have gets a new seeded one); a fresh multi-process run seeds each rank. The
    optimiser state is returned for `_load_optimizer`."""
    if chosen is None:
        if acc.num_processes > 1:
            torch.manual_seed(cfg.seed + 7919 * acc.process_index)
        return _Resumed()
    _, path = chosen
    ck = load_checkpoint(path, expect_kind=task.kind)
    state = load_training_state(path)
    if state is None or state.get("mode") != task.mode:
        raise UserError(f"{path} is a checkpoint of a '{state.get('mode') if state else '?'}' run, "
                        f"not '{task.mode}'; choose another --out")
    task.load_state_dict(ck.state_dict)
    if hasattr(task, "load_extra_state") and state.get("task") is not None:
        task.load_extra_state(state["task"])  # first: its messages name what differs
    rngs = state["rng"]
    _set_rng_state(rngs[acc.process_index] if acc.process_index < len(rngs) else rngs[0], acc.device)
    if acc.process_index >= len(rngs):
        torch.manual_seed(cfg.seed + 7919 * acc.process_index)  # a new rank: a new, seeded stream
    step = int(state["step"])
    return _Resumed(step=step, position=int(state["data_position"]), best=state.get("best"), from_step=step,
                    path=path, planned_steps=(state.get("scheduler") or {}).get("steps"), optimizer=state["optimizer"])


def _load_optimizer(opt: torch.optim.Optimizer, resumed: _Resumed, sharded: bool) -> None:
    """The saved optimiser state (always full, in torch's layout) onto `opt`: as it is, or sliced
    onto the shards — so a run resumes under either strategy and any number of processes."""
    try:
        load_optimizer(opt, resumed.optimizer) if sharded else opt.load_state_dict(resumed.optimizer)
        for g in opt.param_groups:  # runs saved by the unfused optimiser resume fused (same state tensors)
            g["fused"], g["foreach"] = True, None
    except ValueError as e:  # another set of trainable parameters than the run had
        raise UserError(f"{resumed.path}: the run's optimiser state does not fit this model ({e}); resume with "
                        f"the same options, or choose another --out") from None
    resumed.optimizer = None  # the model holds it now; no second copy for the whole run


def _loader(data: Any, cfg: LoopConfig, position: int, acc: Any, workers: int) -> torch.utils.data.DataLoader:
    """This rank's batches from sample `position` of the run's stream (see `BatchStream`)."""
    stream = BatchStream(len(data), cfg.batch_size, cfg.seed, position, cfg.grad_accum, acc.num_processes,
                         acc.process_index)
    return torch.utils.data.DataLoader(EpochItems(data, cfg.seed), batch_sampler=stream, num_workers=workers,
                                       pin_memory=acc.device.type == "cuda", prefetch_factor=2 if workers else None,
                                       # its own generator: creating the iterator draws a worker base
                                       # seed, which must not come from (and shift) the global stream
                                       generator=torch.Generator().manual_seed(cfg.seed))


def _log_start(log: RunLog, task: Task, run_dir: Path, cfg: LoopConfig, acc: Any, precision: str,
               resumed: _Resumed, sharded: bool) -> None:
    for line in (getattr(task, "describe", lambda: [])() or []):
        log.info(line)
    if resumed.from_step is not None:
        log.info(f"resuming {run_dir} from step {resumed.from_step} ({resumed.path.name})")
        planned = resumed.planned_steps
        if planned is not None and planned != cfg.steps and resumed.from_step < cfg.steps:
            log.info(f"note: the run was planned for {planned} steps, now {cfg.steps}: warm-up and decay are laid "
                     f"over {cfg.steps} steps, so the lr from step {resumed.from_step} on is not the original plan's")
    else:
        n = acc.num_processes
        how = ", FSDP" if sharded else ", DDP" if n > 1 else ""
        log.info(f"new run in {run_dir}: {task.preset.name}, {task.mode}, {cfg.steps} steps of {cfg.batch_size} "
                 f"images on {acc.device.type} ({n} process{'es' if n > 1 else ''}{how}, {precision})")


class _Saver:
    """Writes the run's checkpoints: step-N (weights + training state), `latest`, `best` (the lowest
    `task.best_metric` of a log window ending at a checkpoint step), and prunes all but the last
    `keep_last` and the best. `last` is the newest checkpoint written or resumed from."""

    def __init__(self, task: Task, opt: torch.optim.Optimizer, acc: Any, run_dir: Path, cfg: LoopConfig,
                 provenance: Optional[Mapping[str, Any]], identity: Optional[Mapping[str, Any]],
                 resumed: _Resumed, enabled: bool = True):
        self.task, self.opt, self.acc, self.run_dir, self.cfg = task, opt, acc, run_dir, cfg
        self.provenance = {**dict(provenance or {}), **({"data_identity": dict(identity)} if identity else {})}
        self.best, self.last, self.enabled = resumed.best, resumed.path, enabled
        self.best_metric = getattr(task, "best_metric", None)
        # the run's class names for the model cards: classes.json, written by the task's prepare
        # before the saver exists, so read once here rather than at every checkpoint
        index = run_dir / CLASS_INDEX
        self.classes = read_class_index(index) if index.is_file() else None

    def due(self, done: int) -> bool:
        return self.enabled and (done % self.cfg.ckpt_every == 0 or done == self.cfg.steps)

    def save(self, step: int, metrics: Mapping[str, Any],
             weights: Optional[Mapping[str, torch.Tensor]] = None) -> Path:
        """weights: the task's weights already gathered at this step (the sample grid's), else
        gathered here."""
        task, acc, cfg = self.task, self.acc, self.cfg
        main = acc.is_main_process
        rngs = _gather_objects(acc, _rng_state(acc.device))
        # every rank takes part: sharded tensors are gathered (to the main process's CPU) one by one
        if weights is None:
            weights = gathered(task.state_dict(), main)
        extra = gathered_tree(task.extra_state(), main) if hasattr(task, "extra_state") else None
        optimizer = gathered_optimizer(self.opt, main)
        value = metrics.get(self.best_metric) if metrics.get("step") == step else None
        is_best = isinstance(value, float) and math.isfinite(value) and (self.best is None or value < self.best["value"])
        if is_best:
            self.best = {"metric": self.best_metric, "value": value, "step": step}
        root = self.run_dir / CHECKPOINTS
        if main:
            state = {"version": STATE_VERSION, "mode": task.mode, "step": step,
                     "data_position": step * cfg.batch_size, "optimizer": optimizer,
                     "scheduler": {"name": cfg.lr_schedule, "step": step, "steps": cfg.steps}, "rng": rngs,
                     "task": extra, "best": self.best}
            prov = {"source": "fvar training", "mode": task.mode, "step": step, **self.provenance,
                    "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))}}
            final = save_checkpoint(root / step_name(step), kind=task.kind, preset=task.preset,
                                    state_dict=weights, provenance=prov, training_state=state,
                                    classes=self.classes)
            atomic_write_bytes(root / LATEST, (final.name + "\n").encode())
            if is_best:
                atomic_write_bytes(root / BEST, (final.name + "\n").encode())
            keep = step_name(self.best["step"]) if self.best else None
            for _, old in complete_checkpoints(self.run_dir)[:-cfg.keep_last]:
                if old != final and old.name != keep:
                    shutil.rmtree(old, ignore_errors=True)
            self.last = final
        acc.wait_for_everyone()
        return root / step_name(step)


def _train(task: Task, model: nn.Module, opt: torch.optim.Optimizer, loader: Any, cfg: LoopConfig, acc: Any,
           autocast: Callable[[], Any], start: int, log: RunLog, saver: _Saver, run_dir: Path,
           tracking: Tracking, sharded: bool = False) -> Dict[str, Any]:
    """The loop, in nanoGPT's order: lr, micro-steps, clip, step, log, sample, save. Returns the
    last metrics line."""
    main = acc.is_main_process
    params = [p for g in opt.param_groups for p in g["params"]]
    inner = getattr(opt, "optimizer", opt)  # accelerate's wrapper: found_inf goes to the torch optimiser
    window = _Window()
    last: Dict[str, Any] = {}
    progress = _Progress(log, cfg.steps, start) if log.interactive else None
    it = iter(loader)
    model.train()
    step = start
    pending: Optional[_Pending] = None
    try:
        for step in range(start, cfg.steps):
            lr, wd = cfg.lr_at(step), cfg.wd_at(step)
            for g in opt.param_groups:
                g["lr"], g["weight_decay"] = lr * g["lr_mult"], wd * g["wd_mult"]
            metrics: Dict[str, torch.Tensor] = {}
            for micro in range(cfg.grad_accum):
                # DDP all-reduces the gradients at the last micro-step only; FSDP reduce-scatters every
                # micro-step, so no rank ever holds a whole model's gradients (the point of sharding)
                sync = sharded or micro == cfg.grad_accum - 1
                batch = to_device(next(it), acc.device)
                with (nullcontext() if sync else acc.no_sync(model)), autocast():
                    loss, m = task.step(batch, step)
                acc.backward(loss / cfg.grad_accum)
                for k, v in {"loss": loss, **m}.items():
                    v = v.detach().float() if isinstance(v, torch.Tensor) else torch.tensor(float(v))
                    metrics[k] = metrics.get(k, 0) + v / cfg.grad_accum
            # The norm of the all-reduced gradients is the same on every rank: a NaN/inf anywhere
            # makes it non-finite everywhere, so each rank skips the same update with no collective
            # of its own; the fused optimiser skips on the device (found_inf), nothing waits here.
            gn = _clip(acc, params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf, sharded)
            if cfg.grad_clip > 0:
                metrics["grad_norm"] = gn
            scaled = getattr(acc, "scaler", None) is not None
            if scaled:  # fp16: the grad scaler skips overflowing steps itself; a non-finite loss still stops
                finite = torch.isfinite(metrics["loss"])
            else:
                finite = torch.isfinite(gn).to(acc.device)
            # The previous step's verdict, read now: its work finished before this step's (queued)
            # forward and backward started, so the read does not stall the device.
            _raise_if_bad(pending, saver.last)
            if not scaled:
                inner.found_inf = (~finite).float()
            opt.step()
            if sharded and step == start:  # what sharding saved, measured once (grads still held)
                _log_held(log, model, opt, acc.num_processes)
            opt.zero_grad(set_to_none=True)
            done = step + 1
            pending = _Pending(done, finite, metrics["loss"], acc if scaled and acc.num_processes > 1 else None)
            after = getattr(task, "after_step", None)
            extra = after(done) if after is not None else None
            if extra:
                _raise_if_bad(pending, saver.last)  # task hooks read the weights on the host
                pending = None
            for k, v in (extra or {}).items():
                metrics[k] = torch.as_tensor(float(v))
            window.add(metrics)

            report = done % cfg.log_every == 0 or done == cfg.steps
            sample_due = bool(cfg.sample_every and done % cfg.sample_every == 0 and hasattr(task, "on_sample"))
            # every rank checks at the same steps (a rank that stopped alone would hang the others)
            if report or sample_due or saver.due(done):  # these read values on the host anyway
                _raise_if_bad(pending, saver.last)
                pending = None
            if report:
                last = window.line(done, lr, cfg, task, acc)
                if main:
                    _report(log, last, cfg, window, progress is None)
                    tracking.log(last)
                window.reset()
            if progress is not None:
                progress.update(done, last)
            weights = None  # gathered once per step, for the sample grid and the checkpoint alike
            if sample_due:
                # sharded: every rank gathers the weights, the main process samples a whole copy
                weights = gathered(task.state_dict(), main) if sharded else None
                if main:
                    model.eval()
                    task.on_sample(run_dir, done, **({"weights": weights} if sharded else {}))
                    tracking.image(run_dir / "samples" / f"step-{done:07d}.png", done)
                    model.train()
            if saver.due(done):
                saver.save(done, last, weights)
        _raise_if_bad(pending, saver.last)
    except KeyboardInterrupt as e:
        newest = f"its newest checkpoint is {saver.last.name}" if saver.last else "no checkpoint was written yet"
        mark_interrupt(e, f"at step {step} of {cfg.steps} in {run_dir} ({newest})")
        raise
    finally:
        if progress is not None:
            progress.stop()
        del it
    return last


def _log_held(log: RunLog, model: nn.Module, opt: torch.optim.Optimizer, processes: int) -> None:
    held = local_state_bytes(model, opt)
    whole = 16 * sum(p.numel() for p in model.parameters() if p.requires_grad)  # fp32 weight, grad, Adam m, v
    mib = {k: v / 2**20 for k, v in held.items()}
    log.info(f"sharded state on this process: {sum(mib.values()):.2f} MiB (weights {mib['weights']:.2f}, gradients "
             f"{mib['grads']:.2f}, optimiser {mib['optimizer']:.2f}); a whole replica is {whole / 2**20:.2f} MiB, "
             f"1/{processes} of it {whole / processes / 2**20:.2f}")


def _clip(acc: Any, params: List[torch.Tensor], max_norm: float, sharded: bool) -> torch.Tensor:
    """Clip the gradients by their global norm; the norm (a 0-d tensor, equal on every rank). Sharded
    gradients are DTensors: torch's clip reduces their norms over the processes itself."""
    if not sharded:
        gn = acc.clip_grad_norm_(params, max_norm)
        return gn.detach().float() if isinstance(gn, torch.Tensor) else torch.tensor(float(gn))
    gn = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return (gn.full_tensor() if hasattr(gn, "full_tensor") else gn).detach().float()


@dataclass
class _Pending:
    """A step whose finiteness has not been read on the host yet: its number, the device flag, its loss."""

    step: int
    finite: torch.Tensor
    loss: torch.Tensor
    agree: Any = None  # the accelerator when the flag is per rank (fp16 losses under DDP): reduce it first


def _raise_if_bad(pending: Optional[_Pending], last_ckpt: Optional[Path]) -> None:
    """Stop every rank (they all hold the same verdict) after a step whose loss or gradients were not
    finite; its update was skipped on the device, so the weights and checkpoints stay good."""
    if pending is None:
        return
    finite = pending.finite
    if pending.agree is not None:  # one small all-reduce per optimiser step, fp16 + DDP only
        finite = pending.agree.reduce(finite.float(), reduction="sum") == pending.agree.num_processes
    if bool(finite):
        return
    where = f"; the last good checkpoint, {last_ckpt}, is untouched" if last_ckpt else "; no checkpoint was written"
    raise UserError(f"loss {pending.loss.float().item()} (or its gradients) not finite at step {pending.step}: "
                    f"its update was skipped and training stopped{where}. Lower the lr (--set …lr=) or check the data")


class _Window:
    """Metrics summed over the steps since the last log line, and their wall time."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.reset()

    def reset(self) -> None:
        self.sums: Dict[str, torch.Tensor] = {}
        self.n, self.t = 0, time.perf_counter()

    def add(self, metrics: Mapping[str, torch.Tensor]) -> None:
        for k, v in metrics.items():
            self.sums[k] = self.sums.get(k, 0) + v
        self.n += 1

    def line(self, done: int, lr: float, cfg: LoopConfig, task: Task, acc: Any = None) -> Dict[str, Any]:
        """The metrics.jsonl line of the window ending at step `done`: means over the steps and, with
        several processes (`acc`; a collective, every rank calls it), over the processes — the global
        batch's figures, the same curve on any number of processes."""
        self.dt = time.perf_counter() - self.t
        line: Dict[str, Any] = {"step": done}
        sums = self.sums
        if acc is not None and acc.num_processes > 1 and sums:
            parts = [torch.as_tensor(v, dtype=torch.float32, device=acc.device) for v in sums.values()]
            mean = acc.reduce(torch.cat([p.reshape(-1) for p in parts]), reduction="mean")
            sums = dict(zip(sums, (m.reshape(p.shape) for m, p in zip(mean.split([p.numel() for p in parts]), parts))))
        line.update({k: _scalar(v / self.n) for k, v in sums.items()})
        line["lr"] = lr
        line["img_per_s"] = self.n * cfg.batch_size / max(self.dt, 1e-9)
        if hasattr(task, "log_metrics"):
            line.update({k: _scalar(v) for k, v in (task.log_metrics(done) or {}).items()})
        line["elapsed_s"] = time.perf_counter() - self.t0
        return line


def _report(log: RunLog, line: Mapping[str, Any], cfg: LoopConfig, window: _Window, plain: bool) -> None:
    """Append the line to metrics.jsonl; without a progress bar, also print it."""
    append_line(log.path.with_name(METRICS), json.dumps(line))
    if plain:
        done = line["step"]
        eta = (cfg.steps - done) * window.dt / window.n
        log.info(f"step {done}/{cfg.steps} loss {line['loss']:.4f} lr {line['lr']:.3g} "
                 f"{line['img_per_s']:.1f} img/s eta {_fmt_eta(eta)}"
                 + "".join(f" {k} {v:.4g}" for k, v in line.items()
                           if k not in ("step", "loss", "lr", "img_per_s", "elapsed_s") and isinstance(v, float)))


def _check_replicas(acc: Any, task: Task, log: RunLog, sharded_model: Optional[nn.Module] = None) -> None:
    """DDP keeps replicas equal by construction; check it, since a divergence (a rank-local update,
    a non-deterministic op) would silently train N different models. Under FSDP each weight has one
    owner; what every rank holds whole (buffers) is checked."""
    if acc.num_processes == 1:
        return
    held = task.state_dict() if sharded_model is None else replicated_state(sharded_model)
    digests = _gather_objects(acc, tensors_sha256(held))
    what = "weights" if sharded_model is None else "replicated state (the weights are sharded)"
    if len(set(digests)) > 1:
        raise UserError(f"the {acc.num_processes} processes ended with different {what} ({digests}): "
                        f"a bug or a non-deterministic operation; report it")
    log.info(f"all {acc.num_processes} processes hold identical {what} (sha256 {digests[0][:16]})")

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
