"""`fvar experiment ablation|alias-audit`: the paper's ablation at small scale, and the alias path's audit."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from ..options import DeviceOption, SetOption, writable_file, writable_folder

app = typer.Typer(help="Measure the paper's claims: the ablation table (Table 3 at small scale) and the alias "
                       "path's audit.", no_args_is_help=True)


def _seeds(text: str) -> List[int]:
    """'3' → seeds 0, 1, 2; '0,4,7' → those seeds."""
    try:
        if "," not in text:
            n = int(text)
            if n < 1:
                raise ValueError
            return list(range(n))
        seeds = [int(s) for s in text.split(",") if s.strip()]
        if not seeds or min(seeds) < 0:
            raise ValueError
        return seeds
    except ValueError:
        raise typer.BadParameter(f"{text!r}: a count (3 = seeds 0, 1, 2) or a comma-separated list of seeds "
                                 f"≥ 0") from None


@app.command()
def ablation(
    out: Path = typer.Option(Path("runs/ablation"), "--out", "-o", help="Experiment folder (a rerun resumes).",
                             callback=writable_folder),
    seeds: str = typer.Option("3", "--seeds", help="Seeds per row: a count (3 = 0, 1, 2) or a list '0,1,5'."),
    rows: str = typer.Option("var,fvar-no-teacher,fvar-gaussian,fvar,fvar-shared", "--rows",
                             help="Comma-separated rows: var, fvar-no-teacher, fvar-gaussian, fvar, fvar-shared "
                                  "(the paper's), fvar-focus-grad (the alias audit's)."),
    size: str = typer.Option("cpu", "--size", help="cpu (fmnist-32, ~80 min on 2 cores) or gpu (fmnist-32-gpu, "
                                                   "20× the steps and 10× the samples)."),
    data: Optional[Path] = typer.Option(None, "--data", help="A folder with train/ and test/ labelled image folders "
                                                             "(default: Fashion-MNIST, exported into OUT/data)."),
    source: Optional[Path] = typer.Option(None, "--source", help="Folder with Fashion-MNIST's four *-ubyte.gz files."),
    download: bool = typer.Option(False, "--download", help="Download Fashion-MNIST when no local copy exists."),
    data_per_class: Optional[int] = typer.Option(None, "--data-per-class", min=1,
                                                 help="Export only the first N Fashion-MNIST images per class."),
    preset: Optional[str] = typer.Option(None, "--preset", "-p", help="Base preset (default: the size's)."),
    tokenizer_steps: Optional[int] = typer.Option(None, "--tokenizer-steps", min=1, help="Tokenizer steps per cell."),
    steps: Optional[int] = typer.Option(None, "--steps", min=1, help="Transformer steps per cell."),
    train_per_class: Optional[int] = typer.Option(None, "--train-per-class", min=1,
                                                  help="Train images per class tokenized for the transformer."),
    test_per_class: Optional[int] = typer.Option(None, "--test-per-class", min=1,
                                                 help="Test images per class for the student's held-out CE."),
    samples_per_class: Optional[int] = typer.Option(None, "--samples-per-class", min=2,
                                                    help="Samples per class scored in feature space."),
    classifier_epochs: Optional[float] = typer.Option(None, "--classifier-epochs", min=0.01,
                                                      help="Epochs of the evaluation classifier."),
    overrides: Optional[List[str]] = SetOption,
    device: str = DeviceOption,
) -> None:
    """Train and score every row at the same budget for each seed; write results.json, table.md and
    ablation.png into OUT (mean ± std over seeds)."""
    from dataclasses import replace

    from fvar_core.errors import UserError
    from fvar_core.pipelines.experiment import BUDGETS, format_table, run_ablation

    if size not in BUDGETS:
        raise UserError(f"unknown --size {size!r}: choose {' or '.join(BUDGETS)}")
    given = dict(preset=preset, tokenizer_steps=tokenizer_steps, steps=steps, train_per_class=train_per_class,
                 test_per_class=test_per_class, samples_per_class=samples_per_class,
                 classifier_epochs=classifier_epochs)
    budget = replace(BUDGETS[size], **{k: v for k, v in given.items() if v is not None})
    seed_list = _seeds(seeds)
    summary = run_ablation(out, rows=[r.strip() for r in rows.split(",") if r.strip()], seeds=seed_list,
                           budget=budget, base_overrides=overrides or [], data=data, source=source, download=download,
                           data_per_class=data_per_class, device=device, say=typer.echo)
    typer.echo("")
    typer.echo(format_table(summary))
    typer.echo(f"\nresults: {out / 'results.json'} · table: {out / 'table.md'} · plot: {out / 'ablation.png'} · "
               f"samples: {out / f'samples-seed{seed_list[0]}.png'}")


@app.command("alias-audit")
def alias_audit(
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="Tokenizer checkpoint (or its run)."),
    data: Optional[Path] = typer.Option(None, "--data", help="Labelled image folder to encode (e.g. the test split)."),
    max_images: int = typer.Option(1000, "--max-images", min=2, help="At most this many images (spread over "
                                                                      "classes)."),
    run: Optional[Path] = typer.Option(None, "--run", help="A distillation run (saved with its teacher) for the "
                                                           "teacher-student CE gap."),
    tokens: Optional[Path] = typer.Option(None, "--tokens", help="Held-out token shards (with alias tokens) for --run."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the whole audit as JSON here.",
                                            callback=writable_file),
    overrides: Optional[List[str]] = SetOption,
    device: str = DeviceOption,
) -> None:
    """Per scale: alias residual energy relative to the structure residual, share of it the alias
    codebook codes, codebook perplexity and dead codes; with --run, the teacher's CE with the true
    and with shuffled alias tokens beside the student's."""
    from fvar_core.pipelines.alias_audit import cross_entropy_report, tokenizer_audit
    from fvar_core.errors import UserError

    if tokenizer is None and run is None:
        raise UserError("nothing to audit: give --tokenizer CKPT --data DIR and/or --run RUN --tokens SHARDS")
    if (tokenizer is None) != (data is None):
        raise UserError("--tokenizer and --data go together")
    if (run is None) != (tokens is None):
        raise UserError("--run and --tokens go together")
    report = {}
    if tokenizer is not None:
        from fvar_core.eval.classifier import labelled_folder
        from fvar_core.checkpoints import read_checkpoint_config
        from fvar_core.runs import resolve_checkpoint

        _, cfg = read_checkpoint_config(resolve_checkpoint(tokenizer, "--tokenizer"))
        if not data.is_dir():
            raise UserError(f"--data {data}: no such folder")
        from fvar_core.data.folders import scan_image_folder

        n_cls = max(1, len(scan_image_folder(data).classes))
        images, _, _, _ = labelled_folder(data, int(cfg["preset"]["resolution"]), per_class=max(1, max_images // n_cls))
        tok = report["tokenizer"] = tokenizer_audit(tokenizer, images, overrides=overrides or [], device=device)
        typer.echo(f"tokenizer {tok['tokenizer']} ({tok['preset']}, {tok['pyramid']['kernel']} PSF, noise "
                   f"{'on' if tok['pyramid']['noise'] else 'off'}, focus_grad {tok['focus_grad']}) on "
                   f"{tok['images']} images of {data}")
        def f(v, fmt: str, width: int) -> str:
            return format(v, fmt).rjust(width) if v is not None else "–".rjust(width)

        typer.echo("scale  side    ρ px  structure ms  alias ms   alias/structure  image (D−L)/L  rank corr  "
                   "alias coded  alias ppl  structure ppl")
        for s in tok["scales"]:
            typer.echo(f"{s['scale']:>5}  {s['tokens']:>4}  {s['rho']:>6.2f}  {s['structure_ms']:>12.3e}  "
                       f"{f(s.get('alias_ms'), '.2e', 9)}  {f(s.get('alias_to_structure'), '.2e', 15)}  "
                       f"{f(s.get('image_alias_to_view'), '.2e', 13)}  {f(s.get('carrier_rank_corr'), '.2f', 9)}  "
                       f"{f(s.get('alias_coded'), '.2f', 11)}  {f(s.get('alias_perplexity'), '.1f', 9)}  "
                       f"{s['structure_perplexity']:>13.1f}")
        if tok["alias_codes"]:
            a = tok["alias_codes"]
            typer.echo(f"alias codebook: perplexity {a['perplexity']:.1f} of {a['size']}, {a['dead']} dead codes")
        s = tok["structure_codes"]
        typer.echo(f"structure codebook: perplexity {s['perplexity']:.1f} of {s['size']}, {s['dead']} dead codes")
    if run is not None:
        ce = report["cross_entropy"] = cross_entropy_report(run, tokens, device=device)
        typer.echo(f"cross-entropy (nats/token) on {ce['images']} images of {tokens}, per scale:")
        for name in ("student", "teacher", "teacher_shuffled"):
            if name in ce:
                typer.echo(f"  {name:<17} {ce[name]['mean']:.4f}   "
                           + " ".join(f"{v:.3f}" for v in ce[name]["per_scale"]))
    if json_out is not None:
        from fvar_core.eval.evaluate import write_report

        write_report(report, json_out)
        typer.echo(f"wrote {json_out}")
