"""Measuring speed honestly: devices, synchronised timers, peak memory, FLOP counts, result JSON.

Shared by every `fvar bench` subcommand. Rules: a timer on CUDA synchronises before it starts and
before it stops (kernels are asynchronous); peak memory is the CUDA allocator's peak on CUDA and the
process's resident set (RSS, sampled) on CPU — name which in the output; every result names the
machine (`machine()`), because a figure without its machine is not a result.
"""
from __future__ import annotations

import datetime as _dt
import os
import platform
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Union

import torch

from .errors import UserError

PathLike = Union[str, Path]


# ------------------------------------------------------------------------------------------------
# Devices
# ------------------------------------------------------------------------------------------------

def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux, platform otherwise)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def cpu_count() -> int:
    """CPU cores this process may use (what `nproc` prints)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def device_name(device: torch.device) -> str:
    """'NVIDIA H100 80GB HBM3' or '2 × Intel(R) Xeon(R) Processor (CPU)'."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return f"Apple MPS ({cpu_model()})"
    return f"{cpu_count()} × {cpu_model()} (CPU)"


def machine(device: torch.device) -> Dict[str, Any]:
    """Everything a reader needs to place a figure: device, CPU, threads, torch/CUDA versions."""
    device = torch.device(device)
    info: Dict[str, Any] = {"device": device_name(device), "device_type": device.type, "cpu": cpu_model(),
                            "cpu_cores": cpu_count(), "torch_threads": torch.get_num_threads(),
                            "torch": torch.__version__, "python": platform.python_version(),
                            "platform": platform.platform()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(cuda=torch.version.cuda, gpu_memory_bytes=props.total_memory)
    try:
        from importlib.metadata import version
        info["fvar"] = version("fvar")
    except Exception:
        pass
    return info


def synchronize(device: torch.device) -> None:
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


# ------------------------------------------------------------------------------------------------
# Time
# ------------------------------------------------------------------------------------------------

class Timer:
    """`with Timer(device) as t: ...` → t.seconds; synchronises the device at both ends."""

    def __init__(self, device: Union[str, torch.device] = "cpu"):
        self.device = torch.device(device)
        self.seconds = 0.0

    def __enter__(self) -> "Timer":
        synchronize(self.device)
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        synchronize(self.device)
        self.seconds = time.perf_counter() - self._t0


@dataclass
class Timings:
    """Repeated measurements of one phase (seconds)."""

    samples: List[float] = field(default_factory=list)

    def add(self, s: float) -> None:
        self.samples.append(s)

    @property
    def median(self) -> float:
        return statistics.median(self.samples) if self.samples else float("nan")

    @property
    def best(self) -> float:
        return min(self.samples) if self.samples else float("nan")

    def summary(self) -> Dict[str, Any]:
        return {"median_s": self.median, "best_s": self.best, "runs": len(self.samples)}


# ------------------------------------------------------------------------------------------------
# Memory
# ------------------------------------------------------------------------------------------------

def _rss_bytes() -> Optional[int]:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


class PeakMemory:
    """Peak memory over a `with` block.

    CUDA: `torch.cuda.max_memory_allocated` after a reset (kind 'cuda_allocated'). CPU: the process
    RSS sampled every `interval` s by a thread (kind 'rss'; `peak_bytes` is the whole process,
    `delta_bytes` the growth over the RSS at entry). Without /proc: ru_maxrss (kind 'maxrss', the
    process lifetime peak, so only an upper bound)."""

    def __init__(self, device: Union[str, torch.device] = "cpu", interval: float = 0.005):
        self.device = torch.device(device)
        self.interval = interval
        self.kind = "cuda_allocated" if self.device.type == "cuda" else "rss"
        self.peak_bytes = 0
        self.start_bytes = 0

    @property
    def delta_bytes(self) -> int:
        return max(0, self.peak_bytes - self.start_bytes)

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_bytes = torch.cuda.memory_allocated(self.device)
            return self
        rss = _rss_bytes()
        if rss is None:
            self.kind = "maxrss"
            return self
        self.start_bytes = self.peak_bytes = rss
        self._stop = threading.Event()

        def watch() -> None:
            while not self._stop.wait(self.interval):
                now = _rss_bytes() or 0
                if now > self.peak_bytes:
                    self.peak_bytes = now

        self._thread = threading.Thread(target=watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
        elif self.kind == "maxrss":
            import resource
            self.peak_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        else:
            self._stop.set()
            self._thread.join()
            self.peak_bytes = max(self.peak_bytes, _rss_bytes() or 0)

    def summary(self) -> Dict[str, Any]:
        return {"kind": self.kind, "peak_bytes": self.peak_bytes, "delta_bytes": self.delta_bytes,
                "peak_gib": self.peak_bytes / 2 ** 30}


# ------------------------------------------------------------------------------------------------
# FLOPs
# ------------------------------------------------------------------------------------------------

def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call of `fn` as torch's FlopCounterMode counts them (matmuls, convolutions,
    attention: 2 per multiply-add; elementwise work is not counted). Runs fn once."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return int(counter.get_total_flops())


# ------------------------------------------------------------------------------------------------
# Results
# ------------------------------------------------------------------------------------------------

def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def write_result(path: PathLike, doc: Dict[str, Any]) -> Path:
    """A benchmark result as indented JSON, written atomically."""
    import json

    from .atomic import atomic_write_bytes

    path = Path(path)
    if path.is_dir():
        raise UserError(f"--json {path} is a folder; give the .json file to write")
    atomic_write_bytes(path, (json.dumps(doc, indent=2, default=str) + "\n").encode())
    return path


# ------------------------------------------------------------------------------------------------
# fvar bench sample
# ------------------------------------------------------------------------------------------------

def bench_sample(var, tokenizer, settings, *, batch: int, steps: int, warmup: int = 1,
                 flops: bool = True) -> Dict[str, Any]:
    """Time `sampler.sample_batch` (transformer + sampling → f̂) and the VQ-VAE decode separately,
    `steps` batches after `warmup` untimed ones; peak memory over the timed batches; FLOPs per
    image counted once at batch 1 (FlopCounterMode). Models on their device, eval mode.

    Labels cycle through the classes and seeds are 0, 1, …: random-init weights give the same
    work per token as trained ones (no early exit anywhere), so presets can be timed untrained."""
    from .sampler import decode_images, sample_batch

    device = var.pos_1LC.device
    nc = var.num_classes

    def one(b: int, first_seed: int = 0):
        labels = torch.arange(first_seed, first_seed + b) % nc
        return sample_batch(var, tokenizer, labels, list(range(first_seed, first_seed + b)), settings, decode=False)

    for i in range(warmup):
        decode_images(tokenizer, one(batch, i * batch).f_hat)
    t_sample, t_decode = Timings(), Timings()
    with PeakMemory(device) as mem:
        for i in range(steps):
            with Timer(device) as t:
                res = one(batch, (warmup + i) * batch)
            t_sample.add(t.seconds)
            with Timer(device) as t:
                decode_images(tokenizer, res.f_hat)
            t_decode.add(t.seconds)
    totals = Timings([a + b for a, b in zip(t_sample.samples, t_decode.samples)])
    out: Dict[str, Any] = {
        "img_per_s": batch / totals.median,
        "img_per_s_no_decode": batch / t_sample.median,
        "decode_share": t_decode.median / totals.median,
        "batch_seconds": {"sample": t_sample.summary(), "decode": t_decode.summary(), "total": totals.summary()},
        "peak_memory": mem.summary(),
    }
    if flops:
        f_model = count_flops(lambda: one(1))
        res = one(1)
        f_dec = count_flops(lambda: decode_images(tokenizer, res.f_hat))
        out["gflop_per_img"] = {"transformer": f_model / 1e9, "decode": f_dec / 1e9,
                                "total": (f_model + f_dec) / 1e9}
        out["achieved_tflop_per_s"] = (f_model + f_dec) * batch / totals.median / 1e12
    return out
