"""Evaluation plumbing below the CLI: Inception weights (path, torch hub cache, offline error, bad
files), image sets (ADM crop, sample folders, ADM .npz), references (stored statistics, cached
.npz features, resolution and extractor checks). The real Inception weights are not on these
machines: the tests make their own (evalkit.inception_weights) and never reach the network."""
from __future__ import annotations

import dataclasses

import datetime
import json
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fvar_core.eval import features
from fvar_core.eval import refstats
from fvar_core.errors import UserError
from fvar_core.eval.imagesets import adm_center_crop, open_npz, samples_folder, var_center_crop

from .evalkit import image_folder, inception_weights


@pytest.fixture
def weights(tmp_path_factory) -> Path:
    return inception_weights(tmp_path_factory)


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No weights anywhere: an empty torch hub cache and a download that fails as offline would."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.delenv(features.ENV_WEIGHTS, raising=False)

    def no_network(url, dst, *a, **k):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)


@pytest.fixture
def cache(monkeypatch, tmp_path) -> Path:
    monkeypatch.setenv(refstats.ENV_CACHE, str(tmp_path / "cache"))
    return tmp_path / "cache"


# ------------------------------------------------------------------------------------ weights
def test_weights_given_by_path_are_hashed_and_marked_not_official(weights):
    info = features.resolve_weights(weights)
    assert info.source == "path" and info.path == str(weights.resolve())
    assert len(info.sha256) == 64 and not info.official


def test_offline_without_weights_is_one_line_naming_both_ways_out(offline):
    with pytest.raises(UserError) as e:
        features.load_extractor(None)
    msg = str(e.value)
    assert "\n" not in msg and "--feature-weights" in msg and features.ENV_WEIGHTS in msg
    assert "name resolution" in msg and "weights-inception-2015-12-05-6726825d.pth" in msg


def test_weights_in_torch_hubs_cache_are_used_without_a_download(offline, weights):
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    hub.mkdir(parents=True)
    (hub / features.official_filename()).symlink_to(weights)
    info = features.resolve_weights(None)
    assert info.source == "torch-hub cache" and not info.official  # our file's hash is not torch-fidelity's


def test_a_missing_weights_file_is_an_error_not_a_fallback(offline, tmp_path):
    with pytest.raises(UserError, match="no such file"):
        features.resolve_weights(tmp_path / "nope.pth")


def test_weights_with_pickled_objects_or_of_another_model_are_refused(tmp_path):
    bad = tmp_path / "pickled.pth"
    torch.save({"w": torch.zeros(1), "when": datetime.datetime(2020, 1, 1)}, bad)
    with pytest.raises(UserError, match="not a plain PyTorch state dict"):
        features.load_extractor(bad)
    other = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(2, 2)}, other)
    with pytest.raises(UserError, match="do not fit torch-fidelity's InceptionV3"):
        features.load_extractor(other)


# ---------------------------------------------------------------------------------- image sets
def test_adm_crop_resizes_the_short_side_and_centre_crops():
    rng = np.random.default_rng(0)
    big = Image.fromarray(rng.integers(0, 256, (300, 140, 3), dtype=np.uint8))  # W 140, H 300
    out = adm_center_crop(big, 32)  # BOX-halved twice (140 → 70 → 35), then BICUBIC to short side 32
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    same = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    np.testing.assert_array_equal(adm_center_crop(Image.fromarray(same), 32), same)  # already R × R: untouched
    assert var_center_crop(big, 32).shape == (32, 32, 3)


