"""The networks: VAR's VQ-VAE and multi-scale quantizer with FVAR's dual path, the VAR transformer, the teacher."""
