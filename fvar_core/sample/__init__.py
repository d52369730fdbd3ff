"""Generation: the scale-by-scale sampler, in-/out-painting, the files they write."""
