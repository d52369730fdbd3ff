"""Evaluation: feature extractors, FID/IS/KID/precision-recall, reference statistics."""
