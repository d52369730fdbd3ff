"""Experiment tracking: a tiny run with --log-with tensorboard writes event files whose scalars are
metrics.jsonl's, and its sample grids as images; `fvar plot` draws the curves without a tracker."""
from __future__ import annotations

import json
import math

import pytest
from PIL import Image

from .helpers import make_folder

ARGS = ["--preset", "tiny-64", "--steps", "4", "--batch", "4", "--device", "cpu", "--set", "tokenizer_train.log_every=1",
        "--set", "tokenizer_train.sample_every=2", "--set", "tokenizer_train.ckpt_every=4"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from fvar_cli.app import build_app, run as run_cli

    root = tmp_path_factory.mktemp("track")
    data = make_folder(root / "data", per_class=4, size=64)
    out = root / "tok"
    assert run_cli(build_app(), ["train-tokenizer", "--data", str(data), "--out", str(out), "--log-with",
                                 "tensorboard", *ARGS]) == 0
    return out


def test_tensorboard_events_hold_the_metrics_jsonl_scalars_and_the_sample_grids(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    ea.Reload()
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [ln["step"] for ln in lines] == [1, 2, 3, 4]
    tags = set(ea.Tags()["scalars"])
    for key in ("loss", "recon", "psnr", "lr", "grad_norm"):
        assert key in tags
        events = ea.Scalars(key)
        assert [e.step for e in events] == [ln["step"] for ln in lines]
        assert all(math.isclose(e.value, ln[key], rel_tol=1e-6, abs_tol=1e-12) for e, ln in zip(events, lines))
    images = ea.Images("samples")
    assert [i.step for i in images] == [2, 4]
    grid = Image.open(run / "samples" / "step-0000004.png")
    assert (images[-1].width, images[-1].height) == grid.size


def test_plot_draws_the_curves(cli, run, tmp_path):
    r = cli("plot", str(run), "--out", str(tmp_path / "c.png"))
    assert r.code == 0, r.err
    img = Image.open(tmp_path / "c.png")
    assert img.format == "PNG" and img.size[0] > 400
    r = cli("plot", str(run), "--metrics", "loss,nope")
    assert r.code == 2 and "no metric 'nope'" in r.err and r.err.count("\n") == 1
    r = cli("plot", str(tmp_path))
    assert r.code == 2 and "has no metrics.jsonl" in r.err


def test_unknown_or_missing_tracker_is_one_line(cli, tmp_path, monkeypatch):
    data = make_folder(tmp_path / "data", per_class=2, size=64)
    r = cli("train-tokenizer", "--data", str(data), "--out", str(tmp_path / "t"), "--log-with", "mlflow", *ARGS)
    assert r.code == 2 and "log_with" in r.err and r.err.count("\n") == 1
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "wandb" else real(n, *a))
    r = cli("train-tokenizer", "--data", str(data), "--out", str(tmp_path / "w"), "--log-with", "wandb", *ARGS)
    assert r.code == 2 and "needs the wandb package" in r.err and not (tmp_path / "w" / "checkpoints").exists()
