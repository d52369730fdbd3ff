"""The sha256 digests fvar records, each named for what it hashes: a file's bytes, a set of tensors.

`file_sha256` identifies a file (checkpoint integrity, a tokenizer copy, a downloaded weight);
`tensors_sha256` identifies weights whatever file holds them (a tokenizer's tensors in a shard
manifest, the "ranks agree" check). They differ for the same tokenizer, so provenance names
which one it records.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Mapping, Union

import torch


def file_sha256(path: Union[str, Path], chunk: int = 1 << 20) -> str:
    """sha256 of a file's bytes (hex)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def tensors_sha256(weights: Union[torch.nn.Module, Mapping[str, torch.Tensor]]) -> str:
    """sha256 over a module's (or a) state dict: for each key in sorted order its name, dtype, shape
    and raw bytes. Identifies the weights whatever file (or run directory) they came from."""
    h = hashlib.sha256()
    sd = weights.state_dict() if isinstance(weights, torch.nn.Module) else weights
    for k, t in sorted(sd.items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
