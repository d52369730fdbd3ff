"""The models that ship inside fvar: they verify, load by name, sample what they shipped with
(golden tokens), travel in the wheel and the sdist, and a damaged file is one line.

The golden tokens pin the release: a change that alters what ships (weights, sampler, tokenizer)
fails here and must be made on purpose — rewrite them with
`python tests/test_bundled.py --write-golden` and say why in the commit.
"""
from __future__ import annotations

import json
import shutil
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from fvar_core import bundle
from fvar_core.errors import UserError

GOLDEN = Path(__file__).resolve().parent / "data" / "release-golden.json"
# what the golden file pins: per model, these classes (names), 2 images each, seeds 0…
GOLDEN_CLASSES = ["sneaker", "trouser", "ankle boot"]
MAX_BUNDLE_BYTES = 25_000_000  # the budget for the release, its twin and the classifier

pytestmark = pytest.mark.skipif(not bundle.bundled_names(), reason="no bundled models in this checkout")


def _golden_tokens(name: str) -> list:
    import fvar

    pipe = fvar.Pipeline.from_pretrained(name, device="cpu")
    return [t.tolist() for t in pipe.sample_tokens(GOLDEN_CLASSES, n=2, seed=0)]


def test_every_bundled_file_verifies_and_the_bundle_fits_its_budget():
    m = bundle.manifest()
    assert m["default"] == "fmnist-32"
    assert set(bundle.bundled_names("var")) == {"fmnist-32", "fmnist-32-var"}
    assert bundle.bundled_names("classifier") == ["fmnist"]
    total = 0
    for name, entry in m["models"].items():
        folder = bundle.bundled_path(name)
        on_disk = {p.relative_to(bundle.BUNDLE_DIR).as_posix() for p in folder.rglob("*") if p.is_file()}
        assert on_disk == set(entry["files"]), f"{name}: files not in the manifest, or missing"
        total += sum((bundle.BUNDLE_DIR / f).stat().st_size for f in entry["files"])
        if entry["kind"] == "var":  # weights stored in float16 (docs/release.md measures what it changes)
            with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
                dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
            assert dtypes <= {"F16", "I64"}, dtypes
            card = (folder / "README.md").read_text()
            assert f"fvar release train {name}" in card and "class acc." in card and "fingerprint" in card
    assert total <= MAX_BUNDLE_BYTES, f"the bundle holds {total / 1e6:.1f} MB"


@pytest.mark.parametrize("name", ["fmnist-32", "fmnist-32-var"])
def test_the_release_samples_the_tokens_it_shipped_with(name):
    golden = json.loads(GOLDEN.read_text())
    assert golden["classes"] == GOLDEN_CLASSES
    assert _golden_tokens(name) == golden["tokens"][name]


def test_sample_with_nothing_given_uses_the_release(cli, tmp_path, monkeypatch):
    monkeypatch.setenv("FVAR_RUNS", str(tmp_path / "no-runs"))
    monkeypatch.chdir(tmp_path)
    r = cli("sample", "--class", "sneaker,Ankle Boot", "--n", "2")
    assert r.code == 0, r.err
    assert "using the bundled release fmnist-32" in r.out
    side = json.loads((tmp_path / "samples" / "samples.json").read_text())
    assert side["checkpoint"]["path"] == str(bundle.bundled_path("fmnist-32").resolve())
    assert [s["class"] for s in side["images"]] == [7, 7, 9, 9]
    assert [s["class_name"] for s in side["images"]] == ["7-sneaker"] * 2 + ["9-ankle-boot"] * 2
    assert (tmp_path / "samples" / "grid.png").is_file()


def test_class_names_work_in_python_like_ids():
    import fvar

    pipe = fvar.Pipeline.from_pretrained("fmnist-32", device="cpu")
    assert pipe.class_names[7] == "sneaker" and len(pipe.class_names) == 10
    by_name = pipe(classes=["ankle boot", "BAG"], seed=3, output="tensor")
    by_id = pipe(classes=[9, 8], seed=3, output="tensor")
    assert torch.equal(by_name, by_id)
    with pytest.raises(UserError, match=r"unknown class 'sandle'; closest: sandal \(5\)"):
        pipe(classes=["sandle"])


