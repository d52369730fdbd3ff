"""`fvar pyramid visualize|analyze` end to end, including every kind of bad input."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from .conftest import png_claiming_size


def test_analyze_json_zone_plate_focus_leaks_20db_less_where_rho_at_least_1px(cli):
    r = cli("pyramid", "analyze", "zone-plate", "--json")
    assert r.code == 0, r.err
    doc = json.loads(r.out)
    assert doc["preset"] == "d16-256" and doc["pyramid"]["kernel"] == "disk"
    assert doc["pyramid"]["schedule"] == "cosine" and doc["pyramid"]["rho_max"] == 12.0
    scales = doc["scales"]
    assert [s["size"] for s in scales] == [16, 32, 48, 64, 80, 96, 128, 160, 208, 256]
    checked = [s for s in scales if s["rho"] >= 1.0]
    assert len(checked) == 8
    for s in checked:
        assert s["leak_db_area"] - s["leak_db_focus"] >= 20.0, s
        assert s["passband_focus"] <= s["passband_area"]


def test_analyze_table_and_kernel_flag(cli):
    r = cli("pyramid", "analyze", "chart", "--kernel", "gaussian", "--preset", "tiny-64")
    assert r.code == 0, r.err
    assert "leak area" in r.out and "gaussian" in r.out


def test_visualize_writes_a_png_figure(cli, tmp_path):
    out = tmp_path / "fig.png"
    r = cli("pyramid", "visualize", "zone-plate", "--out", str(out), "--schedule", "linear")
    assert r.code == 0, r.err
    with Image.open(out) as im:
        assert im.mode == "RGB" and im.width > im.height > 300


def test_visualize_a_photo_file_of_any_size(cli, tmp_path):
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (300, 500, 3), dtype=np.uint8)).save(tmp_path / "photo.jpg")
    r = cli("pyramid", "visualize", str(tmp_path / "photo.jpg"), "--out", str(tmp_path / "f.png"),
            "--preset", "tiny-64", "--noise")
    assert r.code == 0, r.err
    assert (tmp_path / "f.png").is_file()


def _bad_inputs(tmp_path):
    (tmp_path / "text.png").write_text("not pixels at all")
    Image.fromarray(np.zeros((64, 64, 3), np.uint8) + 100).save(tmp_path / "ok.png")
    data = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    png_claiming_size(tmp_path / "bomb.png", 60_000, 60_000)
    return {
        "missing": (str(tmp_path / "missing.png"), "no such file"),
        "not an image": (str(tmp_path / "text.png"), "not an image"),
        "truncated": (str(tmp_path / "cut.png"), "corrupt or truncated"),
        "bomb": (str(tmp_path / "bomb.png"), "decompression bomb"),
        "unknown built-in": ("zoneplate", "no such file or built-in image"),
    }


@pytest.mark.parametrize("command", ["visualize", "analyze"])
@pytest.mark.parametrize("case", ["missing", "not an image", "truncated", "bomb", "unknown built-in"])
def test_bad_image_is_one_line_exit_2(cli, tmp_path, command, case):
    path, message = _bad_inputs(tmp_path)[case]
    r = cli("pyramid", command, path, *(["--out", str(tmp_path / "x.png")] if command == "visualize" else []))
    assert r.code == 2
    assert r.err.count("\n") == 1 and message in r.err and "Traceback" not in r.err
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("args, message", [
    (["--preset", "d16-266"], "unknown preset 'd16-266'"),
    (["--set", "pyramid.rho_max"], "malformed --set"),
    (["--set", "pyramid.rho_max=-3"], "pyramid.rho_max"),
    (["--kernel", "airy"], "pyramid.kernel"),
])
def test_bad_preset_or_override_is_one_line_exit_2(cli, args, message):
    r = cli("pyramid", "analyze", "zone-plate", *args)
    assert r.code == 2 and r.err.count("\n") == 1 and message in r.err
