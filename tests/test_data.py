"""Image folders: scanning, the class index, VAR's crops, reproducible items, unreadable files."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from fvar_core.data.folders import (ImageFolderDataset, check_image_file, read_class_index, resized_size,
                            scan_image_folder, validate, validation_report, write_class_index)
from fvar_core.errors import UserError


# ------------------------------------------------------------------------------ test images
def draw_image(kind: str, w: int, h: int, seed: int) -> Image.Image:
    """Shapes, gradients or text-like strokes: structured content, so crops and flips differ."""
    rng = np.random.default_rng(seed)
    if kind == "gradient":
        x = np.linspace(0, 1, w)[None, :, None]
        y = np.linspace(0, 1, h)[:, None, None]
        c = rng.random(3)
        arr = (255 * (x * c + y * (1 - c)) ** (0.5 + rng.random())).clip(0, 255).astype(np.uint8)
        return Image.fromarray(np.broadcast_to(arr, (h, w, 3)).copy())
    im = Image.new("RGB", (w, h), tuple(int(v) for v in rng.integers(0, 256, 3)))
    d = ImageDraw.Draw(im)
    for _ in range(6):
        x0, y0 = int(rng.integers(0, w - 4)), int(rng.integers(0, h - 4))
        x1, y1 = x0 + int(rng.integers(4, w // 2)), y0 + int(rng.integers(4, h // 2))
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        if kind == "shapes":
            (d.ellipse if rng.random() < 0.5 else d.rectangle)((x0, y0, x1, y1), fill=fill)
        else:  # strokes: lines like handwriting
            pts = [(int(rng.integers(0, w)), int(rng.integers(0, h))) for _ in range(5)]
            d.line(pts, fill=fill, width=int(rng.integers(1, 4)))
            d.text((x0, y0), "fvar", fill=fill)
    return im


def make_folder(root: Path, per_class: int = 3, classes=("strokes", "gradient", "shapes")) -> Path:
    """root/<class>/img_i.(png|jpg) with varied sizes and modes (non-square, greyscale, RGBA)."""
    sizes = [(80, 100), (120, 72), (64, 64), (96, 90), (150, 70)]
    for c, name in enumerate(classes):  # created out of sorted order on purpose
        d = root / name
        d.mkdir(parents=True)
        for i in range(per_class):
            w, h = sizes[(i + c) % len(sizes)]
            im = draw_image(name, w, h, seed=100 * c + i)
            if i % 3 == 1:
                im.save(d / f"img_{i}.jpg", quality=92)
            elif i % 3 == 2:
                im.convert("L" if c % 2 else "RGBA").save(d / f"img_{i}.png")
            else:
                im.save(d / f"img_{i}.png")
    return root


def add_bad_files(folder: Path) -> dict:
    """A corrupt JPEG, a truncated PNG, text named .jpg, and a JPEG cut off halfway (which only a
    decode notices); returns {name: path}."""
    buf = io.BytesIO()
    draw_image("shapes", 80, 80, 7).save(buf, "JPEG")
    jpg = buf.getvalue()
    buf = io.BytesIO()
    draw_image("gradient", 80, 80, 8).save(buf, "PNG")
    png = buf.getvalue()
    rng = np.random.default_rng(0)
    files = {
        "corrupt_jpeg": (folder / "corrupt.jpg", jpg[:20] + rng.integers(0, 256, len(jpg) - 20, dtype=np.uint8).tobytes()),
        "truncated_png": (folder / "truncated.png", png[: len(png) // 2]),
        "text": (folder / "notes.jpg", b"this is not an image\n"),
        "truncated_jpeg": (folder / "zz_half.jpg", jpg[: len(jpg) // 2]),
    }
    for path, data in files.values():
        path.write_bytes(data)
    return {k: p for k, (p, _) in files.items()}


def var_eval_crop(path: Path, R: int, mid_reso: float = 1.125) -> torch.Tensor:
    """VAR's val transform written out independently: LANCZOS shorter side → CenterCrop → [-1, 1]."""
    im = Image.open(path).convert("RGB")
    w, h = im.size
    mid = round(mid_reso * R)
    size = (mid, int(mid * h / w)) if w <= h else (int(mid * w / h), mid)
    im = im.resize(size, Image.LANCZOS)
    top, left = int(round((size[1] - R) / 2.0)), int(round((size[0] - R) / 2.0))
    arr = np.asarray(im.crop((left, top, left + R, top + R)), dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1) * 2 - 1


