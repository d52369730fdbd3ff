"""`fvar eval`: FID / IS / KID / precision-recall of samples or a checkpoint, reference statistics
(`fvar eval ref build|list|show`), tokenizer reconstruction and folder alias figures (docs/design.md §9)."""
from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, List, Optional

import typer

from ..options import DeviceOption, writable_file, writable_folder

from fvar_core.envvars import FEATURE_WEIGHTS as ENV_WEIGHTS

app = typer.Typer(help="Evaluate samples or a checkpoint (FID, IS, KID, precision/recall); reference statistics.",
                  invoke_without_command=True)
ref_app = typer.Typer(help="Named reference statistics in the user cache ($FVAR_CACHE or ~/.cache/fvar).",
                      no_args_is_help=True)
app.add_typer(ref_app, name="ref")
classifier_app = typer.Typer(help="The offline feature network: a small CNN trained on a labelled image folder "
                                  "(class-conditional accuracy; FID/KID/P-R in its feature space).",
                             no_args_is_help=True)
app.add_typer(classifier_app, name="classifier")

WeightsOpt = typer.Option(
    None, "--feature-weights", envvar=ENV_WEIGHTS, show_envvar=True,
    help="Local InceptionV3 weights (torch-fidelity's weights-inception-2015-12-05-6726825d.pth); "
         "default: torch-fidelity's download, cached by torch hub.")
BatchOpt = typer.Option(64, "--batch", "-b", min=1, help="Images per Inception batch.")


