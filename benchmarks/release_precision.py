"""What storing the bundled models in float16 changes (issue: a model in the box).

For each bundled generator, the weights as trained (float32, `fvar release train`'s folder) against
the shipped float16 files (loaded into the same float32 models):

* tokens: N images (PER_CLASS per class, seeds 0…N−1, the preset's sampling defaults) sampled
  by both; the share of images whose 130 tokens are all equal, and of tokens equal;
* pixels: the float32 model's tokens decoded by both tokenizers: max |Δ| before 8-bit rounding,
  PSNR of float16 against float32, and the share of 8-bit PNG values that change.

    python benchmarks/release_precision.py release/            # the folder `fvar release train` wrote
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from fvar_core.bundle import bundled_names
from fvar_core.runs import resolve_checkpoint
from fvar_core.sample.loading import load_models
from fvar_core.sample.sampler import decode_images, sample

PER_CLASS = 100


def compare(trained_dir: Path, name: str, per_class: int) -> dict:
    ck = resolve_checkpoint(trained_dir / "transformer", "--ckpt")
    full = load_models(ck, device="cpu")
    half = load_models(name, device="cpu")
    classes = full.var.num_classes
    labels = [c for c in range(classes) for _ in range(per_class)]
    seeds = list(range(len(labels)))
    settings = full.preset.sample
    a = sample(full.var, full.tokenizer, labels, seeds, settings, decode=False)
    b = sample(half.var, half.tokenizer, labels, seeds, settings, decode=False)
    ta, tb = torch.cat(a.tokens, 1), torch.cat(b.tokens, 1)  # (N, 130)
    same_img = (ta == tb).all(1).float().mean().item()
    same_tok = (ta == tb).float().mean().item()
    # the same tokens (the float32 model's) through each tokenizer's codebook, φ convs and decoder
    ia = decode_images(full.tokenizer, full.tokenizer.quantize.idx_to_fhat(a.tokens))
    ib = decode_images(half.tokenizer, half.tokenizer.quantize.idx_to_fhat(a.tokens))
    d = (ia - ib).abs()
    mse = ((ia - ib) ** 2).mean().item()
    pa, pb = (ia * 255).round(), (ib * 255).round()
    return {"name": name, "images": len(labels), "trained": str(ck),
            "images_with_all_tokens_equal": same_img, "tokens_equal": same_tok,
            "pixel_max_abs_diff": d.max().item(), "pixel_psnr_db": 10 * math.log10(1 / mse) if mse else float("inf"),
            "png_values_changed": (pa != pb).float().mean().item()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("release", type=Path, help="the folder `fvar release train` wrote")
    ap.add_argument("--per-class", type=int, default=PER_CLASS)
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    rows = [compare(args.release / n, n, args.per_class) for n in bundled_names("var")]
    print("| model | images | all tokens equal | tokens equal | pixels max abs Δ | PSNR fp16 vs fp32 "
          "| PNG values changed |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r['images']} | {100 * r['images_with_all_tokens_equal']:.1f}% | "
              f"{100 * r['tokens_equal']:.2f}% | {r['pixel_max_abs_diff']:.2e} | {r['pixel_psnr_db']:.1f} dB | "
              f"{100 * r['png_values_changed']:.3f}% |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
