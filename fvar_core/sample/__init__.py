"""Generation: the scale-by-scale sampler, in- and out-painting, and what they write."""
