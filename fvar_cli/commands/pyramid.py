"""`fvar pyramid visualize|analyze`: look at and measure the focus pyramid of an image."""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from ..options import PresetOption, SetOption, resolve, writable_file

app = typer.Typer(help="Visualize and measure the focus pyramid (D_k area, L_k focus, A_k alias).",
                  no_args_is_help=True)

ImageArg = typer.Argument(
    "chart", help="Image file, or a built-in test image: 'chart' (text/resolution chart) or 'zone-plate'.")
KernelOpt = typer.Option(None, "--kernel", "-k", help="PSF: disk, gaussian, box or area (preset's by default).")
ScheduleOpt = typer.Option(None, "--schedule", help="Radius schedule: cosine, matched or linear.")
RhoOpt = typer.Option(None, "--rho-max", help="Largest PSF radius in pixels.")


def _pyramid_overrides(kernel: Optional[str], schedule: Optional[str], rho_max: Optional[float]) -> list[str]:
    out = []
    if kernel is not None:
        out.append(f"pyramid.kernel={kernel}")
    if schedule is not None:
        out.append(f"pyramid.schedule={schedule}")
    if rho_max is not None:
        out.append(f"pyramid.rho_max={rho_max}")
    return out


@app.command()
def visualize(
    image: str = ImageArg,
    preset: str = PresetOption,
    kernel: Optional[str] = KernelOpt,
    schedule: Optional[str] = ScheduleOpt,
    rho_max: Optional[float] = RhoOpt,
    noise: bool = typer.Option(False, "--noise/--no-noise", help="Add the preset's beta_k noise to L_k."),
    seed: int = typer.Option(0, help="Seed of the noise."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="PNG to write (default: pyramid-IMAGE.png).",
                                         callback=writable_file),
    overrides: Optional[List[str]] = SetOption,
) -> None:
    """One figure: rows D_k (area), L_k (focus), A_k (alias, amplified), one column per scale."""
    import torch  # imported here so `fvar --help` stays fast

    from fvar_core.focus.figure import pyramid_figure
    from fvar_core.data.images import load_or_builtin, save_png
    from fvar_core.focus.pyramid import focus_views

    cfg = resolve(preset, overrides, *_pyramid_overrides(kernel, schedule, rho_max), f"pyramid.noise={noise}")
    x, name = load_or_builtin(image, cfg.resolution)
    views = focus_views(x[None], cfg.pyramid, cfg.patch_nums, cfg.resolution,
                        generator=torch.Generator().manual_seed(seed))
    title = (f"{name} · {cfg.name} · {cfg.pyramid.kernel} PSF, {cfg.pyramid.schedule} schedule, "
             f"ρmax {cfg.pyramid.rho_max:g}px")
    fig = pyramid_figure(views, title=title)
    out = out or Path(f"pyramid-{Path(image).stem}.png")
    save_png(fig, out)
    typer.echo(f"wrote {out} ({fig.width}×{fig.height})")


@app.command()
def analyze(
    image: str = ImageArg,
    preset: str = PresetOption,
    kernel: Optional[str] = KernelOpt,
    schedule: Optional[str] = ScheduleOpt,
    rho_max: Optional[float] = RhoOpt,
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    overrides: Optional[List[str]] = SetOption,
) -> None:
    """Per scale: alias leakage (dB) and passband energy kept, for area vs focus views. IMAGE may
    be a folder: then the figures are means over its images (as `fvar eval alias`)."""
    from fvar_core.focus.alias import alias_report
    from fvar_core.data.images import load_or_builtin

    cfg = resolve(preset, overrides, *_pyramid_overrides(kernel, schedule, rho_max))
    if Path(image).is_dir():
        from fvar_core.eval.evaluate import alias_folder

        report = alias_folder(image, cfg)
        name, scales = f"mean over {report['count']} images of {image}", report["scales"]
        doc = report
    else:
        x, name = load_or_builtin(image, cfg.resolution)
        scales = [r.to_dict() for r in alias_report(x, cfg.pyramid, cfg.patch_nums, cfg.resolution)]
        doc = {"image": name, "preset": cfg.name, "resolution": cfg.resolution,
               "pyramid": cfg.pyramid.model_dump(mode="json"), "scales": scales}
    if as_json:
        typer.echo(json.dumps(doc, indent=2, default=str))
        return
    print_alias_table(f"alias analysis · {name} · {cfg.name} · {cfg.pyramid.kernel}/{cfg.pyramid.schedule}", scales)


def print_alias_table(title: str, scales: List[dict]) -> None:
    """The per-scale alias table of `pyramid analyze` and `eval alias` (rows: AliasRow.to_dict())."""
    table = Table(title=title, caption="leak: energy above the scale's Nyquist that survives down-sampling, relative "
                                       "to the input's (dB, lower is better); kept: passband energy retained")
    for col in ("k", "size", "ρ px", "leak area", "leak focus", "Δ dB", "kept area", "kept focus"):
        table.add_column(col, justify="right")
    fmt = lambda v, n=1: "—" if v is None else f"{v:.{n}f}"  # noqa: E731
    for d in scales:
        la, lf = d["leak_db_area"], d["leak_db_focus"]
        delta = d["margin_db"] if "margin_db" in d else (None if la is None or lf is None else la - lf)
        table.add_row(str(d["scale"]), str(d["size"]), f"{d['rho']:.2f}", fmt(la), fmt(lf), fmt(delta),
                      fmt(d["passband_area"], 3),
                      fmt(d["passband_focus"], 3))
    Console().print(table)
