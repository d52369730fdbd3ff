"""`fvar quickstart`: every step's output is there, and a rerun resumes instead of starting over —
on drawn images (the fallback) and on a few hundred real Fashion-MNIST images at tiny size."""
from __future__ import annotations

import json

from fvar_core.data import fashion_mnist as fm
from fvar_core.checkpoints import load_checkpoint
from fvar_core.runs import complete_checkpoints

from .test_fashion_mnist import REAL, needs_real


def test_quickstart_runs_the_whole_pipeline_and_resumes(cli, tmp_path):
    out = tmp_path / "qs"
    args = ["quickstart", "--dataset", "drawn", "--out", str(out), "--images-per-class", "2", "--tokenizer-steps",
            "2", "--steps", "2", "--samples-per-class", "1", "--device", "cpu"]
    r = cli(*args)
    assert r.code == 0, r.err
    assert [line[:3] for line in r.out.splitlines() if line[:1].isdigit()] == ["1/5", "2/5", "3/5", "4/5", "5/5"]
    assert sorted(p.parent.name for p in (out / "data").glob("*/*.png")) == ["shapes"] * 2 + ["strokes"] * 2
    assert [s for s, _ in complete_checkpoints(out / "tokenizer")] == [2]
    manifest = json.loads((out / "shards" / "manifest.json").read_text())
    assert manifest["alias_vocab_size"] == 16 and manifest["preset_config"]["pyramid"]["kernel"] == "disk"
    student = load_checkpoint(out / "distill" / "checkpoints" / "step-0000002", expect_kind="var")
    assert student.preset.model.num_classes == 2
    side = json.loads((out / "samples" / "samples.json").read_text())
    assert [e["class_name"] for e in side["images"]] == ["shapes", "strokes"] and (out / "samples" / "grid.png").is_file()

    r = cli(*args)  # finished steps are not redone
    assert r.code == 0, r.err
    assert "already has 2 of 2 steps" in (out / "tokenizer" / "log.txt").read_text()
    assert "already has 2 of 2 steps" in (out / "distill" / "log.txt").read_text()


def test_quickstart_without_fashion_mnist_says_it_falls_back(cli, tmp_path, monkeypatch):
    monkeypatch.setattr(fm, "DEBIAN_DIR", tmp_path / "none")
    monkeypatch.setenv("FVAR_CACHE", str(tmp_path / "cache"))
    r = cli("quickstart", "--out", str(tmp_path / "qs"), "--images-per-class", "2", "--tokenizer-steps", "1",
            "--steps", "1", "--samples-per-class", "1", "--device", "cpu")
    assert r.code == 0, r.err
    assert "no local copy of Fashion-MNIST" in r.out and "falling back to drawn images" in r.out
    assert (tmp_path / "qs" / "data" / "shapes").is_dir()


@needs_real
def test_quickstart_on_real_fashion_mnist_ends_with_the_evaluation_table(cli, tmp_path):
    out = tmp_path / "qs"
    args = ["quickstart", "--dataset", "fashion-mnist", "--source", str(REAL), "--out", str(out),
            "--data-per-class", "30", "--train-per-class", "8", "--tokenizer-steps", "2", "--steps", "2",
            "--samples-per-class", "3", "--classifier-epochs", "0.5", "--device", "cpu"]
    r = cli(*args)
    assert r.code == 0, r.err
    assert [line[:3] for line in r.out.splitlines() if line[:1].isdigit()] == [f"{i}/6" for i in range(1, 7)]
    assert sorted(p.name for p in (out / "data").iterdir()) == ["classes.json", "fashion-mnist.json", "test", "train"]
    report = json.loads((out / "report.json").read_text())
    names = [row["name"] for row in report["rows"]]
    assert names == ["samples", "real images (train split)", "tokenizer reconstructions"]
    samples, real, recon = report["rows"]
    assert samples["count"] == 30 and real["count"] == 30 and recon["count"] == 300
    assert 0.0 <= samples["accuracy"] <= 1.0 and recon["psnr"] > 5
    assert "not Inception" in report["caveat"] and len(report["feature_net"]["weights_sha256"]) == 64
    manifest = json.loads((out / "shards" / "manifest.json").read_text())
    assert manifest["total"] == 80  # --train-per-class 8 × 10 classes
    assert "| samples | 30 |" in r.out and "not Inception" in r.out
    assert (out / "samples" / "grid.png").is_file() and (out / "report.md").is_file()

    r = cli(*args)  # a rerun resumes: nothing is trained again
    assert r.code == 0, r.err
    assert "already trained" in r.out
    assert "already has 2 of 2 steps" in (out / "distill" / "log.txt").read_text()
