"""`fvar bench`: measured speed, with the machine named (sample now; train to follow)."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from ..options import SetOption

app = typer.Typer(help="Measure speed: images/s, peak memory, FLOPs, as JSON with the machine named.",
                  no_args_is_help=True)


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
    cfg: Optional[float] = typer.Option(None, "--cfg", help="Guidance [default: the preset's]; 0 halves the work."),
    top_k: Optional[int] = typer.Option(None, "--top-k", help="Top-k [default: the preset's]."),
    top_p: Optional[float] = typer.Option(None, "--top-p", help="Top-p [default: the preset's]."),
    flops: bool = typer.Option(True, "--flops/--no-flops", help="Count FLOPs per image (one extra batch-1 run)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N or mps."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the result as JSON here."),
) -> None:
    """Sampling throughput with and without the VQ-VAE decode, peak memory and FLOPs per image."""
    import torch

    from fvar_core.bench import bench_sample, machine, utc_now, write_result
    from fvar_core.devices import pick_device
    from fvar_core.errors import UserError
    from fvar_core.sampler import load_models, settings_from

    if (preset is None) == (ckpt is None):
        raise UserError("give exactly one of --preset NAME (random-init weights) or --ckpt CKPT")
    if overrides and ckpt is not None:
        raise UserError("--set applies to --preset; a checkpoint's architecture is fixed")
    dev = pick_device(device)
    if preset is not None:
        from fvar_cli.options import resolve
        from fvar_core.tokenizer import Tokenizer
        from fvar_core.transformer import VAR

        p = resolve(preset, overrides)
        torch.manual_seed(0)
        var = VAR.from_config(p.model, p.patch_nums, p.tokenizer.vocab_size, p.tokenizer.z_channels).to(dev).eval()
        tok = Tokenizer.from_config(p.tokenizer, p.patch_nums).to(dev).eval()
        source = {"source": "preset (random-init weights)", "preset": p.name}
    else:
        models = load_models(ckpt, tokenizer, dev)
        var, tok, p = models.var, models.tokenizer, models.preset
        source = {"source": "checkpoint", "preset": p.name, "checkpoint": models.identity["checkpoint"]}
    settings = settings_from(p.sample, cfg=cfg, top_k=top_k, top_p=top_p)
    info = machine(dev)
    typer.echo(f"sampling {p.name} ({p.resolution}px, depth {p.model.depth}) on {info['device']}: batch {batch}, "
               f"{steps} timed batch(es), cfg {settings.cfg}, top-k {settings.top_k}, top-p {settings.top_p}")
    res = bench_sample(var, tok, settings, batch=batch, steps=steps, warmup=warmup, flops=flops)
    params = sum(x.numel() for x in var.parameters())
    doc = {"benchmark": "sample", "created": utc_now(), "machine": info,
           "model": {**source, "params": params, "depth": p.model.depth, "width": p.model.width,
                     "resolution": p.resolution, "seq_len": p.seq_len, "patch_nums": list(p.patch_nums)},
           "settings": {**settings.model_dump(mode="json", exclude={"batch_size"}), "batch": batch, "steps": steps, "warmup": warmup,
                        "precision": "bf16 autocast" if dev.type == "cuda" else "fp32"},
           "results": res}
    mem = res["peak_memory"]
    typer.echo(f"{res['img_per_s']:.2f} img/s with decode, {res['img_per_s_no_decode']:.2f} img/s without "
               f"(decode {100 * res['decode_share']:.0f}% of the time); peak memory {mem['peak_gib']:.2f} GiB "
               f"({mem['kind']})" + (f"; {res['gflop_per_img']['total']:.2f} GFLOP/img"
                                     if "gflop_per_img" in res else ""))
    if json_out is not None:
        typer.echo(f"wrote {write_result(json_out, doc)}")
