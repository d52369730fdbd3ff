"""Transformer-only sampling speed (no VQ-VAE decode) of random-init VAR weights, as JSON.

    python benchmarks/sample_speed.py --depth 8 --batch 8 --rounds 3

Runs with whatever `fvar_core` is importable, so two checkouts compare by alternating runs:
    for r in 1 2 3; do for c in OLD NEW; do PYTHONPATH=$c python benchmarks/sample_speed.py; done; done
Settings are VAR's (cfg 1.5 with its ramp, top-k 900, top-p 0.96) on the var-d16-256 schedule
(680 tokens, 4096 codes) with width 64·depth, fp32 on the CPU, one warm-up batch.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from fvar_core.models.tokenizer import Tokenizer
from fvar_core.models.transformer import VAR
from fvar_core.presets import load_preset
from fvar_core.sample.sampler import sample_batch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--depth", type=int, default=8)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    d = a.depth
    p = load_preset("var-d16-256", [f"model.depth={d}", f"model.width={64 * d}", f"model.num_heads={d}"])
    torch.manual_seed(0)
    var = VAR(p.model, p.patch_nums, p.tokenizer.vocab_size, p.tokenizer.z_channels).eval()
    tok = Tokenizer(p.tokenizer, p.patch_nums).eval()
    labels = torch.arange(a.batch) % p.model.num_classes
    seeds = list(range(a.batch))
    times = []
    for r in range(a.rounds + 1):
        t = time.perf_counter()
        out = sample_batch(var, tok, labels, seeds, p.sample, decode=False)
        if r:
            times.append(time.perf_counter() - t)
    digest = int(sum(int(x.sum()) for x in out.tokens))
    print(json.dumps({"depth": d, "batch": a.batch, "seconds": times, "median_s": statistics.median(times),
                      "img_per_s": a.batch / statistics.median(times), "token_sum": digest}))


if __name__ == "__main__":
    main()
