"""Token shards: format round trip, exact decode, resume, refusal to mix runs, `fvar tokenize`."""
from __future__ import annotations

import json
from importlib.metadata import EntryPoint
from pathlib import Path

import numpy as np
import pytest
import torch

from fvar_cli.app import GROUP, build_app, run
from fvar_core.data.folders import ImageFolderDataset, scan_image_folder, validate
from fvar_core.errors import UserError
from fvar_core.presets import load_preset
from fvar_core.hashing import tensors_sha256
from fvar_core.data.shards import ShardWriter, TokenShards, shard_name, tokenize_dataset
from fvar_core.models.tokenizer import Tokenizer

from .test_data import add_bad_files, make_folder, var_eval_crop


def tiny(*overrides: str):
    return load_preset("tiny-64", list(overrides))


def tiny_tokenizer(preset, seed: int = 0) -> Tokenizer:
    torch.manual_seed(seed)
    return Tokenizer(preset.tokenizer, preset.patch_nums).eval()


@pytest.fixture
def folder(tmp_path):
    return make_folder(tmp_path / "data", per_class=3)


def eval_dataset(folder: Path, preset) -> ImageFolderDataset:
    good, _ = validate(scan_image_folder(folder))
    return ImageFolderDataset(good, preset.resolution, preset.data.mid_reso, train=False)


def shard_files(d: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(d.glob("shard-*.npy"))}


# ------------------------------------------------------------------------------ the format
def _meta(n_images: int, L: int = 30, vocab: int = 64, alias: int = 16):
    return {"patch_nums": [1, 2, 3, 4], "seq_len": L, "vocab_size": vocab, "alias_vocab_size": alias,
            "structure_dtype": "uint16" if vocab <= 65536 else "int32",
            "alias_dtype": ("uint16" if alias <= 65536 else "int32") if alias else None,
            "preset": "tiny-64", "preset_config": {}, "tokenizer": {"path": None, "tensors_sha256": "x"},
            "flip": False, "variants": 1, "classes": ["a", "b"],
            "images": {"count": n_images, "fingerprint": "f"}, "noise_batch": None}


def test_round_trip_written_tokens_equal_read_tokens_memory_mapped(tmp_path):
    rng = np.random.default_rng(0)
    w = ShardWriter(tmp_path / "s", _meta(5), shard_size=3)
    assert w.num_shards == 2
    st = [rng.integers(0, 64, (3, 30)), rng.integers(0, 64, (2, 30))]
    al = [rng.integers(0, 16, (3, 30)), rng.integers(0, 16, (2, 30))]
    lb = [np.array([0, 1, 1]), np.array([0, 0])]
    for s in range(2):
        w.write(s, st[s], al[s], lb[s], np.arange(3 * s, 3 * s + len(lb[s])), images=len(lb[s]))
    shards = TokenShards(tmp_path / "s")
    assert len(shards) == 5 and shards.has_alias and shards.classes == ["a", "b"]
    raw = np.load(tmp_path / "s" / "shard-00000.structure.npy", mmap_mode="r")
    assert raw.dtype == np.uint16 and isinstance(shards._structure[0], np.memmap)
    assert np.load(tmp_path / "s" / "shard-00000.labels.npy").dtype == np.int64
    all_st, all_al, all_lb = np.concatenate(st), np.concatenate(al), np.concatenate(lb)
    for i in range(5):
        s, a, y = shards[i]
        assert s.dtype == torch.int64 and s.shape == (30,)
        assert np.array_equal(s.numpy(), all_st[i]) and np.array_equal(a.numpy(), all_al[i]) and y == all_lb[i]
    assert np.array_equal(shards.labels(), all_lb)
    assert [t.shape for t in shards.per_scale(shards[4][0])] == [(1,), (4,), (9,), (16,)]
    man = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert man["format"] == "fvar-token-shards" and man["version"] == 1 and man["complete"] and man["total"] == 5
    assert man["shards"] == [{"name": "shard-00000", "count": 3, "images": 3, "skipped": 0, "complete": True},
                             {"name": "shard-00001", "count": 2, "images": 2, "skipped": 0, "complete": True}]
    with pytest.raises(IndexError):
        shards[5]


