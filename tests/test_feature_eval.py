"""The offline evaluation: the classifier learns, its checkpoint round-trips, feature-space
metrics behave (a set against itself ≈ 0), and the CLI's errors are one line."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fvar_core.eval.classifier import ClassifierConfig, augment, load_classifier, predict, train_classifier
from fvar_core.errors import UserError
from fvar_core.eval.feature_metrics import evaluate_sets, folder_set, format_table, sample_set
from fvar_core.data.images import save_png

from .test_fashion_mnist import REAL, needs_real

TINY = ClassifierConfig(widths=(8, 16, 16), feature_dim=16, epochs=4, batch_size=16, resolution=16, lr=1e-2)


def bars_folder(root: Path, per_class: int = 12, size: int = 16, seed: int = 0) -> Path:
    """Two classes anyone can tell apart: a bright horizontal bar vs a vertical one, at random
    positions, on noise."""
    g = torch.Generator().manual_seed(seed)
    for c, name in enumerate(("horizontal", "vertical")):
        for i in range(per_class):
            img = torch.rand(3, size, size, generator=g) * 0.2
            p = int(torch.randint(2, size - 4, (1,), generator=g))
            if c == 0:
                img[:, p:p + 3, :] = 1.0
            else:
                img[:, :, p:p + 3] = 1.0
            save_png(img, root / name / f"{i:03d}.png")
    return root


def test_classifier_learns_and_its_checkpoint_round_trips(tmp_path):
    train = bars_folder(tmp_path / "train", per_class=24)
    val = bars_folder(tmp_path / "val", per_class=10, seed=1)
    res = train_classifier(train, tmp_path / "clf", TINY, val=val, device="cpu")
    assert res.val_accuracy is not None and res.val_accuracy >= 0.9
    clf = load_classifier(tmp_path / "clf", device="cpu")
    assert clf.classes == ["horizontal", "vertical"] and len(clf.weights_sha256) == 64
    vs = folder_set(val, 16, "val")
    _, pred = predict(clf.net, vs.images)
    assert float((pred == torch.tensor([clf.classes.index(c) for c in vs.classes])).float().mean()) == \
        pytest.approx(res.val_accuracy)
    cfg = json.loads((tmp_path / "clf" / "config.json").read_text())
    assert cfg["kind"] == "classifier" and "preset" not in cfg
    assert cfg["metrics"]["val_accuracy"] == pytest.approx(res.val_accuracy)
    # the same seed gives the same weights (deterministic on CPU)
    train_classifier(train, tmp_path / "clf2", TINY, device="cpu")
    train_classifier(train, tmp_path / "clf3", TINY, device="cpu")
    # (compared as tensors: safetensors writes its metadata map in no fixed order, so file hashes differ)
    c2, c3 = (load_classifier(tmp_path / n) for n in ("clf2", "clf3"))
    a, b = c2.net.state_dict(), c3.net.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # ... and the identity every report names is the weights', so it is the same for both
    assert c2.weights_sha256 == c3.weights_sha256


def test_augment_shifts_with_zero_fill_and_flips():
    x = torch.zeros(64, 1, 5, 5, dtype=torch.uint8)
    x[:, :, 2, 2] = 255
    y = augment(x, 1, True, torch.Generator().manual_seed(0))
    assert y.shape == x.shape and y.dtype == torch.uint8
    assert (y.flatten(1) == 255).sum(1).eq(1).all()  # one bright pixel survives, moved by ≤ 1
    pos = (y[:, 0] == 255).nonzero()[:, 1:]
    assert ((pos - 2).abs() <= 1).all() and len({tuple(p.tolist()) for p in pos}) > 3


@needs_real
def test_classifier_on_a_small_real_subset_is_clearly_above_chance(tmp_path):
    from fvar_core.data import fashion_mnist as fm

    fm.export(tmp_path / "fm", source=REAL, per_class=60)
    cfg = ClassifierConfig(widths=(8, 16, 32), feature_dim=32, epochs=3, batch_size=32)
    res = train_classifier(tmp_path / "fm" / "train", tmp_path / "clf", cfg, val=tmp_path / "fm" / "test")
    assert res.val_accuracy >= 0.5  # chance is 0.1


def test_feature_metrics_of_a_set_against_itself_are_zero_and_a_shifted_set_is_worse(tmp_path):
    train = bars_folder(tmp_path / "train", per_class=24)
    train_classifier(train, tmp_path / "clf", TINY, device="cpu")
    clf = load_classifier(tmp_path / "clf")
    ref = folder_set(train, 16, "ref")
    dark = folder_set(bars_folder(tmp_path / "other", per_class=24, seed=3), 16, "other")
    dark.images = (dark.images // 3)  # same classes, another distribution
    rep = evaluate_sets(clf, ref, [ref, dark], kid_subsets=10, kid_subset_size=20)
    same, other = rep["rows"]
    assert abs(same["fid"]) < 1e-6 and same["precision"] == 1.0 and same["recall"] == 1.0
    assert other["fid"] > 1e-2
    # KID is unbiased: ≈ 0 for one distribution (up to its subset noise), far above that for another
    assert abs(same["kid"]["mean"]) < 0.1 * other["kid"]["mean"]
    assert "not Inception" in rep["caveat"] and rep["feature_net"]["weights_sha256"] == clf.weights_sha256
    table = format_table(rep)
    assert table.count("\n| ") == 2 and "| ref | 48 | 100.0% | 0.00 |" in table and "not Inception" in table


def test_sample_folder_classes_come_from_the_sidecar(tmp_path):
    folder = tmp_path / "s"
    for i in range(4):
        save_png(torch.rand(3, 16, 16), folder / f"{i:04d}-x.png")
    entries = [{"file": f"{i:04d}-x.png", "class": i % 2} for i in range(4)]
    (folder / "samples.json").write_text(json.dumps({"images": entries}))
    s = sample_set(folder, ["horizontal", "vertical"], 16)
    assert s.classes == ["horizontal", "vertical"] * 2 and s.images.shape == (4, 3, 16, 16)
    with pytest.raises(UserError, match="has no name"):
        sample_set(folder, ["horizontal"], 16)


def test_cli_classifier_and_feature_net_errors_are_one_line(tmp_path, cli):
    train = bars_folder(tmp_path / "train", per_class=6)
    r = cli("eval", "classifier", "train", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "c"))
    assert r.code == 2 and r.err.count("\n") == 1
    (tmp_path / "one" / "only").mkdir(parents=True)
    save_png(torch.rand(3, 16, 16), tmp_path / "one" / "only" / "a.png")
    r = cli("eval", "classifier", "train", "--data", str(tmp_path / "one"), "--out", str(tmp_path / "c"))
    assert r.code == 2 and "at least two classes" in r.err
    r = cli("eval", "--feature-net", str(tmp_path / "nope"), "--ref", str(train), "--samples", str(train))
    assert r.code == 2 and r.err.count("\n") == 1 and "no checkpoint" in r.err
    r = cli("eval", "--feature-net", str(tmp_path / "nope"), "--ref", "imagenet-stats", "--samples", str(train))
    assert r.code == 2 and "labelled image folder" in r.err
