"""Sample, inpaint, and round-trip images through the tokens, with the Python API.

    python examples/sample_and_inpaint.py runs/d16 out/          # a run, a checkpoint folder,
    python examples/sample_and_inpaint.py var_d16.pth out/ --tokenizer vae_ch160v4096z32.pth

Writes out/samples.png (one row per class), out/inpainted.png (the centre of the first sample
regenerated towards the second class) and out/reconstructed.png (the first sample encoded to its
per-scale tokens and decoded back).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

import fvar
from fvar_core.data.images import save_png
from fvar_core.sample.outputs import make_grid


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ckpt", help="run folder, var checkpoint folder, or official var_d*.pth")
    ap.add_argument("out", type=Path)
    ap.add_argument("--tokenizer", help="tokenizer checkpoint (or the official VQ-VAE .pth)")
    ap.add_argument("--classes", default="207,388", help="comma-separated class ids")
    ap.add_argument("--n", type=int, default=4, help="images per class")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()

    pipe = fvar.Pipeline.from_pretrained(args.ckpt, tokenizer=args.tokenizer, device=args.device)
    classes = [int(c) for c in args.classes.split(",")]
    images = pipe.sample(classes, n=args.n, seed=0, output="tensor")           # (N, 3, R, R) in [0, 1]
    args.out.mkdir(parents=True, exist_ok=True)
    save_png(make_grid(images, cols=args.n), args.out / "samples.png")

    R = pipe.resolution
    box = (R // 4, R // 4, 3 * R // 4, 3 * R // 4)                             # the centre half
    edited = pipe.inpaint(images[0], box=box, cls=classes[-1], seed=1)
    edited.save(args.out / "inpainted.png")

    tokens = pipe.encode(images[0])                                            # K tensors (1, pn²)
    pipe.decode(tokens)[0].save(args.out / "reconstructed.png")
    print(f"{len(images)} samples of classes {classes} at {R}px, {len(tokens)} token scales → {args.out}")


if __name__ == "__main__":
    with torch.inference_mode():
        main()
