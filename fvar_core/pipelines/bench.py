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

from fvar_core.errors import UserError
from fvar_core.atomic import atomic_write_bytes
from fvar_core.models.tokenizer import Tokenizer
from fvar_core.models.transformer import VAR
from fvar_core.sample.loading import attach_refiner, load_models
from fvar_core.sample.sampler import decode_images, sample_batch, settings_from
from fvar_core.train.loop import fit, to_device
from fvar_core.train.transformer import VARTask

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
    process lifetime peak, so only an upper bound). Once fvar has decoded on the CPU, glibc keeps
    freed memory (`cpualloc`): `peak_bytes` is still the process's peak, but `delta_bytes` counts
    only growth beyond the memory the process already holds."""

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


class TensorMemory:
    """Live and peak bytes of the tensor storages created inside a `with` block, on any device.

    An exact account where the CPU has no allocator statistics: every op's outputs are seen through a
    TorchDispatchMode (the backward pass's too) and a storage counts from its creation until it is
    freed. Storages that existed before the block (weights, optimiser state) are not counted; views
    share their base's storage and count once."""

    def __init__(self) -> None:
        self.live = self.peak = 0

    def __enter__(self) -> "TensorMemory":
        import weakref

        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten
        from torch.utils.weak import WeakIdKeyDictionary

        acct, seen = self, WeakIdKeyDictionary()

        def free(n: int) -> None:
            acct.live -= n

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in tree_flatten(out)[0]:
                    if isinstance(t, torch.Tensor) and t.device.type != "meta":
                        st = t.untyped_storage()
                        if st not in seen:
                            seen[st] = n = st.nbytes()
                            weakref.finalize(st, free, n)
                            acct.live += n
                            acct.peak = max(acct.peak, acct.live)
                return out

        self._mode = _Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)


# ------------------------------------------------------------------------------------------------
# FLOPs
# ------------------------------------------------------------------------------------------------

def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call of `fn` as torch's FlopCounterMode counts them (matmuls, convolutions,
    attention — dense, whatever the mask: 2 per multiply-add; elementwise work is not counted).
    Runs fn once."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

    # torch registers formulas for the CUDA attention kernels only; CPU's fused SDPA is the same
    # arithmetic, so count it the same way (otherwise CPU counts miss all attention FLOPs).
    aten = torch.ops.aten
    cpu_sdpa = {aten._scaled_dot_product_flash_attention_for_cpu:
                lambda q, k, v, *a, out_shape=None, **kw: sdpa_flop_count(q, k, v),
                aten._scaled_dot_product_flash_attention_for_cpu_backward:
                lambda g, q, k, v, *a, out_shape=None, **kw: sdpa_backward_flop_count(g, q, k, v)}
    counter = FlopCounterMode(display=False, custom_mapping=cpu_sdpa)
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

    path = Path(path)
    if path.is_dir():
        raise UserError(f"--json {path} is a folder; give the .json file to write")
    atomic_write_bytes(path, (json.dumps(doc, indent=2, default=str) + "\n").encode())
    return path


# ------------------------------------------------------------------------------------------------
# fvar bench sample
# ------------------------------------------------------------------------------------------------

def bench_sample(var, tokenizer, settings, *, batch: int, steps: int, warmup: int = 1,
                 flops: bool = True, refiner=None) -> Dict[str, Any]:
    """Time `sampler.sample_batch` (transformer + sampling → f̂) and the VQ-VAE decode separately,
    `steps` batches after `warmup` untimed ones; peak memory over the timed batches; FLOPs per
    image counted once at batch 1 (FlopCounterMode). Models on their device, eval mode. The speed-ups
    in `settings` (and `refiner`, for draft and refine) apply; kv_cache_mib is what a batch allocates.

    Labels cycle through the classes and seeds are 0, 1, …: random-init weights give the same
    work per token as trained ones (no early exit anywhere), so presets can be timed untrained."""
    device = var.pos_1LC.device
    nc = var.num_classes

    def one(b: int, first_seed: int = 0, s=settings):
        labels = torch.arange(first_seed, first_seed + b) % nc
        return sample_batch(var, tokenizer, labels, list(range(first_seed, first_seed + b)), s, decode=False,
                            refiner=refiner)

    def decode(f_hat):
        return decode_images(tokenizer, f_hat, settings.decode_precision)

    for i in range(warmup):
        decode(one(batch, i * batch).f_hat)
    t_sample, t_decode = Timings(), Timings()
    with PeakMemory(device) as mem:
        for i in range(steps):
            with Timer(device) as t:
                res = one(batch, (warmup + i) * batch)
            t_sample.add(t.seconds)
            with Timer(device) as t:
                decode(res.f_hat)
            t_decode.add(t.seconds)
    totals = Timings([a + b for a, b in zip(t_sample.samples, t_decode.samples)])
    out: Dict[str, Any] = {
        "img_per_s": batch / totals.median,
        "img_per_s_no_decode": batch / t_sample.median,
        "decode_share": t_decode.median / totals.median,
        "batch_seconds": {"sample": t_sample.summary(), "decode": t_decode.summary(), "total": totals.summary()},
        "peak_memory": mem.summary(),
        "kv_cache_mib": res.kv_bytes / 2 ** 20,
    }
    if flops:
        eager = settings.model_copy(update={"compile": "off"})  # FlopCounterMode sees eager ops only
        f_model = count_flops(lambda: one(1, s=eager))
        res = one(1, s=eager)
        f_dec = count_flops(lambda: decode(res.f_hat))
        out["gflop_per_img"] = {"transformer": f_model / 1e9, "decode": f_dec / 1e9,
                                "total": (f_model + f_dec) / 1e9}
        out["achieved_tflop_per_s"] = (f_model + f_dec) * batch / totals.median / 1e12
    return out


