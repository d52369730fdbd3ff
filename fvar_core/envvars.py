"""The environment variables fvar reads, in one torch-free module (the CLI's help texts name them
without importing the modules that use them)."""

RUNS = "FVAR_RUNS"                        # where runs live (default ./runs)
CACHE = "FVAR_CACHE"                      # reference statistics, datasets (default ~/.cache/fvar)
FEATURE_WEIGHTS = "FVAR_FEATURE_WEIGHTS"  # a local copy of the Inception weights