@contextmanager
def _progress() -> Iterator:
    """A rich progress display on stderr; yields progress(stage, done, total).

    Started at the first update, not on entry: with --ckpt the sampler shows its own bar first,
    and two live displays at once would garble the terminal."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
        TimeRemainingColumn

    tasks: dict = {}
    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TimeRemainingColumn(), console=Console(stderr=True), transient=True)

    def update(stage: str, done: int, total: int) -> None:
        if not tasks:
            bar.start()
        if stage not in tasks:
            tasks[stage] = bar.add_task(stage, total=total)
        bar.update(tasks[stage], completed=done, total=total)
    try:
        yield update
    finally:
        if tasks:
            bar.stop()


def _extractor(weights: Optional[Path], device: str):
    from fvar_core.devices import pick_device
    from fvar_core.eval.features import load_extractor

    ex = load_extractor(weights, pick_device(device))
    w = ex.weights
    if not w.official:
        typer.echo(f"note: feature weights {w.path} (sha256 {w.sha256[:12]}…) are not torch-fidelity's "
                   f"InceptionV3: numbers are not comparable with published ones", err=True)
    return ex


def _slug(ref: str) -> str:
    p = Path(ref)
    return p.stem if p.suffix == ".npz" else (p.name or "ref")


def _fmt(v: Optional[float], digits: int = 4) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def _print_report(report: dict, json_path: Optional[Path]) -> None:
    from rich.console import Console
    from rich.table import Table

    m = report["metrics"]
    table = Table(title=f"fvar eval · {report['samples']['count']} samples of {report['samples']['path']}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    if "fid" in m:
        table.add_row("FID", f"{m['fid']:.4f}")
    if "isc" in m:
        table.add_row("IS", f"{m['isc']['mean']:.3f} ± {m['isc']['std']:.3f}")
    if "kid" in m:
        table.add_row("KID", f"{m['kid']['mean']:.6f} ± {m['kid']['std']:.6f}")
    if "precision" in m:
        table.add_row("precision", f"{m['precision']:.4f}")
        table.add_row("recall", f"{m['recall']:.4f}")
    Console().print(table)
    w = report["protocol"]["extractor"]["weights"]
    if report["reference"] is not None:
        typer.echo(f"reference: {report['reference']['identity']}; FID statistics "
                   f"{report['reference']['fid_statistics']}")
    typer.echo(f"Inception weights: {w['path']} (sha256 {w['sha256'][:12]}…"
               f"{', torch-fidelity' if w['official'] else ''})")
    if json_path is not None:
        typer.echo(f"wrote {json_path}")


@app.callback(invoke_without_command=True)
def evaluate(
    ctx: typer.Context,
    samples: Optional[Path] = typer.Option(None, "--samples", help="Folder of generated images (one size)."),
    ckpt: Optional[Path] = typer.Option(
        None, "--ckpt", "-c", help="var checkpoint or run folder to sample from (without --samples and --ckpt: the "
                                   "newest var checkpoint under $FVAR_RUNS or ./runs)."),
    ref: str = typer.Option("imagenet-stats", "--ref", "-r",
                            help="Reference: a name built with `fvar eval ref build`, an image folder, or an ADM .npz."),
    metrics: str = typer.Option("fid,isc,kid,prc", "--metrics", "-m", help="Comma-separated: fid, isc, kid, prc."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Report file (default: eval-REF.json in the samples "
                                                                 "folder; reconstruction: none).",
                                            callback=writable_file),
    num_samples: Optional[int] = typer.Option(
        None, "--num-samples", "-n", min=1, help="With --ckpt: images to generate (default: 50,000; with "
                                                 "--feature-net: per-class × the model's classes)."),
    per_class: Optional[int] = typer.Option(
        None, "--per-class", min=1, help="With --ckpt: images per class (default 50 as VAR; 100 with --feature-net)."),
    seed: int = typer.Option(0, "--seed", min=0, help="With --ckpt: image i has seed SEED + i."),
    cfg: Optional[float] = typer.Option(None, "--cfg", help="With --ckpt: guidance (preset's sample.cfg)."),
    top_k: Optional[int] = typer.Option(None, "--top-k", help="With --ckpt: top-k (0 = off)."),
    top_p: Optional[float] = typer.Option(None, "--top-p", help="With --ckpt: top-p (0 = off)."),
    more_smooth: Optional[bool] = typer.Option(None, "--more-smooth/--no-more-smooth", help="With --ckpt: VAR's "
                                                                                             "gumbel smoothing."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="With --ckpt: sample folder, resumed (default: "
                                                                 "RUNS/eval/RUN-CHECKPOINT-nN-sSEED).",
                                       callback=writable_folder),
    sample_batch: int = typer.Option(32, "--sample-batch", min=1, help="With --ckpt: images per sampling batch."),
    tokenizer: Optional[Path] = typer.Option(
        None, "--tokenizer", "-t", help="With --data: tokenizer to measure; with --ckpt: the tokenizer to decode with."),
    data: Optional[Path] = typer.Option(None, "--data", "-d", help="With --tokenizer: image folder to reconstruct."),
    max_images: Optional[int] = typer.Option(None, "--max-images", min=1, help="With --data: at most this many "
                                                                               "(a fixed-seed subset)."),
    feature_weights: Optional[Path] = WeightsOpt,
    device: str = DeviceOption,
    batch: int = BatchOpt,
    kid_subsets: int = typer.Option(100, "--kid-subsets", min=1, help="KID: number of subsets."),
    kid_subset_size: int = typer.Option(1000, "--kid-subset-size", min=2, help="KID: subset size (capped at the "
                                                                               "set sizes)."),
    feature_net: Optional[Path] = typer.Option(
        None, "--feature-net", help="A classifier from `fvar eval classifier train`, or `fmnist` (bundled, for "
                                    "Fashion-MNIST): class-conditional accuracy and FID/KID/P-R in its feature space, "
                                    "offline (--ref: a labelled image folder)."),
    real: Optional[Path] = typer.Option(None, "--real", help="With --feature-net: a real split (e.g. train) for the "
                                                             "floor row, as many images per class as the samples."),
    calibration_images: int = typer.Option(1000, "--calibration-images", min=2,
                                           help="With --feature-net: reference images the tokenizer reconstructs."),
) -> None:
    """Evaluate a samples folder (--samples), a checkpoint (--ckpt; generates N per class first,
    resumable), or a tokenizer's reconstructions (--tokenizer CKPT --data DIR).

    Writes a JSON report with every number and the protocol (extractor, weights sha256, counts,
    resize, reference, seeds). Subcommands: `ref build|list|show`, `alias`.
    """
    if ctx.invoked_subcommand is not None:
        return
    from fvar_core.eval.evaluate import (check_inputs, evaluate_checkpoint, evaluate_samples, parse_metrics,
                                         plan_eval, write_report)
    from fvar_core.interrupt import on_interrupt

    plan = plan_eval(samples=samples, ckpt=ckpt, tokenizer=tokenizer, data=data, feature_net=feature_net, real=real)
    ckpt = plan.ckpt
    if plan.newest:
        typer.echo(f"using the newest var checkpoint: {ckpt}", err=True)
    if plan.mode == "feature-net":
        _feature_eval(feature_net, ref, samples, ckpt, per_class or 100, num_samples, seed,
                      {"cfg": cfg, "top_k": top_k, "top_p": top_p, "more_smooth": more_smooth}, out, real, tokenizer,
                      calibration_images, device, sample_batch, kid_subsets, kid_subset_size, json_out)
        return
    if plan.mode == "reconstruction":
        check_inputs((), ref, tokenizer=tokenizer, data=data)
        _reconstruction(tokenizer, data, feature_weights, device, max_images, json_out)
        return
    num_samples = 50_000 if num_samples is None else num_samples
    per_class = 50 if per_class is None else per_class
    chosen = parse_metrics(metrics)
    fileset = check_inputs(chosen, ref, samples=samples, ckpt=ckpt)
    ex = _extractor(feature_weights, device)
    with _progress() as progress, on_interrupt(lambda: "during the evaluation (generated samples are kept)"):
        if samples is not None:
            report = evaluate_samples(samples, ref, ex, chosen, fileset=fileset, batch_size=batch,
                                      kid_subsets=kid_subsets, kid_subset_size=kid_subset_size, progress=progress)
            folder = samples
        else:
            report = evaluate_checkpoint(
                ckpt, ref, ex, chosen, num_samples=num_samples, per_class=per_class, seed=seed,
                settings_overrides={"cfg": cfg, "top_k": top_k, "top_p": top_p, "more_smooth": more_smooth},
                out=out, tokenizer=tokenizer, device=str(ex.device), sample_batch_size=sample_batch,
                batch_size=batch, kid_subsets=kid_subsets, kid_subset_size=kid_subset_size, progress=progress)
            folder = Path(report["samples"]["path"])
            g = report["protocol"]["generation"]
            typer.echo(f"samples: {g['out']} ({g['generated']} generated, {g['resumed_with']} already there) "
                       f"from {g['checkpoint']['path']}", err=True)
    path = write_report(report, json_out or folder / f"eval-{_slug(ref)}.json")
    _print_report(report, path)


def _feature_eval(feature_net: Path, ref: str, samples: Optional[Path], ckpt: Optional[Path], per_class: int,
                  num_samples: Optional[int], seed: int, overrides: dict, out: Optional[Path], real: Optional[Path],
                  tokenizer: Optional[Path], calibration_images: int, device: str, sample_batch: int,
                  kid_subsets: int, kid_subset_size: int, json_out: Optional[Path]) -> None:
    from fvar_core.eval.evaluate import write_report
    from fvar_core.eval.feature_metrics import feature_evaluation, format_table

    report = feature_evaluation(feature_net, ref, samples=samples, ckpt=ckpt, per_class=per_class,
                                num_samples=num_samples, seed=seed, settings_overrides=overrides, out=out, real=real,
                                tokenizer=tokenizer, calibration_images=calibration_images, device=device,
                                sample_batch_size=sample_batch, kid_subsets=kid_subsets,
                                kid_subset_size=kid_subset_size)
    typer.echo(format_table(report))
    folder = Path(report["rows"][0]["source"]) if samples is not None or ckpt is not None else None
    path = json_out or (folder / "eval-feature-net.json" if folder is not None and folder.is_dir() else None)
    if path is not None:
        typer.echo(f"wrote {write_report(report, path)}")


@classifier_app.command("train")
def classifier_train(
    data: Path = typer.Option(..., "--data", "-d", help="Labelled image folder (one sub-folder per class)."),
    out: Path = typer.Option(..., "--out", "-o", help="Checkpoint folder to write (kind classifier).",
                             callback=writable_folder),
    val: Optional[Path] = typer.Option(None, "--val", help="Labelled folder with the same classes: accuracy reported "
                                                           "and stored with the weights."),
    epochs: float = typer.Option(3.0, "--epochs", min=0.01, help="Passes over --data."),
    resolution: int = typer.Option(32, "--resolution", min=8, max=512, help="Images are resized to this side."),
    batch: int = typer.Option(128, "--batch", "-b", min=1, help="Images per step."),
    seed: int = typer.Option(0, "--seed", min=0, help="Seed of the initialisation, order and augmentation."),
    device: str = DeviceOption,
) -> None:
    """Train the feature network of offline evaluation (minutes on a CPU for 32 px data)."""
    from fvar_core.eval.classifier import classifier_config, train_classifier

    cfg = classifier_config(epochs=epochs, resolution=resolution, batch_size=batch, seed=seed)
    res = train_classifier(data, out, cfg, val=val, device=device, say=typer.echo)
    acc = f", accuracy on {val}: {100 * res.val_accuracy:.2f}%" if res.val_accuracy is not None else ""
    typer.echo(f"classifier → {res.path} ({res.images} images, {res.seconds:.0f} s{acc})")


def _reconstruction(tokenizer: Path, data: Path, weights: Optional[Path], device: str,
                    max_images: Optional[int], json_out: Optional[Path]) -> None:
    from rich.console import Console
    from rich.table import Table

    from fvar_core.devices import pick_device
    from fvar_core.errors import UserError
    from fvar_core.eval.evaluate import tokenizer_reconstruction, write_report

    dev = pick_device(device)
    try:
        ex, note = _extractor(weights, device), ""
    except UserError as e:
        if weights is not None:  # asked for these weights: their failure is an error, never skipped
            raise
        ex, note = None, str(e)
        typer.echo(f"note: rFID skipped: {e}", err=True)
    with _progress() as progress:
        report = tokenizer_reconstruction(tokenizer, data, ex, rfid_note=note, max_images=max_images,
                                          device=dev, progress=progress)
    m = report["metrics"]
    table = Table(title=f"tokenizer reconstruction · {report['data']['count']} images · {report['tokenizer']['path']}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("PSNR (dB)", _fmt(m["psnr"], 3))
    table.add_row("SSIM", _fmt(m["ssim"]))
    table.add_row("rFID", _fmt(m["rfid"]))
    if json_out is not None:
        table.caption = f"JSON {write_report(report, json_out)}"
    Console().print(table)


@app.command("alias")
def alias(
    folder: Path = typer.Argument(..., help="Image folder (flat or class sub-folders)."),
    preset: str = typer.Option("d16-256", "--preset", "-p", help="Preset whose pyramid and resolution to use."),
    overrides: Optional[List[str]] = typer.Option(None, "--set", "-s", metavar="KEY.PATH=VALUE",
                                                  help="Override one preset field (repeatable)."),
    max_images: Optional[int] = typer.Option(None, "--max-images", min=1, help="At most this many images."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the report here.",
                                            callback=writable_file),
) -> None:
    """`fvar pyramid analyze` over a folder: alias leakage and passband per scale, mean over images."""
    from fvar_core.eval.evaluate import alias_folder, write_report

    from .pyramid import print_alias_table
    from fvar_core.presets import load_preset

    cfg = load_preset(preset, overrides or [])
    with _progress() as progress:
        report = alias_folder(folder, cfg, max_images=max_images, progress=progress)
    print_alias_table(f"alias analysis · mean over {report['count']} images of {folder} · {cfg.name} · "
                      f"{cfg.pyramid.kernel}/{cfg.pyramid.schedule}", report["scales"])
    if json_out is not None:
        typer.echo(f"wrote {write_report(report, json_out)}")


# ------------------------------------------------------------------------------------ ref ...
@ref_app.command("build")
def ref_build(
    data: Path = typer.Option(..., "--data", "-d", help="Image folder (ImageFolder layout or flat)."),
    name: str = typer.Option(..., "--name", help="Reference name, e.g. imagenet-stats."),
    res: int = typer.Option(256, "--res", min=8, help="Resolution R of the centre crops (= the samples')."),
    crop: str = typer.Option("adm", "--crop", help="adm (ADM reference batches' crop) or var (VAR's eval transform)."),
    max_features: int = typer.Option(10_000, "--max-features", min=4,
                                     help="Pool features kept for KID and precision/recall (ADM: 10,000)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing reference of that name."),
    feature_weights: Optional[Path] = WeightsOpt,
    device: str = DeviceOption,
    batch: int = BatchOpt,
) -> None:
    """Compute a named reference once: Inception mean/covariance of every image and a feature set."""
    from fvar_core.eval.refstats import build_reference, check_name, refs_dir

    check_name(name)
    ex = _extractor(feature_weights, device)
    with _progress() as progress:
        meta = build_reference(data, name, res, ex, crop=crop, max_features=max_features, batch_size=batch,
                               overwrite=overwrite, progress=lambda d, n: progress("reference features", d, n),
                               check_progress=lambda d, n: progress("checking files", d, n))
    src = meta["source"]
    if src["skipped"]:
        typer.echo(f"skipped {src['skipped']} unreadable file(s), e.g. {src['skipped_examples'][0]}", err=True)
    typer.echo(f"built reference '{name}' in {refs_dir() / name}: {meta['count']} images at {res}px "
               f"({crop} crop), {meta['features_count']} features kept")


@ref_app.command("list")
def ref_list() -> None:
    """Every named reference in the cache."""
    from rich.console import Console
    from rich.table import Table

    from fvar_core.eval.refstats import list_references, refs_dir

    refs = list_references()
    if not refs:
        typer.echo(f"no references in {refs_dir()}; build one with `fvar eval ref build --data DIR --name NAME`")
        return
    table = Table(title=f"references in {refs_dir()}", caption="`fvar eval ref show NAME` for the source and more")
    table.add_column("name", no_wrap=True)
    for col in ("res", "images", "features", "crop", "weights sha256"):
        table.add_column(col, justify="right" if col in ("res", "images", "features") else "left")
    for m in refs:
        w = m.get("extractor", {}).get("weights", {})
        table.add_row(m["name"], str(m["resolution"]), str(m["count"]), str(m["features_count"]),
                      m["preprocessing"]["crop"], (w.get("sha256") or "?")[:12])
    Console().print(table)


@ref_app.command("show")
def ref_show(name: str = typer.Argument(..., help="Reference name.")) -> None:
    """A reference's description (ref.json): source, preprocessing, counts, extractor and weights hash."""
    from fvar_core.eval.refstats import read_meta

    typer.echo(json.dumps(read_meta(name), indent=2))
