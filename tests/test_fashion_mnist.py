"""Fashion-MNIST: IDX parsing (real files where installed), refusal of bad files, the exported
ImageFolder, the checked download path (offline, against a local copy) and the error lines."""
from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pytest

from fvar_core.data import fashion_mnist as fm
from fvar_core.data.folders import scan_image_folder
from fvar_core.errors import UserError

REAL = fm.DEBIAN_DIR
needs_real = pytest.mark.skipif(not all((REAL / f"{n}.gz").is_file() for n in fm.GZ_MD5),
                                reason="Debian's dataset-fashion-mnist is not installed (apt-get install "
                                       "dataset-fashion-mnist)")


def idx_bytes(arr: np.ndarray) -> bytes:
    return struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


def write_fake_source(folder: Path) -> Path:
    """Four valid IDX .gz files of the real sizes: image i of a split is filled with i % 251,
    label i % 10 (not Fashion-MNIST's content, so its checksums do not match)."""
    folder.mkdir(parents=True, exist_ok=True)
    for img_name, lab_name, n in fm.SPLITS.values():
        labels = (np.arange(n) % 10).astype(np.uint8)
        images = np.broadcast_to((np.arange(n) % 251).astype(np.uint8)[:, None, None], (n, 28, 28)).copy()
        for name, arr in ((img_name, images), (lab_name, labels)):
            with gzip.open(folder / f"{name}.gz", "wb", compresslevel=1) as f:
                f.write(idx_bytes(arr))
    return folder


@pytest.fixture(scope="module")
def fake_source(tmp_path_factory) -> Path:
    return write_fake_source(tmp_path_factory.mktemp("fake-fmnist"))


# ----------------------------------------------------------------------------------- parsing
@needs_real
def test_real_idx_files_have_the_official_counts_per_class():
    for split, per in (("train", 6000), ("test", 1000)):
        images, labels = fm.load_split(REAL, split)
        assert images.shape == (10 * per, 28, 28) and images.dtype == np.uint8
        assert np.bincount(labels, minlength=10).tolist() == [per] * 10
        assert 60 < images.mean() < 90  # real garments on black: neither blank nor noise
    for name in fm.GZ_MD5:
        fm.verify_gz(REAL / f"{name}.gz", name)  # Debian's copy carries the official content


def test_idx_header_and_length_are_checked():
    good = idx_bytes(np.zeros((3, 28, 28), np.uint8))
    assert fm.parse_idx(good, "x", 3, 3, (28, 28)).shape == (3, 28, 28)
    cases = {
        "magic": (b"\x00\x00\x09\x03" + good[4:], "not an IDX file"),
        "ndim": (idx_bytes(np.zeros((3, 784), np.uint8)), "not an IDX file"),
        "count": (good, "items, expected 4"),
        "truncated": (good[:-5], "truncated or padded"),
        "short": (good[:6], "too short"),
    }
    for what, (raw, msg) in cases.items():
        count = 4 if what == "count" else 3
        with pytest.raises(UserError, match=msg):
            fm.parse_idx(raw, what, 3, count, (28, 28))


