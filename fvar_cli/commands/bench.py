"""`fvar bench train|sample`: measured speed, with the machine named."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from ..options import (CfgScalesOption, DecodePrecisionOption, DeviceOption, KVBudgetOption, PresetOption,
                       PruneOption, RefineFromOption, RefinerOption, SampleCompileOption, SetOption, resolve,
                       writable_file)

app = typer.Typer(help="Measure speed: images/s, peak memory, FLOPs, as JSON with the machine named.",
                  no_args_is_help=True)
JsonOption = typer.Option(None, "--json", help="Write the result as JSON here.", callback=writable_file)


def _write(json_out: Optional[Path], doc: dict) -> None:
    from fvar_core.pipelines.bench import write_result

    if json_out is not None:
        typer.echo(f"wrote {write_result(json_out, doc)}")


@app.command("train")
def train_cmd(
    preset: str = PresetOption,
    overrides: Optional[List[str]] = SetOption,
    distill: bool = typer.Option(False, "--distill", help="Time `fvar distill`'s step (teacher + student)."),
    batch: int = typer.Option(64, "--batch", "-b", min=1, help="Images per optimiser step."),
    steps: int = typer.Option(10, "--steps", min=1, help="Timed steps (after the warm-up)."),
    warmup: int = typer.Option(3, "--warmup", min=1, help="Untimed steps first (torch.compile compiles here)."),
    compile_: Optional[bool] = typer.Option(None, "--compile/--no-compile",
                                            help="Whole-model torch.compile (default: the preset's train.compile)."),
    precision: Optional[str] = typer.Option(None, "--precision", help="bf16, fp16 or fp32 on CUDA (default: the "
                                                                       "preset's); CPU runs fp32 unless train.cpu_bf16."),
    peak_tflops: Optional[float] = typer.Option(None, "--peak-tflops", min=0.001,
                                                help="Peak TFLOP/s for MFU (default: detected for known GPUs)."),
    flops: bool = typer.Option(True, "--flops/--no-flops", help="Count model FLOPs per image (one batch-1 step)."),
    device: str = DeviceOption,
    json_out: Optional[Path] = JsonOption,
) -> None:
    """Training throughput of the real loop on random tokens: img/s, step ms, peak memory, FLOPs, MFU."""
    from fvar_core.pipelines.bench import train_benchmark
    from fvar_core.devices import pick_device

    dev = pick_device(device)
    extra = ([f"train.compile={str(compile_).lower()}"] if compile_ is not None else []) + \
            ([f"train.precision={precision}"] if precision is not None else [])
    p = resolve(preset, overrides, *extra)
    typer.echo(f"training {p.name} ({'distill' if distill else 'train'}, depth {p.model.depth}, {p.seq_len} tokens) "
               f"on {dev}: batch {batch}, {warmup} warm-up + {steps} timed steps"
               + (", torch.compile" if p.train.compile_on(dev.type) else ""))
    doc = train_benchmark(p, device=dev, distill=distill, batch=batch, steps=steps, warmup=warmup, flops=flops,
                          peak_tflops=peak_tflops)
    if doc is None:  # another process of an `accelerate launch`: the main one reports
        return
    res, mem = doc["results"], doc["results"]["peak_memory"]
    mfu = res.get("mfu")
    typer.echo(f"{doc['machine']['device']}" + (f" ×{res['processes']} ({res['strategy']})" if res["processes"] > 1 else "")
               + f", {doc['settings']['precision']}: {res['img_per_s']:.2f} img/s, "
               f"{res['step_ms']:.1f} ms/step; peak memory {mem['peak_gib']:.2f} GiB ({mem['kind']})"
               + (f"; {res['tflop_per_img']:.4g} TFLOP/img, {res['achieved_tflop_per_s']:.3g} TFLOP/s"
                  if "tflop_per_img" in res else "")
               + (f", MFU {100 * mfu:.1f}% of {res['peak']['tflops']:g} TFLOP/s" if mfu is not None else
                  (", MFU: no peak known (pass --peak-tflops)" if "tflop_per_img" in res else "")))
    _write(json_out, doc)


@app.command("sample")
def sample_cmd(
    preset: Optional[str] = typer.Option(None, "--preset", "-p",
                                         help="Time this preset with random-init weights (no checkpoint needed)."),
    ckpt: Optional[Path] = typer.Option(None, "--ckpt", "-c", help="Or time a var checkpoint (with its tokenizer)."),
    overrides: Optional[List[str]] = SetOption,
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", "-t", help="Tokenizer for --ckpt."),
    batch: int = typer.Option(64, "--batch", "-b", min=1, help="Images per batch."),
    steps: int = typer.Option(5, "--steps", min=1, help="Timed batches (after one untimed warm-up)."),
    warmup: int = typer.Option(1, "--warmup", min=0, help="Untimed batches first."),
    cfg: Optional[float] = typer.Option(None, "--cfg", help="Guidance (default: the preset's); 0 halves the work."),
    top_k: Optional[int] = typer.Option(None, "--top-k", help="Top-k (default: the preset's)."),
    top_p: Optional[float] = typer.Option(None, "--top-p", help="Top-p (default: the preset's)."),
    compile_: Optional[str] = SampleCompileOption,
    cfg_scales: Optional[int] = CfgScalesOption,
    prune: Optional[str] = PruneOption,
    refiner: Optional[Path] = RefinerOption,
    refiner_depth: Optional[int] = typer.Option(None, "--refiner-depth", min=1,
                                                help="With --preset: a random-init refiner of this many blocks."),
    refine_from: Optional[int] = RefineFromOption,
    kv_budget: Optional[str] = KVBudgetOption,
    decode_precision: Optional[str] = DecodePrecisionOption,
    flops: bool = typer.Option(True, "--flops/--no-flops", help="Count FLOPs per image (one extra batch-1 run)."),
    device: str = DeviceOption,
    json_out: Optional[Path] = JsonOption,
) -> None:
    """Sampling throughput with and without the VQ-VAE decode, peak memory and FLOPs per image."""
    from fvar_core.pipelines.bench import sample_benchmark
    from fvar_core.devices import pick_device
    from fvar_core.errors import UserError

    if overrides and ckpt is not None:
        raise UserError("--set applies to --preset; a checkpoint's architecture is fixed")
    dev = pick_device(device)
    p = resolve(preset, overrides) if preset is not None else None
    from fvar_core.sample.speedups import speedup_overrides

    speedups = speedup_overrides(cfg_scales, prune, refine_from, kv_budget, decode_precision)
    doc = sample_benchmark(preset=p, ckpt=ckpt, tokenizer=tokenizer, device=dev, batch=batch, steps=steps,
                           warmup=warmup, flops=flops, cfg=cfg, top_k=top_k, top_p=top_p, compile=compile_,
                           speedups=speedups, refiner=refiner, refiner_depth=refiner_depth)
    res, mem, st = doc["results"], doc["results"]["peak_memory"], doc["settings"]
    typer.echo(f"sampling {doc['model']['preset']} ({doc['model']['resolution']}px, depth {doc['model']['depth']}) "
               f"on {doc['machine']['device']}: batch {batch}, {steps} timed batch(es), cfg {st['cfg']}, "
               f"top-k {st['top_k']}, top-p {st['top_p']}")
    typer.echo(f"{res['img_per_s']:.2f} img/s with decode, {res['img_per_s_no_decode']:.2f} img/s without "
               f"(decode {100 * res['decode_share']:.0f}% of the time); peak memory {mem['peak_gib']:.2f} GiB "
               f"({mem['kind']}), KV cache {res['kv_cache_mib']:.1f} MiB"
               + (f"; {res['gflop_per_img']['total']:.2f} GFLOP/img"
                                     if "gflop_per_img" in res else ""))
    _write(json_out, doc)


@app.command("tokenize")
def tokenize_cmd(
    preset: str = PresetOption,
    overrides: Optional[List[str]] = SetOption,
    batch: int = typer.Option(16, "--batch", "-b", min=1, help="Images per encode call."),
    steps: int = typer.Option(3, "--steps", min=1, help="Timed batches (after one untimed warm-up)."),
    precision: str = typer.Option("fp32", "--encode-precision", help="fp32, bf16 or tf32 (as `fvar tokenize`)."),
    encode_chunk: Optional[int] = typer.Option(None, "--encode-chunk", min=1,
                                               help="Encoder rows per call (default: from free memory)."),
    device: str = DeviceOption,
    json_out: Optional[Path] = JsonOption,
) -> None:
    """`fvar tokenize`'s encode on random images: img/s, encoder passes per image, peak memory."""
    from fvar_core.devices import pick_device
    from fvar_core.pipelines.bench import tokenize_benchmark

    dev = pick_device(device)
    p = resolve(preset, overrides)
    doc = tokenize_benchmark(p, device=dev, batch=batch, steps=steps, precision=precision, encode_chunk=encode_chunk)
    res, mem = doc["results"], doc["results"]["peak_memory"]
    typer.echo(f"tokenizing {p.name} ({p.resolution}px, ch {p.tokenizer.ch}, {p.pyramid.kernel} pyramid) on "
               f"{doc['machine']['device']}, {precision}: {res['img_per_s']:.2f} img/s, "
               f"{res['encoder_passes_per_image']} encoder passes per image; peak memory {mem['peak_gib']:.2f} GiB "
               f"({mem['kind']})")
    _write(json_out, doc)