# ------------------------------------------------------------------------------------ scan
def test_scan_classes_sorted_files_stable_and_labels(tmp_path):
    root = make_folder(tmp_path / "data")
    (root / "shapes" / "sub").mkdir()
    draw_image("shapes", 70, 70, 1).save(root / "shapes" / "sub" / "deep.PNG")  # recursive, any case
    (root / "shapes" / "readme.txt").write_text("not an image")
    (root / ".cache").mkdir()
    draw_image("shapes", 70, 70, 1).save(root / ".cache" / "x.png")             # hidden: not a class
    idx = scan_image_folder(root)
    assert idx.classes == ("gradient", "shapes", "strokes")
    assert list(idx.labels) == sorted(idx.labels)
    assert idx.class_counts() == [3, 4, 3]
    assert idx.ignored == 1
    rel = [f.relative_to(root).as_posix() for f in idx.files]
    assert rel[3:7] == ["shapes/img_0.png", "shapes/img_1.jpg", "shapes/img_2.png", "shapes/sub/deep.PNG"]
    again = scan_image_folder(root)
    assert again.files == idx.files and again.fingerprint() == idx.fingerprint()


def test_class_index_is_written_and_read_back(tmp_path):
    idx = scan_image_folder(make_folder(tmp_path / "data"))
    write_class_index(tmp_path / "classes.json", idx.classes)
    doc = json.loads((tmp_path / "classes.json").read_text())
    assert doc == {"format": "fvar-class-index", "version": 1, "classes": ["gradient", "shapes", "strokes"]}
    assert read_class_index(tmp_path / "classes.json") == ["gradient", "shapes", "strokes"]
    (tmp_path / "other.json").write_text('{"classes": []}')
    with pytest.raises(UserError, match="not an fvar class index"):
        read_class_index(tmp_path / "other.json")


def test_flat_folder_is_one_class_named_after_it(tmp_path):
    flat = tmp_path / "cats"
    flat.mkdir()
    for i in range(2):
        draw_image("shapes", 70, 80, i).save(flat / f"{i}.png")
    idx = scan_image_folder(flat)
    assert idx.classes == ("cats",) and len(idx) == 2 and set(idx.labels) == {0}


def test_empty_or_imageless_folders_are_one_line_user_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="is empty"):
        scan_image_folder(tmp_path / "empty")
    with pytest.raises(UserError, match="no such data folder"):
        scan_image_folder(tmp_path / "missing")
    (tmp_path / "noimg" / "a").mkdir(parents=True)
    (tmp_path / "noimg" / "a" / "x.txt").write_text("x")
    with pytest.raises(UserError, match="no image files") as e:
        scan_image_folder(tmp_path / "noimg")
    assert "\n" not in str(e.value)


# -------------------------------------------------------------------------------- transforms
def test_resize_rule_is_torchvisions():
    assert resized_size(100, 80, 72) == (90, 72)
    assert resized_size(80, 100, 72) == (72, 90)
    assert resized_size(333, 500, 288) == (288, 432)  # int(288·500/333) = 432 (truncation, not round)


def test_var_crop_sizes_eval_is_the_centre_crop_train_a_crop_of_the_resized_image(tmp_path):
    root = make_folder(tmp_path / "data")
    idx = scan_image_folder(root)
    R = 64
    val = ImageFolderDataset(idx, R, mid_reso=1.125, train=False)
    train = ImageFolderDataset(idx, R, mid_reso=1.125, train=True, seed=3)
    for i in range(len(idx)):
        x, y = val[i]
        assert x.shape == (3, R, R) and x.dtype == torch.float32 and y == idx.labels[i]
        assert torch.allclose(x, var_eval_crop(idx.files[i], R), atol=1e-6)
        xt, _ = train[i]
        assert xt.shape == (3, R, R) and -1 <= xt.min() and xt.max() <= 1
        # the random crop is some R×R window of the 72-px-short-side LANCZOS resize
        im = Image.open(idx.files[i]).convert("RGB")
        big = np.asarray(im.resize(resized_size(*im.size, 72), Image.LANCZOS), dtype=np.float32) / 127.5 - 1
        target = xt.permute(1, 2, 0).numpy()
        hits = [(t, l) for t in range(big.shape[0] - R + 1) for l in range(big.shape[1] - R + 1)
                if np.allclose(big[t:t + R, l:l + R], target, atol=1e-6)]
        assert hits, f"train item {i} is not a crop of the resized image"


