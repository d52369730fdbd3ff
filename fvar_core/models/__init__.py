"""The networks: VAR's VQ-VAE with FVAR's dual-path quantizer, the VAR transformer, the teacher, the PatchGAN."""