def test_big_vocabularies_use_int32_and_no_alias_file_without_alias_codebook(tmp_path):
    w = ShardWriter(tmp_path / "s", _meta(2, vocab=70000, alias=0), shard_size=4)
    tokens = np.array([[69999] * 30, [65536] * 30])
    w.write(0, tokens, None, np.zeros(2), np.arange(2), images=2)
    shards = TokenShards(tmp_path / "s")
    assert np.load(tmp_path / "s" / "shard-00000.structure.npy").dtype == np.int32
    assert not (tmp_path / "s" / "shard-00000.alias.npy").exists()
    s, a, _ = shards[0]
    assert a is None and int(s[0]) == 69999 and int(shards[1][0][0]) == 65536


def test_reader_refuses_incomplete_and_foreign_folders(tmp_path):
    w = ShardWriter(tmp_path / "s", _meta(5), shard_size=3)
    w.write(0, np.zeros((3, 30)), np.zeros((3, 30)), np.zeros(3), np.arange(3), images=3)
    with pytest.raises(UserError, match=r"incomplete \(1 of 2 shards\)"):
        TokenShards(tmp_path / "s")
    assert len(TokenShards(tmp_path / "s", allow_incomplete=True)) == 3
    with pytest.raises(UserError, match="no manifest.json"):
        TokenShards(tmp_path)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.txt").write_text("x")
    with pytest.raises(UserError, match="not a token-shard folder"):
        ShardWriter(tmp_path / "junk", _meta(5), shard_size=3)


# ------------------------------------------------------------------------------ tokenizing
def test_shards_decode_to_exactly_the_tokenizers_own_reconstruction(tmp_path, folder):
    preset = tiny("pyramid.noise=false")
    tok = tiny_tokenizer(preset)
    ds = eval_dataset(folder, preset)
    stats = tokenize_dataset(tok, preset, ds, tmp_path / "s", batch_size=4, shard_size=5)
    assert stats.images == 9 and stats.items == 9 and stats.shards_written == 2 and not stats.skipped
    shards = TokenShards(tmp_path / "s")
    assert len(shards) == 9 and shards.manifest["tokenizer"]["tensors_sha256"] == tensors_sha256(tok)
    for i in range(len(shards)):
        structure, alias, label = shards[i]
        x = var_eval_crop(ds.index.files[i], 64)[None]           # the image, cropped independently
        direct = tok.encode_with_pyramid(x, preset.pyramid, 64)  # (1, pn²) per scale
        assert label == ds.index.labels[i]
        assert torch.equal(structure, torch.cat(direct.structure, 1)[0])
        assert torch.equal(alias, torch.cat(direct.alias, 1)[0])
        from_shards = tok.idx_to_img(shards.per_scale(structure[None]))
        assert torch.equal(from_shards, tok.idx_to_img(direct.structure))
        # the encoder's own running f̂ sums the same terms in another order: equal to float rounding
        with torch.no_grad():
            assert torch.allclose(from_shards, tok.fhat_to_img(direct.fhat[-1]), atol=1e-4)


def test_manifests_written_before_the_rename_keep_their_fingerprint_and_resume(tmp_path, folder):
    # Until v0.2 the tokenizer's tensors hash was stored as tokenizer.sha256 (renamed tensors_sha256:
    # a checkpoint's provenance sha256 hashes a file). Old folders must read, fingerprint and resume alike.
    preset = tiny("pyramid.noise=false")
    tok = tiny_tokenizer(preset)
    ds = eval_dataset(folder, preset)
    tokenize_dataset(tok, preset, ds, tmp_path / "s", batch_size=4, shard_size=5)
    new = TokenShards(tmp_path / "s")
    man = tmp_path / "s" / "manifest.json"
    doc = json.loads(man.read_text())
    doc["tokenizer"]["sha256"] = doc["tokenizer"].pop("tensors_sha256")
    man.write_text(json.dumps(doc))
    old = TokenShards(tmp_path / "s")
    assert old.tokenizer_sha256 == new.tokenizer_sha256 == tensors_sha256(tok)
    assert old.fingerprint() == new.fingerprint()
    stats = tokenize_dataset(tok, preset, ds, tmp_path / "s", batch_size=4, shard_size=5)  # a rerun: nothing to do
    assert stats.shards_written == 0


