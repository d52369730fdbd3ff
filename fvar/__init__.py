"""fvar: next-focus (and next-scale) visual autoregressive models — the Python front door.

    import fvar
    pipe = fvar.Pipeline.from_pretrained("runs/d16")
    images = pipe(classes=[207, 388], seed=0)

The computing lives in `fvar_core` (docs/code-map.md), the command line in `fvar_cli`.
"""
from fvar_core import __version__
from fvar.pipeline import Pipeline, to_pil

__all__ = ["Pipeline", "to_pil", "__version__"]
