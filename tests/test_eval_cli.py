"""`fvar eval` end to end: samples folder against a folder and the equivalent ADM .npz, named
references (`ref build|list|show`), a checkpoint (generate, kill, resume), tokenizer
reconstruction, folder alias figures, and the one-line errors. Inception weights are the
tests' own (passed through FVAR_FEATURE_WEIGHTS); nothing reaches the network."""
from __future__ import annotations

import json
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

from fvar_core.sample import outputs as sample_outputs
from fvar_core.eval.features import ENV_WEIGHTS

from .evalkit import folder_arrays, image_folder, inception_weights, tiny_var_checkpoint


@pytest.fixture
def env(monkeypatch, tmp_path, tmp_path_factory) -> Path:
    """Test weights through the environment variable, a private cache, no network."""
    monkeypatch.setenv(ENV_WEIGHTS, str(inception_weights(tmp_path_factory)))
    monkeypatch.setenv("FVAR_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))

    def no_network(*a, **k):
        raise urllib.error.URLError("offline (test)")
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    return tmp_path


def _one_line_error(r, *needles: str) -> None:
    assert r.code == 2, (r.code, r.out, r.err)
    lines = [ln for ln in r.err.splitlines() if ln.startswith("fvar: error:")]
    assert len(lines) == 1 and "Traceback" not in r.err, r.err
    for n in needles:
        assert n in lines[0], (n, lines[0])


def test_samples_against_a_folder_and_the_equivalent_adm_npz_give_the_same_numbers(cli, env):
    samples = image_folder(env / "samples", 6, size=32, seed=1)
    ref = image_folder(env / "ref", 6, size=32, seed=2)
    np.savez(env / "ref.npz", arr_0=folder_arrays(ref))  # ADM's layout: arr_0 uint8 (N, H, W, 3)

    r = cli("eval", "--samples", str(samples), "--ref", str(ref), "--json", str(env / "a.json"))
    assert r.code == 0, r.err
    assert "FID" in r.out and "precision" in r.out
    a = json.loads((env / "a.json").read_text())
    r = cli("eval", "--samples", str(samples), "--ref", str(env / "ref.npz"))
    assert r.code == 0, r.err
    b = json.loads((samples / "eval-ref.json").read_text())  # the default report path

    assert a["metrics"]["fid"] > 0
    assert b["metrics"]["fid"] == pytest.approx(a["metrics"]["fid"], rel=1e-6)
    for k in ("precision", "recall"):
        assert b["metrics"][k] == a["metrics"][k]
    assert b["metrics"]["kid"]["mean"] == pytest.approx(a["metrics"]["kid"]["mean"], rel=1e-6, abs=1e-12)
    assert b["metrics"]["isc"] == a["metrics"]["isc"]
    # the protocol: extractor and its weights' hash, counts, resize, reference identity
    w = a["protocol"]["extractor"]["weights"]
    assert w["sha256"] and w["official"] is False and w["source"] == "path"
    assert "bilinear" in a["protocol"]["extractor"]["resize"]
    assert a["samples"]["count"] == 6 and a["samples"]["size"] == [32, 32]
    assert a["reference"]["kind"] == "folder" and b["reference"]["kind"] == "npz"
    assert "computed from arr_0" in b["reference"]["fid_statistics"] and b["reference"]["count"] == 6
    assert a["protocol"]["metrics"]["prc"]["k"] == 3 and a["protocol"]["metrics"]["kid"]["subset_size"] == 6


def test_an_adm_npz_with_stored_statistics_gives_the_folders_fid(cli, env, monkeypatch):
    """ADM's full layout — arr_0 plus the mu/sigma of the same images — through --feature-weights
    (not the environment variable). With weights that are not the official Inception the stored
    statistics are not used (they would be another network's), and the FID equals the folder's."""
    from fvar_core.eval.features import load_extractor
    from fvar_core.eval.refstats import open_reference

    weights = Path(__import__("os").environ[ENV_WEIGHTS])
    monkeypatch.delenv(ENV_WEIGHTS)
    samples = image_folder(env / "samples", 4, size=32, seed=3)
    ref = image_folder(env / "ref", 4, size=32, seed=4)
    stats = open_reference(str(ref), (32, 32), load_extractor(weights), need_features=False)
    np.savez(env / "adm.npz", arr_0=folder_arrays(ref), mu=stats.mu, sigma=stats.sigma)
    reports = {}
    for name, spec in (("folder", ref), ("npz", env / "adm.npz")):
        r = cli("eval", "--samples", str(samples), "--ref", str(spec), "--feature-weights", str(weights),
                "--metrics", "fid,prc", "--json", str(env / f"{name}.json"))
        assert r.code == 0, r.err
        reports[name] = json.loads((env / f"{name}.json").read_text())
    a, b = reports["folder"], reports["npz"]
    assert "belong to the official Inception weights" in b["reference"]["fid_statistics"]
    assert b["metrics"]["fid"] == pytest.approx(a["metrics"]["fid"], rel=1e-6) and a["metrics"]["fid"] > 0
    assert (b["metrics"]["precision"], b["metrics"]["recall"]) == (a["metrics"]["precision"], a["metrics"]["recall"])
    assert b["protocol"]["extractor"]["weights"]["source"] == "path"


def _runs_with_checkpoint(root: Path, factory) -> Path:
    """runs/x/checkpoints/step-0000001: a complete tiny-64 var checkpoint (tokenizer inside)."""
    import shutil

    step = root / "runs" / "x" / "checkpoints" / "step-0000001"
    shutil.copytree(tiny_var_checkpoint(factory), step)
    torch.save({"step": 1}, step / "training_state.pt")
    return root / "runs"


def test_eval_ref_imagenet_stats_generates_from_the_newest_checkpoint_and_resumes_after_a_kill(
        cli, env, monkeypatch, tmp_path_factory):
    monkeypatch.setenv("FVAR_RUNS", str(_runs_with_checkpoint(env, tmp_path_factory)))
    data = image_folder(env / "data", 6, sizes=[(80, 64), (64, 96), (70, 70)], seed=3)
    r = cli("eval", "ref", "build", "--data", str(data), "--name", "imagenet-stats", "--res", "64",
            "--max-features", "5")
    assert r.code == 0, r.err
    assert "6 images at 64px" in r.out and "5 features kept" in r.out
    r = cli("eval", "ref", "list")
    assert r.code == 0 and "imagenet-stats" in r.out
    shown = json.loads(cli("eval", "ref", "show", "imagenet-stats").out)
    assert shown["count"] == 6 and shown["features_count"] == 5 and shown["preprocessing"]["crop"] == "adm"
    assert shown["extractor"]["weights"]["sha256"] and shown["source"]["path"] == str(data.resolve())
    ref_dir = env / "cache" / "refs" / "imagenet-stats"
    assert np.load(ref_dir / "sigma.npy").shape == (2048, 2048) and np.load(ref_dir / "features.npy").shape == (5, 2048)

    args = ("eval", "--ref", "imagenet-stats", "--num-samples", "4", "--per-class", "2", "--metrics", "isc,kid,prc",
            "--device", "cpu")
    real_save, saved = sample_outputs.save_png, []

    def killed_after_two(img, path):
        if len(saved) == 2:
            raise KeyboardInterrupt  # what a kill looks like to the sampler
        real_save(img, path)
        saved.append(Path(path))
    monkeypatch.setattr(sample_outputs, "save_png", killed_after_two)  # where the sampler looks it up
    r = cli(*args)
    assert r.code == 130
    out = env / "runs" / "eval" / "x-step-0000001-n4-s0"
    assert sorted(p.name for p in out.glob("*.png")) == ["000000.png", "000001.png"]
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}

    monkeypatch.setattr(sample_outputs, "save_png", real_save)
    r = cli(*args)
    assert r.code == 0, r.err
    assert "using the newest var checkpoint" in r.err and "step-0000001" in r.err
    assert "2 generated, 2 already there" in r.err
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.png") if p.name in before} == before
    assert len(list(out.glob("*.png"))) == 4
    rep = json.loads((out / "eval-imagenet-stats.json").read_text())
    assert rep["kind"] == "checkpoint" and rep["samples"]["count"] == 4 and rep["samples"]["size"] == [64, 64]
    assert 0.0 <= rep["metrics"]["precision"] <= 1.0 and rep["metrics"]["isc"]["mean"] >= 1.0 - 1e-9  # IS ≥ 1 (exp of a mean KL), up to rounding
    g = rep["protocol"]["generation"]
    assert g["seeds"] == {"base": 0, "rule": "image i has seed base + i"} and g["labels"]["classes"] == 2
    assert g["resumed_with"] == 2 and g["checkpoint"]["sha256"] and rep["reference"]["kind"] == "named"

    r = cli(*args, "--cfg", "3.0")  # other settings into the same folder: refused, not mixed
    _one_line_error(r, "different settings")


