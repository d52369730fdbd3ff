"""Options shared by every command that takes a preset (one definition, many commands)."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from fvar_core.config import Preset
from fvar_core.presets import load_preset

PresetOption = typer.Option(
    "d16-256", "--preset", "-p", help="Preset name (see `fvar presets list`) or a YAML file.")
AllowDataChangeOption = typer.Option(
    False, "--allow-data-change",
    help="Resume a run on other data than it was trained on (refused without; the change is logged).")
SetOption = typer.Option(
    None, "--set", "-s", metavar="KEY.PATH=VALUE",
    help="Override one preset field, e.g. --set train.lr=2e-4 (repeatable).")


def resolve(preset: str, overrides: Optional[List[str]], *extra: str) -> Preset:
    """The validated preset with `--set` overrides, then command-flag overrides, applied."""
    return load_preset(preset, [*(overrides or []), *extra])


def _writable(folder: bool):
    def check(ctx: typer.Context, param: typer.CallbackParam, value: Optional[Path]) -> Optional[Path]:
        if value is not None and not ctx.resilient_parsing:
            from fvar_core.atomic import check_writable

            check_writable(value, param.opts[0], folder=folder)
        return value
    return check


def _device(ctx: typer.Context, param: typer.CallbackParam, value: Optional[str]) -> Optional[str]:
    if value is None or ctx.resilient_parsing:
        return value
    from fvar_core.devices import pick_device

    return str(pick_device(value))  # a device that is not there: one line, exit 2, before any work


LogWithOption = typer.Option(
    None, "--log-with", help="Experiment tracker: tensorboard (events in RUN/tensorboard), wandb or all; "
                             "metrics.jsonl is written either way.")

DeviceOption = typer.Option(
    "auto", "--device", callback=_device,
    help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps; several GPUs: `accelerate launch`.")


# Option callbacks for output paths: a path that cannot be written is refused while the command line
# is parsed — one line, exit 2 — before any work (and before anything is created).
writable_file = _writable(folder=False)
writable_folder = _writable(folder=True)

# `fvar sample` and `fvar bench sample`: compile the per-scale step (SampleConfig.compile).
SampleCompileOption = typer.Option(
    None, "--compile", help="off, default or reduce-overhead: torch.compile each scale's transformer step "
                            "(one graph per scale; reduce-overhead adds CUDA graphs). Default: the preset's.")

# Training-free speed-ups (docs/sampling-speed.md): all off unless given.
CfgScalesOption = typer.Option(None, "--cfg-scales", min=0,
                               help="Guide only the first N scales, then drop the unconditional half (0 = all).")
PruneOption = typer.Option(None, "--prune", help="Token pruning: PATCH:RATIO,... — at those scales only the tokens "
                                                 "farthest from the scale's mean input run (e.g. 13:0.5,16:0.7).")
RefinerOption = typer.Option(None, "--refiner", help="Draft and refine: a second var checkpoint over the same "
                                                     "tokenizer that samples from --refine-from on.")
RefineFromOption = typer.Option(None, "--refine-from", min=0, help="The scale index the refiner takes over at.")
KVBudgetOption = typer.Option(None, "--kv-budget", help="FIRST,RECENT: each scale attends only to the first and "
                                                        "the most recent scales (a smaller KV cache).")
DecodePrecisionOption = typer.Option(None, "--decode-precision",
                                     help="auto (bf16 on CUDA, fp32 elsewhere), fp32, or bf16 (faster, not exact).")