def test_items_are_deterministic_for_seed_epoch_and_index(tmp_path):
    idx = scan_image_folder(make_folder(tmp_path / "data", classes=("gradient", "shapes")))
    a = ImageFolderDataset(idx, 64, train=True, hflip=True, seed=7)
    b = ImageFolderDataset(idx, 64, train=True, hflip=True, seed=7)
    order = list(range(len(idx)))
    xa = [a[i][0] for i in order]
    xb = [b[i][0] for i in reversed(order)][::-1]  # access order does not matter
    assert all(torch.equal(p, q) for p, q in zip(xa, xb))
    a.set_epoch(1)
    changed = [not torch.equal(a[i][0], xa[i]) for i in order]
    assert any(changed), "a new epoch must draw new crops/flips"
    b.set_epoch(1)
    assert all(torch.equal(a[i][0], b[i][0]) for i in order)
    c = ImageFolderDataset(idx, 64, train=True, hflip=True, seed=8)
    assert any(not torch.equal(c[i][0], xa[i]) for i in order)


def test_hflip_mirrors_some_items_and_never_changes_anything_else(tmp_path):
    idx = scan_image_folder(make_folder(tmp_path / "data", per_class=4))
    plain = ImageFolderDataset(idx, 64, train=False)
    flipped = ImageFolderDataset(idx, 64, train=False, hflip=True, seed=1)
    seen = set()
    for epoch in range(3):
        flipped.set_epoch(epoch)
        for i in range(len(idx)):
            x, ref = flipped[i][0], plain[i][0]
            if torch.equal(x, ref):
                seen.add("plain")
            else:
                assert torch.equal(x, ref.flip(-1))
                seen.add("mirror")
    assert seen == {"plain", "mirror"}


# ----------------------------------------------------------------------------- bad files
def test_bad_files_are_reported_and_skipped_and_the_run_goes_on(tmp_path):
    root = make_folder(tmp_path / "data")
    bad = add_bad_files(root / "shapes")
    idx = scan_image_folder(root)
    assert len(idx) == 13
    good, reported = validate(idx)
    names = {p.name: r for p, r in reported}
    assert set(names) == {"corrupt.jpg", "truncated.png", "notes.jpg"}  # header-deep: the half JPEG passes
    assert "not an image" in names["notes.jpg"] and "truncated" in names["truncated.png"]
    assert all("\n" not in r for r in names.values())
    assert len(good) == 10 and good.classes == idx.classes
    report = validation_report(reported, len(idx))
    assert report.startswith("skipping 3 of 13")
    # a full decode catches the half JPEG as well
    _, deep = validate(idx, decode=True)
    assert {p.name for p, _ in deep} == {"corrupt.jpg", "truncated.png", "notes.jpg", "zz_half.jpg"}
    assert check_image_file(bad["truncated_jpeg"]) is None and check_image_file(bad["truncated_jpeg"], decode=True)

    # decode failures in __getitem__ fall back to the next good item and are recorded
    ds = ImageFolderDataset(good, 64, train=False)
    i = [f.name for f in good.files].index("zz_half.jpg")
    x, y = ds[i]
    x_next, y_next = ds[(i + 1) % len(good)]
    assert torch.equal(x, x_next) and y == y_next
    assert list(ds.failures) == [bad["truncated_jpeg"]]
    items = [ds[j] for j in range(len(ds))]  # the whole epoch runs
    assert len(items) == len(good)
    with pytest.raises(UserError, match="zz_half.jpg"):
        ds.load(i)


def test_nothing_readable_is_a_user_error(tmp_path):
    d = tmp_path / "data" / "a"
    d.mkdir(parents=True)
    (d / "x.png").write_bytes(b"nope")
    with pytest.raises(UserError, match="none of the 1 image files"):
        validate(scan_image_folder(tmp_path / "data"))


def test_from_config_follows_the_preset_and_never_flips_for_evaluation(tmp_path):
    from fvar_core.presets import load_preset

    idx = scan_image_folder(make_folder(tmp_path / "data", classes=("shapes",)))
    data = load_preset("tiny-64", ["data.hflip=true", "data.mid_reso=1.5"]).data
    train = ImageFolderDataset.from_config(idx, 64, data, train=True)
    val = ImageFolderDataset.from_config(idx, 64, data, train=False)
    assert (train.hflip, train.mid_reso, train.train) == (True, 1.5, True)
    assert (val.hflip, val.train) == (False, False)