def test_a_reference_of_other_inception_weights_fails_before_anything_is_generated(cli, env, tmp_path_factory):
    data = image_folder(env / "data", 3, size=64, seed=6)
    assert cli("eval", "ref", "build", "--data", str(data), "--name", "r64", "--res", "64").code == 0
    sd = torch.load(inception_weights(tmp_path_factory), weights_only=True)
    k = next(k for k, v in sd.items() if v.is_floating_point())
    sd[k] = sd[k] + 1e-3  # the same network with other weights
    torch.save(sd, env / "other.pth")
    out = env / "gen"
    r = cli("eval", "--ckpt", str(tiny_var_checkpoint(tmp_path_factory)), "--ref", "r64", "--feature-weights",
            str(env / "other.pth"), "--num-samples", "2", "--per-class", "1", "--out", str(out), "--device", "cpu")
    _one_line_error(r, "other Inception weights", "r64")
    assert not out.exists() or not any(out.glob("*.png"))


def test_inception_score_alone_needs_no_reference_and_every_image_below_the_folder_counts(cli, env):
    samples = image_folder(env / "s", 3, size=32, seed=7)
    image_folder(samples / "more", 2, size=32, seed=8)  # images beside a sub-folder, and in it
    r = cli("eval", "--samples", str(samples), "--metrics", "isc", "--json", str(env / "is.json"))
    assert r.code == 0, r.err  # no reference named imagenet-stats exists, and none is needed
    rep = json.loads((env / "is.json").read_text())
    assert rep["samples"]["count"] == 5 and rep["reference"] is None and set(rep["metrics"]) == {"isc"}


