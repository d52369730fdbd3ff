"""`fvar inpaint`: zero-shot in- and out-painting with a transformer checkpoint (docs/design.md §8)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..options import DeviceOption, writable_folder


def inpaint(
    image: Path = typer.Option(..., "--image", "-i", help="The image to edit."),
    ckpt: Optional[Path] = typer.Option(
        None, "--ckpt", "-c", help="var checkpoint or run folder, a bundled model (fmnist-32), or an official "
                                   "var_d*.pth with --tokenizer (default: the newest under $FVAR_RUNS or ./runs, "
                                   "else the bundled fmnist-32)."),
    box: Optional[str] = typer.Option(
        None, "--box", help="Region to generate, x0,y0,x1,y1 in the image's pixels (x1, y1 exclusive) or as "
                            "fractions (0.1,0.1,0.8,0.8)."),
    mask: Optional[Path] = typer.Option(
        None, "--mask", help="Black/white PNG of the image's size: white = generate, black = keep."),
    outpaint: bool = typer.Option(False, "--outpaint", help="Keep the image, centred, and generate around it."),
    canvas: Optional[str] = typer.Option(
        None, "--canvas", help="Outpainting canvas WxH; must be the preset's resolution (default: that)."),
    fit: Optional[float] = typer.Option(
        None, "--fit", help="Outpainting: resize the image so its longer side is this fraction of the canvas "
                            "(e.g. 0.75) before centring it (default: its own size)."),
    class_: Optional[str] = typer.Option(None, "--class", help="Class id or name to edit towards (default: unconditional)."),
    seed: int = typer.Option(0, "--seed", min=0, help="Seed of the sampled tokens."),
    cfg: Optional[float] = typer.Option(None, "--cfg", help="Guidance strength (default: the preset's)."),
    cfg_mode: Optional[str] = typer.Option(None, "--cfg-mode", help="var or standard (see fvar sample)."),
    top_k: Optional[int] = typer.Option(None, "--top-k", help="Top-k (0 = off) (default: the preset's)."),
    top_p: Optional[float] = typer.Option(None, "--top-p", help="Top-p (0 = off) (default: the preset's)."),
    more_smooth: Optional[bool] = typer.Option(None, "--more-smooth/--no-more-smooth",
                                               help="VAR's gumbel-softmax code mixing."),
    tokenizer: Optional[Path] = typer.Option(
        None, "--tokenizer", "-t", help="Tokenizer checkpoint (default: the one stored with the checkpoint)."),
    out: Path = typer.Option(Path("edit"), "--out", "-o", help="Folder for compare.png, result.png, edit.json.",
                             callback=writable_folder),
    device: str = DeviceOption,
) -> None:
    """Regenerate a region of an image (inpainting) or extend it to the full canvas (outpainting),
    keeping the image's own tokens everywhere else at every scale."""
    from fvar_core.errors import UserError
    from fvar_core.sample.inpaint import check_edit_request, edit_to_dir
    from fvar_core.sample.loading import default_source, open_models
    from fvar_core.sample.sampler import settings_from

    check_edit_request(box=box, mask=mask, outpaint=outpaint, canvas=canvas, fit=fit)
    if ckpt is None:
        ckpt = default_source(say=typer.echo)
    models = open_models(ckpt, tokenizer, device)
    label = None
    if class_ is not None:
        ids = models.class_ids(class_)
        if len(ids) != 1:
            raise UserError(f"--class {class_}: inpainting takes one class")
        label = ids[0]
    settings = settings_from(models.preset.sample, cfg=cfg, cfg_mode=cfg_mode, top_k=top_k, top_p=top_p,
                             more_smooth=more_smooth)
    run = edit_to_dir(models, image, out, box=box, mask=mask, outpaint=outpaint, canvas=canvas, fit=fit, label=label,
                      seed=seed, settings=settings)
    typer.echo(f"{run.mode}: generated {run.generated_tokens} of {run.total_tokens} tokens at the last scale; "
               f"wrote {run.compare.name}, {run.result.name} and {run.sidecar.name} to {run.compare.parent}")
