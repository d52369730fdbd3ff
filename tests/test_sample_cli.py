"""`fvar sample` end to end on a random-init tiny-64 checkpoint, and the resumable folder generator.

`tiny_checkpoint` / `tiny_runs_dir` are shared with the inpaint and bench tests (built once).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fvar_core.checkpoints import save_checkpoint
from fvar_core.config import SampleConfig
from fvar_core.data.folders import write_class_index
from fvar_core.presets import load_preset
from fvar_core.models.tokenizer import Tokenizer
from fvar_core.models.transformer import VAR

CLASS_NAMES = [f"n0{i}, thing {i}" for i in range(10)]


def _save_tiny(ckpt_dir: Path, step: int, training_state: bool) -> Path:
    """A tiny-64 var checkpoint (random init, seeded) with its tokenizer in <ckpt>/tokenizer."""
    preset = load_preset("tiny-64")
    torch.manual_seed(0)
    var = VAR(preset.model, preset.patch_nums, preset.tokenizer.vocab_size, preset.tokenizer.z_channels)
    tok = Tokenizer(preset.tokenizer, preset.patch_nums)
    save_checkpoint(ckpt_dir, kind="var", preset=preset, state_dict=var.state_dict(), provenance={"step": step},
                    training_state={"step": step} if training_state else None)
    save_checkpoint(ckpt_dir / "tokenizer", kind="tokenizer", preset=preset, state_dict=tok.state_dict())
    return ckpt_dir


_CACHE: dict = {}  # the fixtures are used by several modules: build once per session


def tiny_checkpoint(factory) -> Path:
    """The session's tiny-64 var checkpoint (tokenizer inside); `factory` = tmp_path_factory."""
    if "ckpt" not in _CACHE:
        _CACHE["ckpt"] = _save_tiny(factory.mktemp("tinyckpt") / "var-tiny", step=7, training_state=False)
    return _CACHE["ckpt"]


def tiny_runs_dir(factory) -> Path:
    """runs/x/checkpoints/step-0000001/ (complete, with tokenizer) + runs/x/classes.json."""
    if "runs" not in _CACHE:
        runs = factory.mktemp("runs")
        _save_tiny(runs / "x" / "checkpoints" / "step-0000001", step=1, training_state=True)
        write_class_index(runs / "x" / "classes.json", CLASS_NAMES)
        _CACHE["runs"] = runs
    return _CACHE["runs"]


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory) -> Path:
    return tiny_runs_dir(tmp_path_factory)


def _err_line(r) -> str:
    lines = [ln for ln in r.err.splitlines() if ln.startswith("fvar: error:")]
    assert len(lines) == 1, r.err
    return lines[0]


# ------------------------------------------------------------------------------------------------

def test_sample_writes_pngs_grid_sidecar_and_tokens(cli, tiny_ckpt, tmp_path):
    out, npz = tmp_path / "s", tmp_path / "tok.npz"
    r = cli("sample", "--ckpt", str(tiny_ckpt), "--class", "1,3-4", "--n", "2", "--seed", "10", "--out", str(out),
            "--save-tokens", str(npz), "--device", "cpu", "--top-k", "5")
    assert r.code == 0, r.err
    doc = json.loads((out / "samples.json").read_text())
    files = sorted(p.name for p in out.glob("0*.png"))
    assert files == ["0000-class0001.png", "0001-class0001.png", "0002-class0003.png", "0003-class0003.png",
                     "0004-class0004.png", "0005-class0004.png"]
    assert [e["seed"] for e in doc["images"]] == list(range(10, 16))  # seed + i
    assert [e["class"] for e in doc["images"]] == [1, 1, 3, 3, 4, 4]
    for f in files:
        assert Image.open(out / f).size == (64, 64)
    grid = Image.open(out / "grid.png")
    assert grid.size == (2 + 2 * 66, 2 + 3 * 66)  # one row per class
    ck = doc["checkpoint"]
    assert ck["path"] == str(tiny_ckpt.resolve()) and ck["preset"] == "tiny-64" and ck["step"] == 7
    assert len(ck["sha256"]) == 64 and doc["tokenizer"]["path"] == str((tiny_ckpt / "tokenizer").resolve())
    s = doc["settings"]
    assert s["top_k"] == 5 and s["top_p"] == 0.0 and s["cfg"] == 1.5 and s["seed"] == 10  # rest: preset defaults
    data = np.load(npz)
    assert [data[f"tokens_{k}"].shape for k in range(4)] == [(6, 1), (6, 4), (6, 9), (6, 16)]
    assert data["labels"].tolist() == [1, 1, 3, 3, 4, 4] and data["seeds"].tolist() == list(range(10, 16))
    assert data["tokens_3"].max() < 64