def test_offline_without_weights_is_one_line_with_both_ways_out(cli, env, monkeypatch):
    monkeypatch.delenv(ENV_WEIGHTS)
    samples = image_folder(env / "s", 4, size=32)
    _one_line_error(cli("eval", "--samples", str(samples), "--ref", str(samples)),
                    "--feature-weights PATH", ENV_WEIGHTS, "offline")


@pytest.mark.parametrize("case", ["empty", "mixed", "npz-without-arrays", "other-resolution", "empty-reference",
                                  "metric", "both"])
def test_bad_input_is_one_line_and_exit_2(cli, env, case):
    s32 = image_folder(env / "s32", 4, size=32)
    if case == "empty":
        (env / "empty").mkdir()
        r, needles = cli("eval", "--samples", str(env / "empty"), "--ref", str(s32)), ("holds no image files",)
    elif case == "mixed":
        mixed = image_folder(env / "mixed", 2, sizes=[(32, 32), (48, 32)])
        r, needles = cli("eval", "--samples", str(mixed), "--ref", str(s32)), ("mixed sizes",)
    elif case == "npz-without-arrays":
        np.savez(env / "bad.npz", images=np.zeros((2, 32, 32, 3), np.uint8))
        r, needles = cli("eval", "--samples", str(s32), "--ref", str(env / "bad.npz")), ("has no arr_0", "images")
    elif case == "other-resolution":
        np.savez(env / "r64.npz", arr_0=np.zeros((4, 64, 64, 3), np.uint8))
        r, needles = cli("eval", "--samples", str(s32), "--ref", str(env / "r64.npz")), ("64×64", "32×32")
    elif case == "empty-reference":
        (env / "empty-ref").mkdir()
        r, needles = cli("eval", "--samples", str(s32), "--ref", str(env / "empty-ref")), ("empty",)
    elif case == "metric":
        r, needles = cli("eval", "--samples", str(s32), "--ref", str(s32), "--metrics", "fid,sfid"), ("--metrics",)
    else:
        r, needles = cli("eval", "--samples", str(s32), "--ckpt", str(s32), "--ref", str(s32)), ("not both",)
    _one_line_error(r, *needles)


