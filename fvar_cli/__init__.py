"""fvar command line: thin Typer commands over `fvar_core`, discovered as plugins."""