# ------------------------------------------------------------------------------------------------
# fvar bench train
# ------------------------------------------------------------------------------------------------

# Dense bf16 tensor-core peaks (TFLOP/s, vendor data sheets, no sparsity) for MFU when --peak-tflops
# is not given. Matched against torch.cuda.get_device_name, first hit wins (H200 before H100 …).
PEAK_BF16_TFLOPS = (("H200", 989.0), ("H100", 989.0), ("H800", 989.0), ("GH200", 989.0), ("B200", 2250.0),
                    ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("L40", 181.0), ("A6000", 155.0),
                    ("RTX 4090", 165.0), ("A10", 125.0), ("L4", 121.0), ("V100", 125.0))


def detect_peak_tflops(device: torch.device) -> Optional[Dict[str, Any]]:
    """{'tflops', 'source'} for a GPU named in PEAK_BF16_TFLOPS, else None (CPU, unknown GPU)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in name:
            return {"tflops": tflops, "source": f"data sheet, dense bf16, matched '{key}' in '{name}'"}
    return None


class RandomTokens(torch.utils.data.Dataset):
    """n items shaped like token shards (structure (L,), alias (L,) or (0,), label), uniformly
    random and a function of (seed, i): a training step's work does not depend on token values."""

    def __init__(self, n: int, seq_len: int, vocab: int, alias_vocab: int, num_classes: int, seed: int = 0):
        self.n, self.L, self.V, self.Va, self.nc, self.seed = n, seq_len, vocab, alias_vocab, num_classes, seed

    def __len__(self) -> int:
        return self.n

    def set_epoch(self, epoch: int) -> None:
        """Items do not depend on the epoch; having this keeps the loop off its slow path (seeding
        the global RNGs around every item, `train.loop.EpochItems`)."""

    def __getitem__(self, i: int):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        structure = torch.randint(self.V, (self.L,), generator=g)
        alias = torch.randint(self.Va, (self.L,), generator=g) if self.Va else torch.zeros(0, dtype=torch.long)
        return structure, alias, int(torch.randint(self.nc, (1,), generator=g))