def test_flip_stores_the_mirror_as_the_next_item(tmp_path, folder):
    preset = tiny("pyramid.noise=false")
    tok = tiny_tokenizer(preset)
    ds = eval_dataset(folder, preset)
    tokenize_dataset(tok, preset, ds, tmp_path / "s", batch_size=4, shard_size=4, flip=True)
    shards = TokenShards(tmp_path / "s")
    assert len(shards) == 18 and shards.manifest["flip"] and shards.manifest["variants"] == 2
    for j in (0, 5, 8):
        x = var_eval_crop(ds.index.files[j], 64)[None]
        for v, img in enumerate((x, x.flip(-1))):
            s, _, y = shards[2 * j + v]
            ref = torch.cat(tok.encode_with_pyramid(img, preset.pyramid, 64).structure, 1)[0]
            assert torch.equal(s, ref) and y == ds.index.labels[j]


def test_resume_after_interruption_ends_with_the_uninterrupted_content(tmp_path, folder):
    preset = tiny()  # with the pyramid's β noise: its stream must be reproducible too
    assert preset.pyramid.noise
    tok = tiny_tokenizer(preset)
    ds = eval_dataset(folder, preset)
    tokenize_dataset(tok, preset, ds, tmp_path / "ref", batch_size=2, shard_size=4)

    class Stop(Exception):
        pass

    def stop_after_first_shard(done, total):
        if done >= 4:
            raise Stop

    with pytest.raises(Stop):
        tokenize_dataset(tok, preset, ds, tmp_path / "s", batch_size=2, shard_size=4, progress=stop_after_first_shard)
    man = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert [e["name"] for e in man["shards"] if e["complete"]] == ["shard-00000"] and not man["complete"]
    first = tmp_path / "s" / f"{shard_name(0)}.structure.npy"
    before = first.stat()

    calls = []
    stats = tokenize_dataset(tok, preset, ds, tmp_path / "s", batch_size=2, shard_size=4,
                             progress=lambda d, n: calls.append(d))
    assert stats.shards_resumed == 1 and stats.shards_written == 2 and stats.images == 5
    assert calls[0] == 4 and calls[-1] == 9
    after = first.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)  # not written twice
    assert shard_files(tmp_path / "s") == shard_files(tmp_path / "ref")
    assert json.loads((tmp_path / "s" / "manifest.json").read_text())["shards"] == \
        json.loads((tmp_path / "ref" / "manifest.json").read_text())["shards"]
    again = tokenize_dataset(tok, preset, ds, tmp_path / "s", batch_size=2, shard_size=4)
    assert again.images == 0 and again.shards_written == 0 and again.total_items == 9


def test_resume_with_different_inputs_is_refused_naming_the_field(tmp_path, folder):
    preset = tiny("pyramid.noise=false")
    tok = tiny_tokenizer(preset)
    ds = eval_dataset(folder, preset)
    out = tmp_path / "s"
    tokenize_dataset(tok, preset, ds, out, batch_size=4, shard_size=5)
    with pytest.raises(UserError, match="different flip"):
        tokenize_dataset(tok, preset, ds, out, batch_size=4, shard_size=5, flip=True)
    with pytest.raises(UserError, match=r"different preset_config\.pyramid\.rho_max"):
        tokenize_dataset(tok, tiny("pyramid.noise=false", "pyramid.rho_max=2"), ds, out, batch_size=4, shard_size=5)
    with pytest.raises(UserError, match=r"different tokenizer\.tensors_sha256"):
        tokenize_dataset(tiny_tokenizer(preset, seed=1), preset, ds, out, batch_size=4, shard_size=5)
    with pytest.raises(UserError, match="different shard_size"):
        tokenize_dataset(tok, preset, ds, out, batch_size=4, shard_size=3)
    with pytest.raises(UserError, match="different images"):
        tokenize_dataset(tok, preset, ImageFolderDataset(ds.index.subset(range(8)), 64, train=False), out,
                         batch_size=4, shard_size=5)
    # without noise the batch size does not matter: a resume may use another
    stats = tokenize_dataset(tok, preset, ds, out, batch_size=2, shard_size=5)
    assert stats.shards_resumed == 2 and stats.images == 0