def test_an_unknown_class_name_is_one_line_naming_the_closest(cli, tmp_path):
    r = cli("sample", "--ckpt", "fmnist-32", "--class", "sneakr", "--out", str(tmp_path / "s"))
    assert r.code == 2
    lines = [ln for ln in r.err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "unknown class 'sneakr'" in lines[0] and "sneaker (7)" in lines[0], r.err
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("victim", ["fmnist-32/model.safetensors", "fmnist-32/tokenizer/model.safetensors",
                                    "fmnist-32/config.json"])
def test_a_damaged_bundled_file_is_one_line(cli, tmp_path, monkeypatch, victim):
    copy = tmp_path / "bundled"
    shutil.copytree(bundle.BUNDLE_DIR, copy)
    f = copy / victim
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    monkeypatch.setattr(bundle, "BUNDLE_DIR", copy)
    r = cli("sample", "--ckpt", "fmnist-32", "--class", "1", "--out", str(tmp_path / "s"))
    assert r.code == 2
    lines = [ln for ln in r.err.splitlines() if ln.strip()]
    assert len(lines) == 1 and f"bundled model fmnist-32: {victim} is damaged" in lines[0], r.err
    assert not (tmp_path / "s").exists()


def test_inpaint_and_the_feature_net_by_name(cli, tmp_path):
    from fvar_core.eval.classifier import load_classifier

    import fvar

    pipe = fvar.Pipeline.from_pretrained("fmnist-32", device="cpu")
    trousers = pipe(classes=["trouser"], n=8, seed=0, output="tensor")
    clf = load_classifier("fmnist", device="cpu")
    assert len(clf.classes) == 10
    with torch.no_grad():
        pred = clf.net((trousers * 255).round().to(torch.uint8))[1].argmax(1)
    assert (pred == 1).sum() >= 6, pred  # the bundled classifier recognises the release's trousers
    pipe.decode(pipe.encode([trousers[0]]))[0].save(tmp_path / "t.png")
    r = cli("inpaint", "--ckpt", "fmnist-32", "--image", str(tmp_path / "t.png"), "--box", "0,0,16,32",
            "--class", "dress", "--out", str(tmp_path / "edit"))
    assert r.code == 0, r.err
    assert json.loads((tmp_path / "edit" / "edit.json").read_text())["class"] == 3


def test_download_list_shows_the_bundled_models(cli):
    r = cli("download", "--list")
    assert r.code == 0, r.err
    rows = {ln.split()[0]: ln.split()[1] for ln in r.out.splitlines() if ln.strip()}
    assert rows["fmnist-32"] == rows["fmnist-32-var"] == rows["fmnist"] == "bundled"
    assert rows["var-d16"] == "hub"


def test_the_wheel_and_the_sdist_carry_the_bundle(tmp_path, monkeypatch):
    from setuptools import build_meta

    repo = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(repo)
    want = {f"fvar_core/bundled/{f}" for e in bundle.manifest()["models"].values() for f in e["files"]}
    want |= {"fvar_core/bundled/manifest.json", "fvar_core/assets/imagenet-classes.txt"}
    wheel = tmp_path / build_meta.build_wheel(str(tmp_path))
    with zipfile.ZipFile(wheel) as z:
        assert want <= set(z.namelist()), sorted(want - set(z.namelist()))[:5]
    import tarfile

    sdist = tmp_path / build_meta.build_sdist(str(tmp_path))
    with tarfile.open(sdist) as t:
        names = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    assert want <= names, sorted(want - names)[:5]


if __name__ == "__main__" and "--write-golden" in sys.argv:
    GOLDEN.write_text(json.dumps({"classes": GOLDEN_CLASSES, "n": 2, "seed": 0,
                                  "tokens": {n: _golden_tokens(n) for n in bundle.bundled_names("var")}}) + "\n")
    print(f"wrote {GOLDEN}")