def test_sample_folders_must_hold_images_of_one_size(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no image files"):
        samples_folder(tmp_path / "empty")
    mixed = image_folder(tmp_path / "mixed", 3, sizes=[(32, 32), (32, 32), (40, 32)])
    with pytest.raises(UserError, match="mixed sizes: 000000.png is 32×32, 000002.png is 40×32"):
        samples_folder(mixed)
    fs = samples_folder(image_folder(tmp_path / "ok", 3, size=24))
    assert fs.size == (24, 24) and len(fs.files) == 3


def _npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


def test_npz_batches_in_adms_layout_are_checked_without_reading_images(tmp_path):
    imgs = np.random.default_rng(0).integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
    npz = open_npz(_npz(tmp_path / "ok.npz", arr_0=imgs, arr_1=np.arange(5)))
    assert (npz.count, npz.size, npz.has_stats) == (5, (16, 16), False)
    np.testing.assert_array_equal(np.concatenate(list(npz.batches(2))), imgs)  # streamed in batches of 2
    cases = {
        "no arr_0 (arrays: mu, sigma)": _npz(tmp_path / "a.npz", mu=np.zeros(4), sigma=np.eye(4)),
        "arr_0 is float32": _npz(tmp_path / "b.npz", arr_0=imgs.astype(np.float32)),
        "arr_0 is uint8 (5, 16, 16)": _npz(tmp_path / "c.npz", arr_0=imgs[..., 0]),
        "has mu without sigma": _npz(tmp_path / "d.npz", arr_0=imgs, mu=np.zeros(2048)),
    }
    for msg, path in cases.items():
        with pytest.raises(UserError, match=msg.replace("(", r"\(").replace(")", r"\)")):
            open_npz(path)
    (tmp_path / "e.npz").write_bytes(b"not a zip")
    with pytest.raises(UserError, match="not an .npz file"):
        open_npz(tmp_path / "e.npz")


# ---------------------------------------------------------------------------------- references
def test_npz_with_stored_statistics_uses_them_and_caches_arr0_features(tmp_path, cache, weights, monkeypatch):
    imgs = np.random.default_rng(1).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    mu, sigma = np.arange(2048.0), np.eye(2048) * 2.0
    path = _npz(tmp_path / "VIRTUAL_test.npz", arr_0=imgs, mu=mu, sigma=sigma)
    ex = features.load_extractor(weights)
    # the test's weights are not the official Inception: stored statistics would compare two networks
    ours = refstats.open_reference(str(path), (32, 32), ex, need_features=False)
    assert "not these" in ours.fid_statistics and not np.array_equal(ours.mu, mu)
    ex.weights = dataclasses.replace(ex.weights, official=True)  # as with torch-fidelity's own file
    ref = refstats.open_reference(str(path), (32, 32), ex, need_features=False)
    assert ref.features is None and "stored mu/sigma" in ref.fid_statistics  # FID alone reads no image
    np.testing.assert_array_equal(ref.mu, mu)
    np.testing.assert_array_equal(ref.sigma, sigma)
    first = refstats.open_reference(str(path), (32, 32), ex, need_features=True)
    assert first.features.shape == (5, 2048) and first.features.dtype == np.float32

    def no_extractor(*a, **k):
        raise AssertionError("features should come from the cache")
    monkeypatch.setattr(features.InceptionFeatures, "__call__", no_extractor)
    again = refstats.open_reference(str(path), (32, 32), ex, need_features=True)
    np.testing.assert_array_equal(again.features, first.features)
    assert len(list((cache / "npz-features").iterdir())) == 1


def test_references_at_another_resolution_are_refused_before_any_work(tmp_path, cache):
    imgs = np.zeros((4, 32, 32, 3), np.uint8)
    path = _npz(tmp_path / "r32.npz", arr_0=imgs)
    with pytest.raises(UserError, match="r32.npz is 32×32 but the samples are 48×48"):
        refstats.check_reference(str(path), (48, 48))
    d = cache / "refs" / "imagenet-stats"
    d.mkdir(parents=True)
    (d / "ref.json").write_text(json.dumps({"format": refstats.FORMAT, "version": 1, "name": "imagenet-stats",
                                            "resolution": 256}))
    with pytest.raises(UserError, match=r"built at --res 256\) is 256×256 but the samples are 64×64.*--res 64"):
        refstats.check_reference("imagenet-stats", (64, 64))
    with pytest.raises(UserError, match="no reference named 'other'.*built: imagenet-stats"):
        refstats.check_reference("other", (64, 64))


def test_a_named_reference_built_with_other_weights_is_refused(tmp_path, cache, weights):
    d = cache / "refs" / "old"
    d.mkdir(parents=True)
    (d / "ref.json").write_text(json.dumps({"format": refstats.FORMAT, "version": 1, "name": "old", "resolution": 32,
                                            "extractor": {"weights": {"sha256": "0" * 64}}}))
    ex = features.load_extractor(weights)
    with pytest.raises(UserError, match="built with other Inception weights"):
        refstats.open_reference("old", (32, 32), ex, need_features=False)
