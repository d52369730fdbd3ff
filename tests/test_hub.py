"""Official weights by name through the Hugging Face Hub's cache — tested offline only, against a
cache built here (official-format files written from the fixture's keyed weights): download +
convert, pinned revisions, checksums, the offline miss, from_pretrained by name, and push."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import fvar
from fvar_core.hashing import file_sha256
from fvar_core.models import hub
from fvar_core.models.hub import HubFile, HubModel

from .test_sampler import build_keyed_model, keyed_tokenizer, load_manifest, load_ref

REPO = "FoundationVision/var"
REV = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory) -> Path:
    """A huggingface_hub cache holding the fixture's model as var_d2.pth + its VQ-VAE at REV (= main)."""
    cache = tmp_path_factory.mktemp("hf")
    snap = cache / f"models--{REPO.replace('/', '--')}" / "snapshots" / REV
    snap.mkdir(parents=True)
    torch.save(build_keyed_model(load_manifest()).official_state_dict(), snap / "var_d2.pth")
    torch.save(keyed_tokenizer(load_ref()).official_state_dict(), snap / "vae_ch32.pth")
    (snap.parent.parent / "refs").mkdir()
    (snap.parent.parent / "refs" / "main").write_text(REV)
    return cache


@pytest.fixture
def registry(hub_cache, monkeypatch, tmp_path):
    snap = hub_cache / f"models--{REPO.replace('/', '--')}" / "snapshots" / REV
    entry = HubModel(HubFile(REPO, "var_d2.pth", REV, file_sha256(snap / "var_d2.pth")),
                     HubFile(REPO, "vae_ch32.pth", REV, file_sha256(snap / "vae_ch32.pth")))
    monkeypatch.setitem(hub.REGISTRY, "var-tiny", entry)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")        # never the network
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setenv("FVAR_CACHE", str(tmp_path / "fvar-cache"))
    return entry, snap


def test_download_converts_a_pinned_checked_pair_that_samples_as_the_official_files(cli, registry, tmp_path):
    _, snap = registry
    r = cli("download", "var-tiny", "--out", str(tmp_path / "ck"))
    assert r.code == 0, r.err
    assert f"revision {REV}" in r.out and "sha256" in r.out
    pair = fvar.Pipeline.from_pretrained(tmp_path / "ck", device="cpu")
    direct = fvar.Pipeline.from_pretrained(snap / "var_d2.pth", tokenizer=snap / "vae_ch32.pth", device="cpu")
    assert torch.equal(pair.sample([207, 980], seed=0, output="tensor", top_k=900, top_p=0.96),
                       direct.sample([207, 980], seed=0, output="tensor", top_k=900, top_p=0.96))
    assert (tmp_path / "ck" / "README.md").is_file() and (tmp_path / "ck" / "tokenizer" / "README.md").is_file()
    assert cli("download", "var-tiny", "--out", str(tmp_path / "ck")).code == 0  # the same files: kept as they are


def test_from_pretrained_by_name_and_by_hf_uri_fetch_lazily(registry, tmp_path):
    by_name = fvar.Pipeline.from_pretrained("var-tiny", device="cpu")
    assert (tmp_path / "fvar-cache" / "hub" / "var-tiny" / "config.json").is_file()  # converted once, cached
    by_uri = fvar.Pipeline.from_pretrained(f"hf://{REPO}/var_d2.pth@{REV}", tokenizer=f"hf://{REPO}/vae_ch32.pth",
                                           device="cpu")
    assert torch.equal(by_name.sample([1], seed=2, output="tensor"), by_uri.sample([1], seed=2, output="tensor"))


@pytest.mark.parametrize("change, message", [
    ({"revision": "fedcba9876543210fedcba9876543210fedcba98"}, "is not in the Hugging Face cache and HF_HUB_OFFLINE is set"),
    ({"sha256": "0" * 64}, "has sha256"),
    ({"filename": "var_d99.pth"}, "is not in the Hugging Face cache"),
])
def test_pin_checksum_and_offline_miss_are_one_line_errors(cli, registry, tmp_path, monkeypatch, change, message):
    entry, _ = registry
    monkeypatch.setitem(hub.REGISTRY, "var-tiny", HubModel(HubFile(**{**entry.var.__dict__, **change}), entry.vae))
    r = cli("download", "var-tiny", "--out", str(tmp_path / "ck"))
    assert r.code == 2 and message in r.err and r.err.count("\n") == 1
    assert not (tmp_path / "ck").exists()


@pytest.mark.parametrize("args, message", [
    (["download", "var-d99"], "unknown model 'var-d99': known are"),
    (["push", "nowhere", "--repo", "me/x"], "nowhere"),
])
def test_bad_hub_commands_are_one_line(cli, registry, args, message):
    r = cli(*args)
    assert r.code == 2 and message in r.err and r.err.count("\n") == 1


def test_push_uploads_the_checkpoint_with_its_card_and_without_training_state(cli, registry, tmp_path, monkeypatch):
    import huggingface_hub

    assert cli("download", "var-tiny", "--out", str(tmp_path / "ck")).code == 0
    r = cli("push", str(tmp_path / "ck"), "--repo", "me/var-tiny")
    assert r.code == 2 and "HF_HUB_OFFLINE is set" in r.err
    calls = []

    class FakeApi:
        def create_repo(self, repo_id, **kw):
            calls.append(("create", repo_id))

        def upload_folder(self, **kw):
            calls.append(("upload", kw["repo_id"], sorted(p.name for p in Path(kw["folder_path"]).iterdir()),
                          kw["ignore_patterns"]))
            return type("Info", (), {"commit_url": "https://huggingface.co/me/var-tiny/commit/1"})()

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    r = cli("push", str(tmp_path / "ck"), "--repo", "me/var-tiny")
    assert r.code == 0, r.err
    assert calls[0] == ("create", "me/var-tiny") and "README.md" in calls[1][2] and "training_state.pt" in calls[1][3]
    assert "huggingface.co/me/var-tiny/commit/1" in r.out
