"""`fvar env`: the versions and devices of this installation, to paste into a bug report."""
from __future__ import annotations

import json

import typer


def env(as_json: bool = typer.Option(False, "--json", help="Print JSON instead of lines.")) -> None:
    """fvar, torch, CUDA, accelerate, torch-fidelity … versions, and the devices this machine has."""
    from fvar_core.environment import environment

    e = environment()
    if as_json:
        typer.echo(json.dumps(e, indent=2))
        return
    for name, v in e["packages"].items():
        typer.echo(f"{name:16} {v or 'not installed'}")
    typer.echo(f"{'git commit':16} {e['git_commit'] or '– (not a git checkout)'}")
    typer.echo(f"{'python':16} {e['python']} on {e['platform']}")
    typer.echo(f"{'cpu':16} {e['cpu_count']} cores, torch uses {e['torch_threads']} threads")
    c = e["cuda"]
    devices = ", ".join(c["devices"]) if c["devices"] else "none visible"
    typer.echo(f"{'cuda':16} built with {c['built_with'] or '–'}, available {c['available']}: {devices}")
    typer.echo(f"{'mps':16} {'available' if e['mps'] else 'not available'}")


app = env