def test_tokenizer_reconstruction_psnr_ssim_and_rfid(cli, env, tmp_path_factory, monkeypatch):
    tok = tiny_var_checkpoint(tmp_path_factory) / "tokenizer"
    data = image_folder(env / "d", 4, sizes=[(64, 64), (72, 80)], seed=4)
    r = cli("eval", "--tokenizer", str(tok), "--data", str(data), "--json", str(env / "rec.json"), "--device", "cpu")
    assert r.code == 0, r.err
    rep = json.loads((env / "rec.json").read_text())
    m = rep["metrics"]
    assert 0 < m["psnr"] < 60 and -1 <= m["ssim"] <= 1 and m["rfid"] is not None and m["rfid"] > 0
    assert rep["data"]["count"] == 4 and rep["protocol"]["rfid"]["weights"]["sha256"]

    monkeypatch.delenv(ENV_WEIGHTS)  # offline, no weights: PSNR/SSIM still, rFID skipped and said so
    r = cli("eval", "--tokenizer", str(tok), "--data", str(data), "--json", str(env / "rec2.json"), "--device", "cpu")
    assert r.code == 0, r.err
    assert "rFID skipped" in r.err
    rep2 = json.loads((env / "rec2.json").read_text())
    assert rep2["metrics"]["rfid"] is None and rep2["metrics"]["psnr"] == pytest.approx(m["psnr"])
    assert "--feature-weights" in rep2["protocol"]["rfid_skipped"]


def test_alias_figures_of_a_folder_are_per_scale_means(cli, env):
    data = image_folder(env / "a", 3, size=64, seed=5)
    r = cli("eval", "alias", str(data), "--preset", "tiny-64", "--json", str(env / "alias.json"))
    assert r.code == 0, r.err
    rep = json.loads((env / "alias.json").read_text())
    assert rep["count"] == 3 and [s["size"] for s in rep["scales"]] == [16, 32, 48, 64]
    from fvar_core.focus.alias import alias_report
    from fvar_core.data.images import fit_square, load_image
    from fvar_core.presets import load_preset

    p = load_preset("tiny-64")
    per = [alias_report(fit_square(load_image(f), 64), p.pyramid, p.patch_nums, 64)[0].leak_db_focus
           for f in sorted(data.glob("*.png"))]
    assert rep["scales"][0]["leak_db_focus"] == pytest.approx(float(np.mean(per)))
    # `fvar pyramid analyze` on the folder gives the same report (and a table without --json)
    r = cli("pyramid", "analyze", str(data), "--preset", "tiny-64", "--json")
    assert r.code == 0, r.err
    assert json.loads(r.out)["scales"] == rep["scales"]
    r = cli("pyramid", "analyze", str(data), "--preset", "tiny-64")
    assert r.code == 0 and "mean over 3 images" in r.out
