"""`fvar convert import|export`: official VAR .pth ⇄ fvar checkpoint, exactly, through the CLI."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

from fvar_cli.app import discover
from fvar_core.checkpoints import load_checkpoint, save_checkpoint
from fvar_core.presets import load_preset
from fvar_core.models.tokenizer import EXTENSION_KEYS, Tokenizer
from fvar_core.models.transformer import VAR

from .test_checkpoints import Opaque


def _randomized(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for v in model.state_dict().values():
            if v.is_floating_point():
                v.copy_(torch.randn(v.shape, generator=g))
    return model


@pytest.fixture(scope="module")
def official_vae(tmp_path_factory) -> tuple[Path, dict]:
    """An official-shaped VQ-VAE .pth: the released architecture (V=4096, z=32, 10 scales) at ch=32."""
    p = load_preset("var-d16-256", ["tokenizer.ch=32"])
    sd = _randomized(Tokenizer(p.tokenizer, p.patch_nums)).official_state_dict()
    path = tmp_path_factory.mktemp("official") / "vae_ch32v4096z32.pth"
    torch.save(sd, path)
    return path, sd


def _same_official(a: dict, b: dict) -> None:
    assert list(a) == list(b)  # the official key set, in the official order
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k


def _one_line_error(r) -> str:
    assert r.code == 2, (r.out, r.err)
    lines = r.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fvar: error: "), r.err
    return lines[0]


def test_convert_registers_through_the_entry_point_group(cli):
    assert "convert" in {ep.name for ep in discover()}
    r = cli("convert", "--help")
    assert r.code == 0 and "import" in r.out and "export" in r.out


def test_vae_import_export_round_trip_is_exact(cli, tmp_path, official_vae):
    src, sd = official_vae
    r = cli("convert", "import", str(src), "--out", str(tmp_path / "tok"))
    assert r.code == 0, r.err
    assert "tokenizer" in r.out and "ch=32" in r.out and "V=4096" in r.out and "324 tensors" in r.out
    c = load_checkpoint(tmp_path / "tok", expect_kind="tokenizer")
    # the default preset, with the architecture read off the weights (ch=32, not the preset's 160)
    assert c.preset.name == "var-d16-256" and c.preset.tokenizer.ch == 32
    assert c.preset.tokenizer.alias_vocab_size == 0
    assert c.provenance["source"] == {"file": src.name, "sha256": hashlib.sha256(src.read_bytes()).hexdigest(),
                                      "format": "official VAR .pth"}

    r = cli("convert", "export", str(tmp_path / "tok"), "--out", str(tmp_path / "back.pth"))
    assert r.code == 0, r.err
    assert "324 tensors" in r.out and "back.pth" in r.out
    _same_official(sd, torch.load(tmp_path / "back.pth", map_location="cpu", weights_only=True))
    assert sorted(os.listdir(tmp_path)) == ["back.pth", "tok"]  # no temp files left


def test_import_with_an_alias_codebook_exports_only_the_official_keys(cli, tmp_path):
    # tiny-64's architecture (ch 32, z 8, V 64); an FVAR user keeps a fresh alias codebook on import
    p = load_preset("tiny-64", ["tokenizer.alias_vocab_size=0", "teacher.enabled=false"])
    sd = _randomized(Tokenizer(p.tokenizer, p.patch_nums), seed=1).official_state_dict()
    torch.save(sd, tmp_path / "vae.pth")
    r = cli("convert", "import", str(tmp_path / "vae.pth"), "--out", str(tmp_path / "tok"), "--preset", "tiny-64",
            "--set", "tokenizer.alias_vocab_size=16")
    assert r.code == 0, r.err
    c = load_checkpoint(tmp_path / "tok")
    assert c.preset.tokenizer.alias_vocab_size == 16
    assert all(k in c.state_dict for k in EXTENSION_KEYS)  # the alias codebook lives in the fvar checkpoint
    assert cli("convert", "export", str(tmp_path / "tok"), "--out", str(tmp_path / "out.pth")).code == 0
    _same_official(sd, torch.load(tmp_path / "out.pth", weights_only=True))


def test_import_into_an_existing_checkpoint_needs_overwrite_and_then_replaces_it(cli, tmp_path, official_vae):
    src, _ = official_vae
    out = tmp_path / "tok"
    assert cli("convert", "import", str(src), "--out", str(out)).code == 0
    before = (out / "config.json").read_bytes()
    line = _one_line_error(cli("convert", "import", str(src), "--out", str(out)))
    assert "already holds a tokenizer checkpoint" in line and "--overwrite" in line
    assert (out / "config.json").read_bytes() == before
    first = json.loads(before)["provenance"]["created"]
    assert cli("convert", "import", str(src), "--out", str(out), "--overwrite").code == 0
    assert json.loads((out / "config.json").read_text())["provenance"]["created"] >= first
    assert sorted(os.listdir(tmp_path)) == ["tok"]


def test_pickled_objects_are_refused(cli, tmp_path):
    evil = tmp_path / "evil.pth"
    torch.save({"encoder.conv_in.weight": torch.ones(1), "payload": Opaque()}, evil)
    line = _one_line_error(cli("convert", "import", str(evil), "--out", str(tmp_path / "out")))
    assert "refused" in line and "pickled Python objects" in line and "weights_only=True" in line
    assert not (tmp_path / "out").exists()


def test_garbage_pth_is_refused(cli, tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(os.urandom(4096))
    line = _one_line_error(cli("convert", "import", str(junk), "--out", str(tmp_path / "out")))
    assert "not a readable PyTorch checkpoint" in line
    assert not (tmp_path / "out").exists()


def test_missing_source_is_refused(cli, tmp_path):
    line = _one_line_error(cli("convert", "import", str(tmp_path / "nope.pth"), "--out", str(tmp_path / "o")))
    assert "no such file" in line


def test_weights_that_do_not_fit_the_preset_are_refused(cli, tmp_path, official_vae):
    src, _ = official_vae
    # the user's override wins over the inferred architecture, and the strict loader catches it
    line = _one_line_error(cli("convert", "import", str(src), "--out", str(tmp_path / "o"),
                               "--set", "tokenizer.ch=64"))
    assert "does not fit the tokenizer" in line and "shape mismatch" in line
    assert not (tmp_path / "o").exists()


def test_import_refuses_to_overwrite_a_folder_that_is_not_a_checkpoint(cli, tmp_path, official_vae):
    src, _ = official_vae
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "log.txt").write_text("precious")
    line = _one_line_error(cli("convert", "import", str(src), "--out", str(tmp_path / "run")))
    assert "not an fvar checkpoint; refusing" in line
    assert (tmp_path / "run" / "log.txt").read_text() == "precious"


def test_export_of_a_pth_or_a_teacher_is_refused(cli, tmp_path, official_vae):
    src, _ = official_vae
    line = _one_line_error(cli("convert", "export", str(src), "--out", str(tmp_path / "x.pth")))
    assert "is not an fvar checkpoint" in line and "fvar convert import" in line
    save_checkpoint(tmp_path / "t", kind="teacher", preset=load_preset("tiny-32"), state_dict={"w": torch.ones(1)})
    line = _one_line_error(cli("convert", "export", str(tmp_path / "t"), "--out", str(tmp_path / "x.pth")))
    assert "teacher checkpoint" in line
    assert not (tmp_path / "x.pth").exists()


# --------------------------------------------------------------------------- VAR transformer
def _official_var(tmp_path: Path) -> tuple[Path, dict]:
    p = load_preset("tiny-64", ["teacher.enabled=false"])
    model = VAR(p.model, p.patch_nums, p.tokenizer.vocab_size, p.tokenizer.z_channels)
    sd = model.official_state_dict()
    path = tmp_path / "var_tiny.pth"
    torch.save(sd, path)
    return path, sd


def test_var_import_export_round_trip_is_exact(cli, tmp_path):
    src, sd = _official_var(tmp_path)
    # no var-d2 preset matches: the default preset's sequence length does not fit, and says so
    line = _one_line_error(cli("convert", "import", str(src), "--out", str(tmp_path / "v")))
    assert "30 tokens per image" in line and "--preset" in line
    r = cli("convert", "import", str(src), "--out", str(tmp_path / "v"), "--preset", "tiny-64",
            "--set", "teacher.enabled=false")
    assert r.code == 0, r.err
    assert "var checkpoint" in r.out and "depth=2" in r.out and "width=64" in r.out
    c = load_checkpoint(tmp_path / "v", expect_kind="var")
    assert (c.preset.model.depth, c.preset.model.width, c.preset.model.num_classes) == (2, 64, 10)
    assert cli("convert", "export", str(tmp_path / "v"), "--out", str(tmp_path / "back.pth")).code == 0
    _same_official(sd, torch.load(tmp_path / "back.pth", weights_only=True))


def test_import_refuses_to_replace_a_checkpoint_of_another_kind(cli, tmp_path, official_vae):
    vae, _ = official_vae
    var_src, _ = _official_var(tmp_path)
    out = tmp_path / "ck"
    assert cli("convert", "import", str(var_src), "--out", str(out), "--preset", "tiny-64",
               "--set", "teacher.enabled=false").code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    for extra in ((), ("--overwrite",)):  # --overwrite replaces the same kind only
        line = _one_line_error(cli("convert", "import", str(vae), "--out", str(out), *extra))
        assert "holds a var checkpoint" in line and "refusing to replace it with a tokenizer" in line
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_export_onto_an_existing_file_needs_overwrite(cli, tmp_path, official_vae):
    src, sd = official_vae
    assert cli("convert", "import", str(src), "--out", str(tmp_path / "tok")).code == 0
    target = tmp_path / "keep.pth"
    target.write_bytes(b"precious")
    line = _one_line_error(cli("convert", "export", str(tmp_path / "tok"), "--out", str(target)))
    assert "exists" in line and "--overwrite" in line and target.read_bytes() == b"precious"
    assert cli("convert", "export", str(tmp_path / "tok"), "--out", str(target), "--overwrite").code == 0
    _same_official(sd, torch.load(target, weights_only=True))
