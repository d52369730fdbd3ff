"""The `fvar` entry point: builds the Typer app from the `fvar.commands` entry-point group.

Built-in commands register in that group too (pyproject.toml), so a third-party package adds
`fvar mycommand` by declaring an entry point `mycommand = "its_module:app"` in the same group.
An entry point may name a `typer.Typer` (a command group) or a plain function (one command).
"""
from __future__ import annotations

import os
import shlex
import sys
import warnings
from importlib.metadata import EntryPoint, entry_points
from typing import Iterable, Optional

import typer

from fvar_core.errors import FvarWarning, UserError

GROUP = "fvar.commands"


def discover(group: str = GROUP) -> list[EntryPoint]:
    """The installed command entry points, sorted by name (first registration of a name wins)."""
    seen: dict[str, EntryPoint] = {}
    for ep in sorted(entry_points(group=group), key=lambda e: e.name):
        seen.setdefault(ep.name, ep)
    return list(seen.values())


def _version(value: bool) -> None:
    if value:
        from fvar_core import __version__

        typer.echo(f"fvar {__version__}")
        raise typer.Exit()


def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print fvar's version and exit.")) -> None:
    """FVAR: visual autoregressive modelling via next-focus prediction (VAR-compatible)."""


def build_app(eps: Optional[Iterable[EntryPoint]] = None) -> typer.Typer:
    """A fresh Typer app with one subcommand per entry point (and Typer's shell completion:
    `fvar --install-completion`)."""
    app = typer.Typer(
        name="fvar",
        help="FVAR: visual autoregressive modelling via next-focus prediction (VAR-compatible).",
        no_args_is_help=True,
        pretty_exceptions_enable=False,
        context_settings={"help_option_names": ["-h", "--help"]},
    )
    app.callback()(_root)
    for ep in discover() if eps is None else eps:
        try:
            obj = ep.load()
        except Exception as e:  # a broken plugin must not take the other commands down
            print(f"fvar: warning: command '{ep.name}' ({ep.value}) failed to load: {e}", file=sys.stderr)
            continue
        if isinstance(obj, typer.Typer):
            app.add_typer(obj, name=ep.name)
        elif callable(obj):
            app.command(name=ep.name)(obj)
        else:
            print(f"fvar: warning: command '{ep.name}' is neither a Typer app nor a function", file=sys.stderr)
    return app


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """fvar's own warnings as one `fvar: warning:` line; others as Python prints them."""
    if issubclass(category, FvarWarning):
        print(f"fvar: warning: {message}", file=sys.stderr if file is None else file)
    else:
        _python_show_warning(message, category, filename, lineno, file, line)


_python_show_warning = warnings.showwarning


def _say_interrupted(args: list[str]) -> None:
    """One line: where the command stopped (when it said) and the command line that resumes it."""
    from fvar_core.interrupt import last_interrupt

    at = last_interrupt()
    print("fvar: interrupted" + (f" {at}; to resume, rerun: {shlex.join(['fvar', *args])}" if at else ""),
          file=sys.stderr)


def run(app: typer.Typer, argv: Optional[list[str]] = None) -> int:
    """Run the app. Bad command lines, user errors and output that cannot be written become one
    line on stderr and exit code 2; Ctrl-C says where the command stopped and how to resume it
    (exit 130)."""
    from fvar_core import interrupt
    from fvar_core.atomic import write_error

    args = list(sys.argv[1:] if argv is None else argv)
    warnings.showwarning = _show_warning
    interrupt.reset()
    try:
        # standalone_mode=False: click's usage errors reach us instead of being drawn as a box
        code = app(args=args, prog_name="fvar", standalone_mode=False)
    except UserError as e:
        print(f"fvar: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        reason = write_error(e)
        if reason is None:
            raise
        # a safety net: commands check their output paths first, so this is a race or a full disk
        print(f"fvar: error: cannot write {e.filename or 'the output'}: {reason}", file=sys.stderr)
        return 2
    except Exception as e:
        # click's exceptions, by name: Typer ships its own copy of click (typer._click) in newer releases
        names = {c.__name__ for c in type(e).__mro__}
        if "NoArgsIsHelpError" in names:
            e.show()
            return e.exit_code
        if "UsageError" in names:
            ctx = getattr(e, "ctx", None)
            print(f"fvar: error: {e.format_message()} (see `{ctx.command_path if ctx else 'fvar'} --help`)",
                  file=sys.stderr)
            return 2
        if "ClickException" in names:
            print(f"fvar: error: {e.format_message()}", file=sys.stderr)
            return e.exit_code
        if "Abort" in names:
            _say_interrupted(args)
            return 130
        raise
    except SystemExit as e:
        return int(e.code or 0) if not isinstance(e.code, str) else 1
    except KeyboardInterrupt:
        _say_interrupted(args)
        return 130
    finally:
        warnings.showwarning = _python_show_warning
    code = code if isinstance(code, int) and not isinstance(code, bool) else 0
    if code == 130:  # Typer turns Ctrl-C into exit 130, the interrupt itself is gone by now
        _say_interrupted(args)
    return code


def main() -> None:
    code = run(build_app())
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # a process of `accelerate launch` / torchrun
        # Leave without finalising the interpreter: gloo's worker threads can still hold tensors
        # (FSDP's last reduce-scatter, DDP buckets) then, and freeing them there aborts the process
        # (SIGABRT, "terminate called without an active exception", exit -6) after a run that had
        # finished and saved — seen about once in 16 launches. The loop has closed its files,
        # trackers and process group by now; only the streams need flushing.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    main()
