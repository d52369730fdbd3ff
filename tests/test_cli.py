"""The `fvar` command line: plugin discovery, help, presets commands, one-line errors."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from fvar_cli.app import GROUP, build_app, discover, run

BUILTIN = {"presets", "pyramid"}


def test_builtin_commands_register_through_the_entry_point_group():
    names = {ep.name for ep in discover()}
    assert BUILTIN <= names
    assert all(ep.group == GROUP for ep in discover())


def test_a_second_distribution_adds_a_command_by_entry_point(tmp_path, monkeypatch, capsys):
    # An installed-looking distribution on sys.path: metadata + entry_points.txt + its module.
    # This is exactly what `pip install some-plugin` leaves behind; nothing is installed for real.
    dist = tmp_path / "fvar_hello_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: fvar-hello-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[{GROUP}]\nhello = fvar_hello_plugin:hello\n")
    (tmp_path / "fvar_hello_plugin.py").write_text(textwrap.dedent('''
        import typer
        def hello(name: str = typer.Option("world", help="Who to greet.")):
            """Say hello (a test-only plugin)."""
            print(f"hello {name} from a plugin")
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "hello" in {ep.name for ep in discover()}
    app = build_app()
    assert run(app, ["hello", "--name", "fvar"]) == 0
    assert "hello fvar from a plugin" in capsys.readouterr().out
    assert run(build_app(), ["--help"]) == 0
    out = capsys.readouterr().out
    assert "hello" in out and "presets" in out


def test_help_lists_subcommands_with_one_line_help(cli):
    r = cli("--help")
    assert r.code == 0
    for name in BUILTIN:
        assert name in r.out
    assert "focus pyramid" in r.out


def test_presets_list_shows_every_preset(cli):
    from fvar_core.presets import list_presets
    r = cli("presets", "list")
    assert r.code == 0
    for name in list_presets():
        assert name in r.out


def test_presets_show_prints_resolved_yaml_with_overrides(cli):
    import yaml
    r = cli("presets", "show", "d16-256", "--set", "train.lr=3e-4")
    assert r.code == 0
    doc = yaml.safe_load(r.out)
    assert doc["name"] == "d16-256" and doc["train"]["lr"] == 3e-4 and doc["model"]["width"] == 1024


def test_unknown_preset_is_one_line_exit_2(cli):
    r = cli("presets", "show", "d99-256")
    assert r.code == 2
    assert r.err.count("\n") == 1 and "unknown preset 'd99-256'" in r.err and "d16-256" in r.err
    assert "Traceback" not in r.err


def test_malformed_set_is_one_line_exit_2(cli):
    r = cli("presets", "show", "tiny-64", "--set", "train.lr")
    assert r.code == 2 and r.err.count("\n") == 1 and "malformed --set" in r.err


def test_console_script_runs_in_a_fresh_process():
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    p = subprocess.run([sys.executable, "-m", "fvar_cli.app", "presets", "show", "nope"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 2
    assert p.stderr.strip().startswith("fvar: error: unknown preset 'nope'")
    assert p.stderr.count("\n") == 1


def test_no_help_text_is_eaten_as_rich_markup():
    """Typer renders help through rich markup, where `[anything]` is a style tag and vanishes
    ("Total optimiser steps ." instead of "… (preset's train.steps)."): none in our help strings."""
    import re

    import click
    import typer

    markup = re.compile(r"\[[a-zA-Z$/.][^\]]*\]")

    def walk(cmd, path):
        for p in cmd.params:
            assert not markup.search(getattr(p, "help", None) or ""), (path, p.name, p.help)
        assert not markup.search(cmd.help or ""), (path, cmd.help)
        if isinstance(cmd, click.Group):
            for name, sub in cmd.commands.items():
                walk(sub, f"{path} {name}")

    walk(typer.main.get_command(build_app()), "fvar")


def test_version_env_and_completion(cli):
    import json

    from fvar_core import __version__

    r = cli("--version")
    assert r.code == 0 and r.out.strip() == f"fvar {__version__}"
    r = cli("env")
    assert r.code == 0 and "torch" in r.out and "accelerate" in r.out and "torch-fidelity" in r.out and "cuda" in r.out
    doc = json.loads(cli("env", "--json").out)
    import torch

    assert doc["packages"]["torch"] == torch.__version__.split("+")[0] or doc["packages"]["torch"] == torch.__version__
    assert doc["cuda"]["available"] == torch.cuda.is_available() and doc["cpu_count"] >= 1
    assert "--install-completion" in cli("--help").out  # Typer's shell completion
    assert cli("env", "--yaml").code == 2


def test_checkpoints_record_where_and_how_they_were_made(tmp_path, monkeypatch):
    import torch

    from fvar_core.checkpoints import load_checkpoint, save_checkpoint
    from fvar_core.environment import git_commit
    from fvar_core.presets import load_preset

    monkeypatch.setattr(sys, "argv", ["fvar", "train", "--preset", "tiny-64"])
    d = save_checkpoint(tmp_path / "c", kind="var", preset=load_preset("tiny-64"), state_dict={"w": torch.ones(1)})
    env = load_checkpoint(d).provenance["environment"]
    assert env["torch"] == torch.__version__ and env["cuda"] == torch.version.cuda
    assert env["command"] == ["fvar", "train", "--preset", "tiny-64"]
    assert env["git_commit"] == git_commit()  # this checkout's commit when run from one
    if (Path(__file__).resolve().parent.parent / ".git").exists():
        assert env["git_commit"] and len(env["git_commit"].split("+")[0]) == 40
