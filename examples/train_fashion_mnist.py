"""Train FVAR on Fashion-MNIST end to end from Python: tokenizer → tokens → distillation →
samples → offline evaluation (what `fvar quickstart` runs), then sample the result with the API.

    apt-get install dataset-fashion-mnist          # as root (or --source DIR with the IDX files)
    python examples/train_fashion_mnist.py runs/fmnist

About an hour on a 2-core CPU at the defaults (docs/experiments.md); `--smoke` runs every step for
a few iterations on drawn images instead, in under a minute.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import fvar
from fvar_core.pipelines.quickstart import quickstart


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--source", type=Path, help="folder with the Fashion-MNIST IDX files (default: the Debian package)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--smoke", action="store_true", help="a few steps on drawn images: checks the pipeline, not a model")
    args = ap.parse_args()

    if args.smoke:
        res = quickstart(args.out, dataset="drawn", tokenizer_steps=2, steps=2, per_class=1, images_per_class=2,
                         device=args.device)
    else:
        res = quickstart(args.out, dataset="fashion-mnist", source=args.source, device=args.device)
    student = res.out / "distill"  # the distillation run: its newest checkpoint is the student
    print(f"student: {student}, samples grid {res.grid}")

    pipe = fvar.Pipeline.from_pretrained(student, device=args.device)
    names = pipe.class_names or [str(c) for c in range(pipe.num_classes)]
    for c, img in enumerate(pipe(classes=list(range(pipe.num_classes)), seed=0)):
        img.save(args.out / f"example-{c}-{names[c]}.png")
    print(f"one sample per class → {args.out}/example-*.png")


if __name__ == "__main__":
    main()
