"""Built-in subcommands; each module exposes a Typer `app` registered under `fvar.commands`."""