def bench_train(preset, *, distill: bool = False, batch: int = 64, steps: int = 10, warmup: int = 3,
                device: Optional[str] = None, peak_tflops: Optional[float] = None,
                flops: bool = True) -> Dict[str, Any]:
    """Time the real training loop (`train.loop.fit` with `VARTask`: autocast, backward, clipping,
    fused AdamW, the preset's compile / activation-checkpointing switches) on random tokens,
    no checkpoints written. `warmup` untimed steps (compilation happens there), then `steps` timed
    ones, each timed by the loop itself (it reads the loss back every step, so step times are real).

    Returns img/s and step ms (medians over the timed steps), peak memory over the run, model
    FLOPs per image (forward + backward, counted once at batch 1 by FlopCounterMode), achieved
    TFLOP/s and MFU against `peak_tflops` (given, or detected for known GPUs; None on CPU).

    Under `accelerate launch` (several processes: DDP, or FSDP with train.strategy=fsdp) the
    batch is the global one, the main process returns the figures (its own peak memory, per GPU)
    and the others None; FLOPs are not counted there (the process group is gone after the run)."""
    import json
    import os
    import shutil
    import tempfile

    from rich.console import Console

    p = preset
    train = p.train.model_copy(update={"steps": warmup + steps, "batch_size": batch, "log_every": 1,
                                       "sample_every": 0, "grad_accum": 1})
    p = p.model_copy(update={"train": train})
    torch.manual_seed(0)
    tok = Tokenizer(p.tokenizer, p.patch_nums)
    data = RandomTokens(batch * (warmup + steps), p.seq_len, p.tokenizer.vocab_size,
                        p.tokenizer.alias_tokens if distill else 0, p.model.num_classes)
    task = VARTask(p, tok, distill=distill, source="tokens")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:  # one run folder for every process of the launch (torchrun's run id and port name it)
        tmp = Path(tempfile.gettempdir()) / (f"fvar-bench-{os.environ.get('TORCHELASTIC_RUN_ID', 'run')}-"
                                             f"{os.environ.get('MASTER_PORT', '0')}")
    else:
        tmp = Path(tempfile.mkdtemp(prefix="fvar-bench-"))
    try:
        with PeakMemory(dev) as mem:
            res = fit(task, data, tmp / "run", device=str(dev), console=Console(quiet=True, force_terminal=False),
                      num_workers=0, checkpoints=False)
        if not res.main_process:
            return None
        lines = [json.loads(x) for x in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]
    finally:
        if world == 1 or int(os.environ.get("RANK", "0")) == 0:
            shutil.rmtree(tmp, ignore_errors=True)
    timed = Timings([batch / line["img_per_s"] for line in lines[warmup:]])
    out: Dict[str, Any] = {
        "img_per_s": batch / timed.median,
        "step_ms": 1e3 * timed.median,
        "step_seconds": timed.summary(),
        "warmup_seconds": sum(batch / line["img_per_s"] for line in lines[:warmup]),
        "peak_memory": mem.summary(),
        "final_loss": lines[-1]["loss"],
        "processes": world,
        "strategy": p.train.strategy if world > 1 else None,
    }
    if flops and world == 1:
        f_img = count_train_flops(task, data[0], dev)
        out["tflop_per_img"] = f_img / 1e12
        out["achieved_tflop_per_s"] = f_img * out["img_per_s"] / 1e12
        peak = {"tflops": peak_tflops, "source": "--peak-tflops"} if peak_tflops else detect_peak_tflops(dev)
        out["peak"] = peak
        out["mfu"] = out["achieved_tflop_per_s"] / peak["tflops"] if peak else None
    return out


def count_train_flops(task, item, device: torch.device) -> int:
    """Model FLOPs of one training step's forward + backward for one item (B = 1), fp32, counted
    on the task's (already trained-on) model without torch.compile (FlopCounterMode: matmuls,
    convolutions, attention)."""
    compiled, task.run = task.run, task.model
    try:
        task.model.train()
        batch = to_device(tuple(torch.as_tensor(x).unsqueeze(0) for x in item), device)

        def step() -> None:
            loss, _ = task.step(batch, 0)
            loss.backward()

        return count_flops(step)
    finally:
        task.run = compiled



# ------------------------------------------------------------------------------------------------
# Result documents (what `fvar bench … --json` writes)
# ------------------------------------------------------------------------------------------------

def sample_benchmark(*, preset=None, ckpt: Optional[PathLike] = None, tokenizer: Optional[PathLike] = None,
                     device: torch.device, batch: int, steps: int, warmup: int, flops: bool,
                     cfg: Optional[float] = None, top_k: Optional[int] = None,
                     top_p: Optional[float] = None, compile: Optional[str] = None,
                     speedups: Optional[Dict[str, Any]] = None, refiner: Optional[PathLike] = None,
                     refiner_depth: Optional[int] = None) -> Dict[str, Any]:
    """`fvar bench sample`: a preset with random-init weights (no checkpoint needed) or a var
    checkpoint with its tokenizer; the result document (machine, model, settings, results).
    speedups: SampleConfig fields (cfg_scales, prune, refine_from, kv_budget, decode_precision);
    the refiner is a checkpoint over the same tokenizer, or (with a preset) a random-init model
    of `refiner_depth` blocks at the preset's width."""
    if (preset is None) == (ckpt is None):
        raise UserError("give exactly one of --preset NAME (random-init weights) or --ckpt CKPT")
    if preset is not None:
        p = preset
        torch.manual_seed(0)
        var = VAR(p.model, p.patch_nums, p.tokenizer.vocab_size, p.tokenizer.z_channels).to(device).eval()
        tok = Tokenizer(p.tokenizer, p.patch_nums).to(device).eval()
        source: Dict[str, Any] = {"source": "preset (random-init weights)", "preset": p.name}
    else:
        models = load_models(ckpt, tokenizer, device)
        var, tok, p = models.var, models.tokenizer, models.preset
        source = {"source": "checkpoint", "preset": p.name, "checkpoint": models.identity["checkpoint"]}
    settings = settings_from(p.sample, cfg=cfg, top_k=top_k, top_p=top_p, compile=compile, **(speedups or {}))
    ref = None
    if refiner is not None:
        if preset is not None:
            raise UserError("--refiner is a checkpoint: with --preset use --refiner-depth")
        ref = attach_refiner(models, refiner).refiner
    elif refiner_depth is not None:
        if preset is None:
            raise UserError("--refiner-depth builds a random-init refiner for --preset: with --ckpt give --refiner")
        rp = p.model.model_copy(update={"depth": refiner_depth})
        torch.manual_seed(1)
        ref = VAR(rp, p.patch_nums, p.tokenizer.vocab_size, p.tokenizer.z_channels).to(device).eval()
    res = bench_sample(var, tok, settings, batch=batch, steps=steps, warmup=warmup, flops=flops, refiner=ref)
    if ref is not None:
        source["refiner"] = {"depth": ref.depth, "width": ref.width, "params": sum(x.numel() for x in ref.parameters())}
    return {"benchmark": "sample", "created": utc_now(), "machine": machine(device),
            "model": {**source, "params": sum(x.numel() for x in var.parameters()), "depth": p.model.depth,
                      "width": p.model.width, "resolution": p.resolution, "seq_len": p.seq_len,
                      "patch_nums": list(p.patch_nums)},
            "settings": {**settings.model_dump(mode="json", exclude={"batch_size"}), "batch": batch, "steps": steps,
                         "warmup": warmup, "precision": "bf16 autocast" if device.type == "cuda" else "fp32"},
            "results": res}