def test_unreadable_files_are_skipped_and_counted_while_tokenizing(tmp_path, folder):
    preset = tiny("pyramid.noise=false")
    tok = tiny_tokenizer(preset)
    add_bad_files(folder / "shapes")
    good, bad = validate(scan_image_folder(folder))
    assert len(bad) == 3
    ds = ImageFolderDataset(good, 64, train=False)
    stats = tokenize_dataset(tok, preset, ds, tmp_path / "s", batch_size=4, shard_size=100)
    assert [p.name for p, _ in stats.skipped] == ["zz_half.jpg"]  # verify cannot see it; decode does
    shards = TokenShards(tmp_path / "s")
    assert len(shards) == 9 and shards.manifest["shards"][0]["skipped"] == 1
    src = np.load(tmp_path / "s" / "shard-00000.source.npy")
    assert len(set(src.tolist())) == 9  # no item stored twice in place of the bad one


# ------------------------------------------------------------------------------------- CLI
def _app():
    # The command as pyproject.toml registers it (test below), independent of how fresh the
    # installed entry-point metadata is; a second command keeps Typer from collapsing to one.
    return build_app([EntryPoint("presets", "fvar_cli.commands.presets:app", GROUP),
                      EntryPoint("tokenize", "fvar_cli.commands.tokenize:app", GROUP)])


def _save_tiny_tokenizer(path: Path):
    from fvar_core.checkpoints import save_checkpoint

    preset = tiny("pyramid.noise=false")
    tok = tiny_tokenizer(preset)
    save_checkpoint(path, kind="tokenizer", preset=preset, state_dict=tok.state_dict())
    return tok


def test_cli_tokenize_writes_shards_reports_throughput_and_skips(tmp_path, folder, capsys):
    tok = _save_tiny_tokenizer(tmp_path / "tok")
    add_bad_files(folder / "gradient")
    app = _app()
    argv = ["tokenize", "--tokenizer", str(tmp_path / "tok"), "--data", str(folder), "--out", str(tmp_path / "s"),
            "--batch", "4", "--shard-size", "5", "--device", "cpu", "--flip", "--encode-chunk", "3"]
    code = run(app, argv)
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "images/s" in out and "skipped 4 unreadable file(s)" in out
    assert "notes.jpg" in err
    shards = TokenShards(tmp_path / "s")
    assert len(shards) == 18
    assert shards.manifest["tokenizer"] == {"path": str((tmp_path / "tok").resolve()), "tensors_sha256": tensors_sha256(tok)}
    assert json.loads((tmp_path / "s" / "classes.json").read_text())["classes"] == ["gradient", "shapes", "strokes"]
    assert run(app, argv) == 0  # a rerun keeps everything
    assert "2 kept from an earlier run" in capsys.readouterr().out


def test_cli_tokenize_errors_are_one_line(tmp_path, folder, capsys):
    app = _app()
    code = run(app, ["tokenize", "--tokenizer", str(tmp_path / "none"), "--data", str(folder),
                     "--out", str(tmp_path / "s")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "no checkpoint" in err
    _save_tiny_tokenizer(tmp_path / "tok")
    (tmp_path / "empty").mkdir()
    code = run(app, ["tokenize", "--tokenizer", str(tmp_path / "tok"), "--data", str(tmp_path / "empty"),
                     "--out", str(tmp_path / "s"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and "is empty" in err and err.count("\n") == 1
    code = run(app, ["tokenize", "--tokenizer", str(tmp_path / "tok"), "--data", str(folder),
                     "--out", str(tmp_path / "s"), "--encode-chunk", "0"])
    err = capsys.readouterr().err
    assert code == 2 and "--encode-chunk" in err and err.count("\n") == 1 and not (tmp_path / "s").exists()
    code = run(app, ["tokenize", "--tokenizer", str(tmp_path / "tok"), "--data", str(folder),
                     "--out", str(tmp_path / "s"), "--encode-precision", "fp16"])
    err = capsys.readouterr().err
    assert code == 2 and "--encode-precision 'fp16'" in err and err.count("\n") == 1 and not (tmp_path / "s").exists()


def test_tokenize_is_declared_as_an_fvar_command():
    import tomllib

    doc = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert doc["project"]["entry-points"][GROUP]["tokenize"] == "fvar_cli.commands.tokenize:app"
