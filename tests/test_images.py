"""Image input: good files load, every kind of bad file is a one-line UserError."""
from __future__ import annotations

import errno

import numpy as np
import pytest
import torch
from PIL import Image

from fvar_core import atomic
from fvar_core.errors import UserError
from fvar_core.atomic import atomic_write_bytes
from fvar_core.data.images import fit_square, load_image, save_png

from .conftest import png_claiming_size


def _photo(path, size=(40, 30), mode="RGB"):
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(arr).convert(mode).save(path)
    return arr


def test_png_round_trip_is_exact(tmp_path):
    arr = _photo(tmp_path / "a.png")
    x = load_image(tmp_path / "a.png")
    assert x.shape == (3, 30, 40) and x.dtype == torch.float32
    assert torch.equal((x * 255).round().to(torch.uint8).permute(1, 2, 0), torch.from_numpy(arr))
    save_png(x, tmp_path / "b.png")
    assert torch.equal(load_image(tmp_path / "b.png"), x)


def test_greyscale_and_alpha_become_rgb(tmp_path):
    _photo(tmp_path / "g.png", mode="L")
    _photo(tmp_path / "a.png", mode="RGBA")
    assert load_image(tmp_path / "g.png").shape[0] == 3
    assert load_image(tmp_path / "a.png").shape[0] == 3


def test_fit_square_resizes_shorter_side_and_centre_crops():
    x = torch.rand(3, 30, 60)
    y = fit_square(x, 16)
    assert y.shape == (3, 16, 16) and 0 <= y.min() and y.max() <= 1
    same = torch.rand(3, 8, 8)
    assert torch.equal(fit_square(same, 8), same)


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        load_image(tmp_path / "nope.png")


def test_not_an_image(tmp_path):
    (tmp_path / "notes.png").write_text("these are not pixels")
    with pytest.raises(UserError, match="not an image"):
        load_image(tmp_path / "notes.png")


def test_truncated_png(tmp_path):
    _photo(tmp_path / "full.png", size=(64, 64))
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="corrupt or truncated"):
        load_image(tmp_path / "cut.png")


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    bomb = png_claiming_size(tmp_path / "bomb.png", 100_000, 100_000)
    with pytest.raises(UserError, match="decompression bomb"):
        load_image(bomb)


def test_atomic_write_keeps_old_file_when_disk_is_full(tmp_path, monkeypatch):
    target = tmp_path / "out.png"
    target.write_bytes(b"old")

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(atomic.os, "fsync", full)
    with pytest.raises(UserError, match="no space left"):
        atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.png"], "temporary file left behind"
