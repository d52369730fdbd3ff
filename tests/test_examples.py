"""The scripts in examples/ run as a user would run them (fresh processes, on a tiny checkpoint
built here, or on drawn images for the training script's --smoke), and write what they say."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from PIL import Image

from .test_api import _tiny_checkpoint

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def _run(*args: str) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=ENV, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    return p


def test_sample_and_inpaint_example(tmp_path):
    ckpt = _tiny_checkpoint(tmp_path / "runs" / "d16")
    out = tmp_path / "out"
    p = _run(str(EXAMPLES / "sample_and_inpaint.py"), str(ckpt), str(out), "--classes", "3,5", "--n", "2",
             "--device", "cpu")
    assert "4 samples of classes [3, 5] at 256px, 10 token scales" in p.stdout
    assert Image.open(out / "samples.png").size == (2 + 2 * 258, 2 + 2 * 258)  # 2 × 2 grid, 2 px padding
    assert Image.open(out / "inpainted.png").size == Image.open(out / "reconstructed.png").size == (256, 256)


def test_train_fashion_mnist_example_smoke(tmp_path):
    p = _run(str(EXAMPLES / "train_fashion_mnist.py"), str(tmp_path / "qs"), "--smoke", "--device", "cpu")
    assert "one sample per class" in p.stdout
    assert sorted(x.name for x in (tmp_path / "qs").glob("example-*.png")) == ["example-0-shapes.png",
                                                                            "example-1-strokes.png"]
