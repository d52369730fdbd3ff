"""`fvar release train`'s recipe end to end at toy size: every step runs in order into its folder,
the report carries the recipe and the wall times, and a rerun resumes (a finished model is not
trained again). The real presets and Fashion-MNIST are swapped for a tiny preset and drawn images;
the wiring is the recipe's own."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from fvar_core.errors import UserError
from fvar_core.focus.testimages import DRAWN_CLASSES, draw_image_folder
from fvar_core.pipelines import release

TOY = """extends: tiny-32
model: {num_classes: %d}
tokenizer_train: {steps: 3, batch_size: 4, log_every: 3, ckpt_every: 3, sample_every: 0, precision: fp32}
train: {steps: 3, batch_size: 4, log_every: 3, ckpt_every: 3, sample_every: 0, precision: fp32}
data: {num_workers: 0}
""" % len(DRAWN_CLASSES)


@pytest.fixture
def toy_recipe(tmp_path, monkeypatch):
    preset = tmp_path / "toy.yaml"
    preset.write_text(TOY)
    monkeypatch.setattr(release, "RECIPES", {"toy": release.Recipe(str(preset), True, 3, "toy FVAR")})
    monkeypatch.setattr(release, "CLASSIFIER", release.ClassifierConfig(epochs=0.5, resolution=32, batch_size=8))
    monkeypatch.setattr(release, "SAMPLES_PER_CLASS", 3)

    def fake_export(out, **_):  # drawn images in the export's layout instead of Fashion-MNIST
        for split, seed in (("train", 0), ("test", 1)):
            if not (Path(out) / split).is_dir():
                draw_image_folder(Path(out) / split, per_class=6, size=32, seed=seed)
    monkeypatch.setattr(release, "export", fake_export)
    return tmp_path / "release"


def test_the_recipe_runs_every_step_and_a_rerun_resumes(toy_recipe):
    said = []
    reports = release.train_release(toy_recipe, ["toy"], device="cpu", say=said.append)
    rep = reports["toy"]
    d = toy_recipe / "toy"
    for sub in ("tokenizer", "shards", "transformer", "samples"):
        assert (d / sub).is_dir(), sub
    assert (toy_recipe / "classifier" / "config.json").is_file()
    assert rep["recipe"]["command"] == "fvar release train toy --out release" and rep["recipe"]["distill"]
    assert set(rep["recipe"]["seconds"]) == {"train-tokenizer", "tokenize", "distill", "evaluate",
                                            "data+classifier (shared)"}
    assert [r["name"] for r in rep["rows"]][0] == "samples" and rep["rows"][0]["count"] == 3 * len(DRAWN_CLASSES)
    assert json.loads((d / "report.json").read_text())["recipe"] == rep["recipe"]
    said.clear()
    again = release.train_release(toy_recipe, ["toy"], device="cpu", say=said.append)
    assert again["toy"] == json.loads((d / "report.json").read_text())
    assert any(s.startswith("toy: finished") for s in said) and not any("train-tokenizer:" in s for s in said)


def test_an_unknown_recipe_is_one_line(tmp_path):
    with pytest.raises(UserError, match=r"unknown release 'nope': choose from fmnist-32, fmnist-32-var"):
        release.train_release(tmp_path, ["nope"])