def test_image_depends_only_on_its_seed_not_on_batch_or_position(cli, tiny_ckpt, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert cli("sample", "--ckpt", str(tiny_ckpt), "--class", "2", "--n", "3", "--seed", "5", "--batch", "3",
               "--out", str(a), "--device", "cpu").code == 0
    assert cli("sample", "--ckpt", str(tiny_ckpt), "--class", "2", "--n", "1", "--seed", "7", "--batch", "1",
               "--out", str(b), "--device", "cpu").code == 0
    # image 2 of the first run has seed 5 + 2 = 7, as image 0 of the second: the same tokens, and
    # pixels equal up to float rounding of batch-size-dependent CPU kernels (< 1e-5 before the 8-bit
    # PNG, so at most one level where a value sits on a rounding boundary)
    x = np.asarray(Image.open(a / "0002-class0002.png")).astype(int)
    y = np.asarray(Image.open(b / "0000-class0002.png")).astype(int)
    assert np.abs(x - y).max() <= 1 and (x != y).mean() < 0.01


def test_newest_checkpoint_under_runs_dir_is_used_and_named(cli, tiny_runs, tmp_path, monkeypatch):
    monkeypatch.setenv("FVAR_RUNS", str(tiny_runs))
    out = tmp_path / "s"
    r = cli("sample", "--class", "0-1", "--n", "1", "--out", str(out), "--device", "cpu")
    assert r.code == 0, r.err
    ckpt = tiny_runs / "x" / "checkpoints" / "step-0000001"
    assert f"using the newest var checkpoint: {ckpt}" in r.out
    doc = json.loads((out / "samples.json").read_text())
    assert doc["checkpoint"]["path"] == str(ckpt.resolve()) and doc["checkpoint"]["step"] == 1
    # class names from the run's classes.json, in the JSON and (slugged) in file names
    assert [e["class_name"] for e in doc["images"]] == CLASS_NAMES[:2]
    assert (out / "0000-class0000-n00-thing-0.png").is_file()


@pytest.mark.parametrize("args, message", [
    (["--class", "10"], "class 10 out of range: the model has 10 classes"),
    (["--class", "a-b"], "--class 'a-b': expected ids"),
    (["--class", "1", "--top-p", "2"], "top-p: Input should be less than or equal to 1"),
    (["--class", "1", "--cfg-mode", "weird"], "cfg-mode:"),
    (["--class", "1", "--device", "cuda:9"], "--device cuda:9"),
    (["--class", "1", "--rng", "global"], "rng: Input should be 'per-image' or 'official'"),
])
def test_bad_sample_arguments_are_one_line_errors(cli, tiny_ckpt, tmp_path, args, message):
    r = cli("sample", "--ckpt", str(tiny_ckpt), "--out", str(tmp_path / "s"), *args)
    assert r.code == 2
    assert message in _err_line(r)
    assert "Traceback" not in r.err


@pytest.mark.parametrize("where", ["out-is-a-file", "tokens-is-a-folder"])
def test_output_paths_are_checked_before_anything_is_sampled(cli, tiny_ckpt, tmp_path, where):
    (tmp_path / "file").write_text("x")
    (tmp_path / "folder").mkdir()
    out = tmp_path / ("file" if where == "out-is-a-file" else "s")
    r = cli("sample", "--ckpt", str(tiny_ckpt), "--class", "1", "--n", "2", "--out", str(out), "--device", "cpu",
            "--save-tokens", str(tmp_path / "folder"))
    assert r.code == 2
    assert ("exists and is not a folder" if where == "out-is-a-file" else "is a folder") in _err_line(r)
    assert not list(tmp_path.rglob("*.png"))


def test_no_checkpoint_in_runs_dir_and_no_bundle_is_a_one_line_error(cli, tmp_path, monkeypatch):
    # (with the bundle, the release answers instead: tests/test_bundled.py)
    monkeypatch.setenv("FVAR_RUNS", str(tmp_path / "empty"))
    monkeypatch.setattr("fvar_core.bundle.BUNDLE_DIR", tmp_path / "no-bundle")
    r = cli("sample", "--class", "1", "--out", str(tmp_path / "s"))
    assert r.code == 2
    assert "no var checkpoint under" in _err_line(r)


def test_checkpoint_without_tokenizer_is_a_one_line_error(cli, tiny_ckpt, tmp_path):
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(tiny_ckpt, bare, ignore=shutil.ignore_patterns("tokenizer"))
    r = cli("sample", "--ckpt", str(bare), "--class", "1", "--out", str(tmp_path / "s"))
    assert r.code == 2
    assert "has no tokenizer to decode with: pass --tokenizer" in _err_line(r)
    # and --tokenizer fixes it
    r = cli("sample", "--ckpt", str(bare), "--tokenizer", str(tiny_ckpt / "tokenizer"), "--class", "1", "--n", "1",
            "--out", str(tmp_path / "s"), "--device", "cpu")
    assert r.code == 0, r.err


def test_converted_official_checkpoints_sample(cli, tiny_ckpt, tmp_path):
    """Official-format .pth files (exported, then imported back) sample like the fvar checkpoint."""
    for name, src in (("var", tiny_ckpt), ("vae", tiny_ckpt / "tokenizer")):
        assert cli("convert", "export", str(src), "--out", str(tmp_path / f"{name}.pth")).code == 0
        r = cli("convert", "import", str(tmp_path / f"{name}.pth"), "--out", str(tmp_path / f"{name}-ckpt"),
                "--preset", "tiny-64", "--set", "teacher.enabled=false")
        assert r.code == 0, r.err
    outs = {}
    for which, args in (("fvar", ["--ckpt", str(tiny_ckpt)]),
                        ("official", ["--ckpt", str(tmp_path / "var-ckpt"), "--tokenizer", str(tmp_path / "vae-ckpt")])):
        out = tmp_path / which
        r = cli("sample", *args, "--class", "3", "--n", "2", "--out", str(out), "--device", "cpu", "--top-k", "4")
        assert r.code == 0, r.err
        outs[which] = [np.asarray(Image.open(p)) for p in sorted(out.glob("0*.png"))]
    assert all(np.array_equal(a, b) for a, b in zip(outs["fvar"], outs["official"]))


# ------------------------------------------------------------------------------------------------
# generate_to_folder (used by fvar eval)
# ------------------------------------------------------------------------------------------------

def test_generate_to_folder_resumes_without_regenerating(tiny_ckpt, tmp_path, monkeypatch):
    from fvar_core.sample import outputs as sampler

    out = tmp_path / "gen"
    settings = SampleConfig(top_k=10, top_p=0.9)
    labels, seeds = [0, 1, 2, 3, 4], [50, 51, 52, 53, 54]
    paths = sampler.generate_to_folder(tiny_ckpt, out, labels, seeds, settings, batch_size=2, device="cpu",
                                       progress=False)
    assert [p.name for p in paths] == [f"{i:06d}.png" for i in range(5)] and all(p.is_file() for p in paths)
    before = {p.name: (p.stat().st_mtime_ns, np.asarray(Image.open(p)).astype(int)) for p in paths}
    paths[2].unlink()  # as if the run had been killed before image 2
    paths2 = sampler.generate_to_folder(tiny_ckpt, out, labels, seeds, settings, batch_size=2, device="cpu",
                                        progress=False)
    assert paths2 == paths
    for p in paths:
        mtime, pixels = before[p.name]
        # the regenerated image is the same image (made at batch 1 instead of 2: equal tokens, pixels
        # to float rounding, so at most one 8-bit level apart)
        assert np.abs(np.asarray(Image.open(p)).astype(int) - pixels).max() <= 1
        if p.name != "000002.png":
            assert p.stat().st_mtime_ns == mtime  # the others were not rewritten

    def boom(*a, **k):
        raise AssertionError("models loaded although every image exists")
    monkeypatch.setattr(sampler, "load_models", boom)
    assert sampler.generate_to_folder(tiny_ckpt, out, labels, seeds, settings, progress=False) == paths
    assert not list(out.glob(".*.tmp"))  # no temporaries left behind


def test_rng_official_draws_a_batch_from_one_generator_and_says_so(cli, tiny_ckpt, tmp_path):
    """--rng official: one batch of 4 is one draw of the official stream (seeded with --seed), so the
    same command reproduces it and the sidecar names the rule; a batch of 2 draws other images."""
    def run(out, batch):
        r = cli("sample", "--ckpt", str(tiny_ckpt), "--class", "1,3", "--n", "2", "--seed", "5", "--rng", "official",
                "--batch", str(batch), "--out", str(out), "--save-tokens", str(out / "t.npz"), "--device", "cpu")
        assert r.code == 0, r.err
        return np.load(out / "t.npz"), json.loads((out / "samples.json").read_text())
    a, doc = run(tmp_path / "a", 4)
    b, _ = run(tmp_path / "b", 4)
    c, _ = run(tmp_path / "c", 2)
    assert doc["settings"]["rng"] == "official" and "g_seed" in doc["seed_rule"]
    assert all(np.array_equal(a[f"tokens_{k}"], b[f"tokens_{k}"]) for k in range(4))
    assert not all(np.array_equal(a[f"tokens_{k}"], c[f"tokens_{k}"]) for k in range(1, 4))
