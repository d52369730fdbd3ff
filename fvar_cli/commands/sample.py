"""`fvar sample`: class-conditional images from a transformer checkpoint (docs/design.md §8)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..options import (CfgScalesOption, DecodePrecisionOption, DeviceOption, KVBudgetOption, PruneOption,
                       RefineFromOption, RefinerOption, SampleCompileOption, writable_file, writable_folder)


def sample(
    ckpt: Optional[Path] = typer.Option(
        None, "--ckpt", "-c", help="var checkpoint or run folder, a bundled model (fmnist-32, fmnist-32-var), a Hub "
                                   "name, or an official var_d*.pth with --tokenizer vae_ch160v4096z32.pth (default: "
                                   "the newest var checkpoint under $FVAR_RUNS or ./runs, else the bundled fmnist-32)."),
    classes: str = typer.Option(..., "--class", help="Class ids or names: 207, 1,207,388, a range 0-9, "
                                                    "sneaker,'ankle boot' (the model's class names), or 'uncond'."),
    n: int = typer.Option(8, "--n", "-n", min=1, help="Images per class."),
    cfg: Optional[float] = typer.Option(None, "--cfg", help="Guidance strength (default: the preset's, VAR 1.5)."),
    cfg_mode: Optional[str] = typer.Option(
        None, "--cfg-mode", help="var: (1+t)·cond − t·uncond, t ramping 0 → cfg over the scales; standard: "
                                 "uncond + w·(cond − uncond), w ramping 1 → cfg."),
    cfg_schedule: Optional[str] = typer.Option(None, "--cfg-schedule", help="linear (VAR's ramp) or constant."),
    top_k: Optional[int] = typer.Option(None, "--top-k", help="Keep the k most likely tokens (0 = off, 1 = greedy)."),
    top_p: Optional[float] = typer.Option(None, "--top-p", help="Nucleus mass to keep (0 = off)."),
    more_smooth: Optional[bool] = typer.Option(
        None, "--more-smooth/--no-more-smooth", help="VAR's gumbel-softmax code mixing (nicer pictures, not for FID)."),
    seed: int = typer.Option(0, "--seed", min=0, help="Image i gets seed + i; the same seed gives the same image "
                                                       "at any --batch (with --rng official: the batch's g_seed)."),
    rng: Optional[str] = typer.Option(
        None, "--rng", help="per-image (default: an image does not depend on its batch) or official (VAR's "
                            "autoregressive_infer_cfg stream: the official demo's images for the same seed, "
                            "classes and --batch)."),
    batch: Optional[int] = typer.Option(None, "--batch", "-b", min=1,
                                        help="Images per forward pass (default: the preset's sample.batch_size)."),
    compile_: Optional[str] = SampleCompileOption,
    cfg_scales: Optional[int] = CfgScalesOption,
    prune: Optional[str] = PruneOption,
    refiner: Optional[Path] = RefinerOption,
    refine_from: Optional[int] = RefineFromOption,
    kv_budget: Optional[str] = KVBudgetOption,
    decode_precision: Optional[str] = DecodePrecisionOption,
    tokenizer: Optional[Path] = typer.Option(
        None, "--tokenizer", "-t", help="Tokenizer checkpoint (default: the one stored with the checkpoint)."),
    out: Path = typer.Option(Path("samples"), "--out", "-o", help="Folder for the PNGs, grid.png and samples.json.",
                             callback=writable_folder),
    save_tokens: Optional[Path] = typer.Option(None, "--save-tokens",
                                               help="Also write per-scale tokens, labels and seeds (.npz).",
                                               callback=writable_file),
    device: str = DeviceOption,
) -> None:
    """Sample images of the given classes; defaults come from the checkpoint's preset (`sample:`)."""
    from fvar_core.sample.loading import attach_refiner, default_source, open_models
    from fvar_core.sample.outputs import progress_bar, sample_to_dir
    from fvar_core.sample.sampler import settings_from
    from fvar_core.sample.speedups import check_speedups, speedup_overrides

    if ckpt is None:
        ckpt = default_source(say=typer.echo)
    models = open_models(ckpt, tokenizer, device)
    settings = settings_from(models.preset.sample, cfg=cfg, cfg_mode=cfg_mode, cfg_schedule=cfg_schedule,
                             top_k=top_k, top_p=top_p, more_smooth=more_smooth, rng=rng, compile=compile_,
                             **speedup_overrides(cfg_scales, prune, refine_from, kv_budget, decode_precision))
    if refiner is not None:
        attach_refiner(models, refiner)
    check_speedups(settings, models.var, models.refiner)  # before any image is drawn
    ids = models.class_ids(classes)
    ident = models.identity["checkpoint"]
    step = f", step {ident['step']}" if ident.get("step") is not None else ""
    typer.echo(f"{len(ids) * n} images ({len(ids)} class(es) × {n}) from {ident['path']} ({ident['preset']}{step}) "
               f"on {models.device}; cfg {settings.cfg} ({settings.cfg_mode}), top-k {settings.top_k}, "
               f"top-p {settings.top_p}, seed {seed}")
    update, close = progress_bar(len(ids) * n)
    try:
        run = sample_to_dir(models, ids, n, seed, settings, out, batch_size=batch, tokens_file=save_tokens,
                            progress=lambda done, total: update(done))
    finally:
        close()
    typer.echo(f"wrote {len(run.files)} images, {run.grid.name} and {run.sidecar.name} to {run.out} "
               f"in {run.seconds:.1f}s ({len(run.files) / max(run.seconds, 1e-9):.1f} img/s)"
               + (f"; tokens → {run.tokens}" if run.tokens else ""))