def test_truncated_or_corrupt_gzip_is_one_line(tmp_path, fake_source):
    src = tmp_path / "src"
    src.mkdir()
    for name in fm.GZ_MD5:
        (src / f"{name}.gz").write_bytes((fake_source / f"{name}.gz").read_bytes())
    whole = (src / "t10k-images-idx3-ubyte.gz").read_bytes()
    (src / "t10k-images-idx3-ubyte.gz").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(UserError, match="truncated or corrupt gzip") as e:
        fm.load_split(src, "test")
    assert "\n" not in str(e.value)
    (src / "t10k-images-idx3-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(UserError, match="truncated or corrupt gzip"):
        fm.load_split(src, "test")


# ------------------------------------------------------------------------------------ export
def test_export_layout_sizes_and_manifest(tmp_path, fake_source):
    out = tmp_path / "fm"
    res = fm.export(out, source=fake_source, size=32, per_class=3)
    assert res.counts == {"train": [3] * 10, "test": [3] * 10}
    idx = scan_image_folder(out / "train")
    assert list(idx.classes) == [fm.class_folder(k) for k in range(10)]
    assert idx.classes[0] == "0-t-shirt-top" and idx.classes[9] == "9-ankle-boot"
    assert idx.class_counts() == [3] * 10
    from PIL import Image

    # class 1's first train image is item 1 (label 1 % 10): value 1 in the 28×28 centre, 0 in the pad
    im = np.asarray(Image.open(out / "train" / "1-trouser" / "00001.png"))
    assert im.shape == (32, 32, 3) and im[2:30, 2:30].min() == im[2:30, 2:30].max() == 1 and im[:2].max() == 0
    assert json.loads((out / "classes.json").read_text())["classes"][3] == "3-dress"
    doc = json.loads((out / fm.MANIFEST).read_text())
    assert doc["size"] == 32 and doc["mode"] == "pad" and doc["per_class"] == 3
    with pytest.raises(UserError, match="holds an export with size 32"):
        fm.export(out, source=fake_source, size=64, per_class=3)


def test_a_killed_export_leaves_no_half_written_class_folder(tmp_path, fake_source, monkeypatch):
    out = tmp_path / "fm"
    real = fm.to_rgb
    calls = {"n": 0}

    def dying(*a, **k):
        calls["n"] += 1
        if calls["n"] == 8:  # in the middle of the third class folder
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(fm, "to_rgb", dying)
    with pytest.raises(KeyboardInterrupt):
        fm.export(out, source=fake_source, per_class=3, splits=("train",))
    visible = sorted(p.name for p in (out / "train").iterdir() if not p.name.startswith("."))
    assert visible == ["0-t-shirt-top", "1-trouser"]  # complete folders only
    assert scan_image_folder(out / "train").class_counts()[:2] == [3, 3]
    monkeypatch.setattr(fm, "to_rgb", real)
    fm.export(out, source=fake_source, per_class=3, splits=("train",))  # the rerun completes it
    assert scan_image_folder(out / "train").class_counts() == [3] * 10
    assert not [p for p in (out / "train").iterdir() if p.name.startswith(".")]


# ------------------------------------------------------------------------- sources, download
def test_download_is_checked_and_refuses_other_content(tmp_path, fake_source, monkeypatch):
    monkeypatch.setenv(fm.URL_ENV, fake_source.as_uri())
    with pytest.raises(UserError, match="checksum mismatch"):
        fm.download(tmp_path / "cache")
    assert not list((tmp_path / "cache").iterdir())  # nothing unverified is kept


@needs_real
def test_download_from_a_local_copy_of_the_official_files(tmp_path, monkeypatch):
    monkeypatch.setenv(fm.URL_ENV, REAL.as_uri())
    dest = fm.download(tmp_path / "cache")
    assert sorted(p.name for p in dest.iterdir()) == sorted(f"{n}.gz" for n in fm.GZ_MD5)
    assert fm.load_split(dest, "test")[1].shape == (10000,)


def test_offline_without_a_copy_names_both_ways_out(tmp_path, monkeypatch, cli):
    monkeypatch.setattr(fm, "DEBIAN_DIR", tmp_path / "no-debian")
    monkeypatch.setenv("FVAR_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv(fm.URL_ENV, (tmp_path / "unreachable").as_uri())
    r = cli("data", "fashion-mnist", "--out", str(tmp_path / "out"))
    assert r.code == 2 and r.err.count("\n") == 1
    assert "apt-get install dataset-fashion-mnist" in r.err and "--source DIR" in r.err
    r = cli("data", "fashion-mnist", "--out", str(tmp_path / "out"), "--no-download")
    assert r.code == 2 and "no local copy" in r.err and "--source DIR" in r.err


def test_cli_bad_input_is_one_line(tmp_path, cli, fake_source):
    for args, msg in ((["--source", str(tmp_path / "nope")], "no such folder"),
                      (["--source", str(tmp_path)], "missing"),
                      (["--source", str(fake_source), "--mode", "stretch"], "choose pad or resize"),
                      (["--source", str(fake_source), "--size", "16"], "padding needs at least 28"),
                      (["--source", str(fake_source), "--split", "val"], "unknown Fashion-MNIST split")):
        r = cli("data", "fashion-mnist", "--out", str(tmp_path / "o"), *args)
        assert r.code == 2 and r.err.count("\n") == 1 and msg in r.err, (args, r.err)
        assert "Traceback" not in r.err
    (tmp_path / "afile").write_text("x")
    r = cli("data", "fashion-mnist", "--out", str(tmp_path / "afile"), "--source", str(fake_source))
    assert r.code == 2 and "not a folder" in r.err