def train_benchmark(preset, *, device: torch.device, distill: bool, batch: int, steps: int, warmup: int,
                    flops: bool, peak_tflops: Optional[float] = None) -> Dict[str, Any]:
    """`fvar bench train`: `bench_train` wrapped in the result document."""
    p = preset
    res = bench_train(p, distill=distill, batch=batch, steps=steps, warmup=warmup, device=str(device),
                      peak_tflops=peak_tflops, flops=flops)
    if res is None:  # not the main process of a launch
        return None
    return {"benchmark": "train", "created": utc_now(), "machine": machine(device),
            "model": {"preset": p.name, "mode": "distill" if distill else "train", "depth": p.model.depth,
                      "width": p.model.width, "resolution": p.resolution, "seq_len": p.seq_len},
            "settings": {"batch": batch, "steps": steps, "warmup": warmup,
                         "precision": p.train.precision if device.type == "cuda" else
                         ("bf16 autocast" if p.train.cpu_bf16 else "fp32"),
                         "compile": p.train.compile_on(device.type),
                         "activation_checkpointing": p.train.checkpointing_on(device.type)},
            "results": res}


# ------------------------------------------------------------------------------------------------
# fvar bench tokenize
# ------------------------------------------------------------------------------------------------

def tokenize_benchmark(preset, *, device: torch.device, batch: int, steps: int, warmup: int = 1,
                       precision: str = "fp32", encode_chunk: Optional[int] = None) -> Dict[str, Any]:
    """`fvar bench tokenize`: the no-grad focus encode `fvar tokenize` runs per batch
    (`Tokenizer.encode_with_pyramid`: every distinct focus view through the encoder, chunked, then
    both codebooks) on random images with random-init weights; img/s, encoder passes per image and
    peak memory. Data loading is not timed."""
    from fvar_core.focus.pyramid import focus_images
    from fvar_core.models.tokenizer import ENCODE_PRECISIONS

    if precision not in ENCODE_PRECISIONS:
        raise UserError(f"--encode-precision {precision!r}: choose {', '.join(ENCODE_PRECISIONS)}")
    p = preset
    torch.manual_seed(0)
    tok = Tokenizer(p.tokenizer, p.patch_nums).to(device).eval()
    tok.encode_chunk, tok.encode_precision = encode_chunk, precision
    g = torch.Generator().manual_seed(0)
    imgs = [(torch.rand(batch, 3, p.resolution, p.resolution, generator=g) * 2 - 1).to(device)
            for _ in range(warmup + steps)]
    times = Timings()
    with torch.no_grad():
        for x in imgs[:warmup]:
            tok.encode_with_pyramid(x, p.pyramid, p.resolution)
        with PeakMemory(device) as mem:
            for x in imgs[warmup:]:
                with Timer(device) as t:
                    tok.encode_with_pyramid(x, p.pyramid, p.resolution)
                times.add(t.seconds)
    passes = len({id(v) for v in focus_images(imgs[0][:1], p.pyramid, p.patch_nums, p.resolution)}) \
        if p.pyramid.space == "pixel" else 1  # distinct views = encoder rows per image
    return {"benchmark": "tokenize", "created": utc_now(), "machine": machine(device),
            "model": {"preset": p.name, "resolution": p.resolution, "ch": p.tokenizer.ch,
                      "vocab": p.tokenizer.vocab_size, "alias_vocab": p.tokenizer.alias_tokens,
                      "pyramid": p.pyramid.kernel},
            "settings": {"batch": batch, "steps": steps, "warmup": warmup, "precision": precision,
                         "encode_chunk": encode_chunk},
            "results": {"img_per_s": batch / times.median, "batch_seconds": times.summary(),
                        "encoder_passes_per_image": passes, "peak_memory": mem.summary()}}
