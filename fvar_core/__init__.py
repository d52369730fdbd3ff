"""fvar core: everything that computes (models, pyramid, training, sampling, evaluation).

Importable without the CLI; the `fvar` command in `fvar_cli` is a thin layer over it.
"""

__version__ = "0.1.0"
