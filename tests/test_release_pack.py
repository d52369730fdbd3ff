"""`fvar release pack`: a finished release folder → a bundle that verifies, loads by name from its
own root, holds float16 weights equal to the trained ones rounded, and fails loudly when damaged.
Random-weight models of the release presets stand in for the trained ones."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fvar_core import bundle
from fvar_core.checkpoints import load_checkpoint, save_checkpoint
from fvar_core.data.folders import write_class_index
from fvar_core.errors import UserError
from fvar_core.eval.classifier import ClassifierConfig, FeatureNet
from fvar_core.models.tokenizer import Tokenizer
from fvar_core.models.transformer import VAR
from fvar_core.pipelines.release import RECIPES, pack_release
from fvar_core.presets import load_preset

CLASSES = ["0-t-shirt-top", "1-trouser", "2-pullover", "3-dress", "4-coat", "5-sandal", "6-shirt", "7-sneaker", "8-bag",
           "9-ankle-boot"]


def _fake_release(out: Path, names) -> None:
    (out / "data").mkdir(parents=True)
    write_class_index(out / "data" / "classes.json", CLASSES)
    cfg = ClassifierConfig()
    torch.manual_seed(0)
    save_checkpoint(out / "classifier", kind="classifier", preset=None,
                    state_dict=FeatureNet(10, cfg).state_dict(),
                    extra={"classifier": {"config": cfg.model_dump(mode="json"), "classes": CLASSES,
                                          "num_classes": 10}}, provenance={"data_fingerprint": "f" * 64})
    for name in names:
        p = load_preset(RECIPES[name].preset)
        var = VAR(p.model, p.patch_nums, p.tokenizer.vocab_size, p.tokenizer.z_channels)
        tok = Tokenizer(p.tokenizer, p.patch_nums)
        ck = out / name / "transformer"
        save_checkpoint(ck, kind="var", preset=p, state_dict=var.state_dict(),
                        provenance={"step": 7,
                                    "data_identity": {"source": "shards", "path": "x", "fingerprint": "a" * 64}})
        save_checkpoint(ck / "tokenizer", kind="tokenizer", preset=p, state_dict=tok.state_dict())
        row = {"name": "samples", "count": 1000, "accuracy": 0.5, "fid": 9.0, "kid": {"mean": 0.01},
               "precision": 0.7, "recall": 0.3}
        (out / name / "report.json").write_text(json.dumps({"rows": [row], "recipe": {"seconds": {"distill": 1.0}}}))


def test_pack_writes_a_bundle_that_verifies_and_loads_by_name(tmp_path, monkeypatch):
    out, dest = tmp_path / "release", tmp_path / "bundled"
    _fake_release(out, ["fmnist-32"])
    pack_release(out, dest, names=["fmnist-32"], say=lambda s: None)
    m = bundle.manifest(dest)
    assert m["default"] == "fmnist-32" and set(m["models"]) == {"fmnist-32", "fmnist"}
    folder = bundle.bundled_path("fmnist-32", root=dest)
    trained = load_checkpoint(out / "fmnist-32" / "transformer")
    shipped = load_checkpoint(folder)
    for k, v in trained.state_dict.items():  # float16 on disk: the trained tensors, rounded once
        assert shipped.state_dict[k].dtype == (torch.float16 if v.is_floating_point() else v.dtype)
        assert torch.equal(shipped.state_dict[k], v.half() if v.is_floating_point() else v), k
    card = (folder / "README.md").read_text()
    assert "fvar release train fmnist-32 --out release" in card and "| samples | 1000 | 50.0% | 9.00 |" in card
    assert 'from_pretrained("fmnist-32")' in card
    assert json.loads((folder / "classes.json").read_text())["classes"] == CLASSES

    # by name, through every loader, once the bundle is the package's
    monkeypatch.setattr(bundle, "BUNDLE_DIR", dest)
    import fvar
    from fvar_core.eval.classifier import load_classifier

    pipe = fvar.Pipeline.from_pretrained("fmnist-32", device="cpu")
    assert pipe.class_names[9] == "ankle boot"
    assert "| classes | t shirt top, trouser," in card
    assert pipe.models.var.head.weight.dtype == torch.float32  # computed in float32
    assert load_classifier("fmnist", device="cpu").classes == CLASSES


def test_a_damaged_or_missing_file_and_an_unknown_name_are_one_line(tmp_path, monkeypatch):
    out, dest = tmp_path / "release", tmp_path / "bundled"
    _fake_release(out, ["fmnist-32"])
    pack_release(out, dest, names=["fmnist-32"], say=lambda s: None)
    w = dest / "fmnist-32" / "tokenizer" / "model.safetensors"
    w.write_bytes(w.read_bytes()[:-1] + b"\0")
    with pytest.raises(UserError, match=r"^bundled model fmnist-32: fmnist-32/tokenizer/model.safetensors is "
                                        r"damaged .*reinstall fvar"):
        bundle.bundled_path("fmnist-32", root=dest)
    (dest / "fmnist" / "model.safetensors").unlink()
    with pytest.raises(UserError, match="fmnist/model.safetensors is missing"):
        bundle.bundled_path("fmnist", root=dest)
    with pytest.raises(UserError, match=r"no bundled model 'nope' \(bundled: fmnist, fmnist-32\)"):
        bundle.bundled_path("nope", root=dest)


def test_a_local_folder_of_the_same_name_wins(tmp_path, monkeypatch):
    monkeypatch.setattr(bundle, "manifest", lambda root=None: {"models": {"mine": {"path": "mine", "files": {}}}})
    monkeypatch.chdir(tmp_path)
    assert bundle.is_bundled_name("mine")
    (tmp_path / "mine").mkdir()
    assert not bundle.is_bundled_name("mine") and bundle.resolve_name("mine") == Path("mine")


def test_pack_refuses_an_unfinished_release(tmp_path):
    with pytest.raises(UserError, match=r"is not a release folder \(no data/classes.json\)"):
        pack_release(tmp_path / "nope", tmp_path / "b", say=lambda s: None)
    out = tmp_path / "release"
    _fake_release(out, [])
    with pytest.raises(UserError, match=r"not finished \(no report.json\): run `fvar release train fmnist-32`"):
        pack_release(out, tmp_path / "b", names=["fmnist-32"], say=lambda s: None)
