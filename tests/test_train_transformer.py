"""`fvar train` and `fvar distill` end to end on tiny-64 (CPU): overfitting, distillation, resume
equivalence, bad input, and a two-process `accelerate launch` run."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from fvar_core import checkpoints as ckpt_mod
from fvar_core.checkpoints import load_checkpoint, save_checkpoint
from fvar_core.models.loading import build_var
from fvar_core.data.folders import ImageFolderDataset, scan_image_folder, validate
from fvar_core.presets import load_preset
from fvar_core.runs import find_tokenizer
from fvar_core.data.shards import tokenize_dataset
from fvar_core.models.tokenizer import Tokenizer
from fvar_core.models.transformer import VAR
from fvar_core.runs import complete_checkpoints

from .helpers import accelerate_launch, kill_at_step, make_folder

FAST = ["train.precision=fp32", "train.log_every=5", "train.sample_every=0", "train.warmup_frac=0.05"]


def _sets(*items: str) -> list:
    return [a for s in items for a in ("--set", s)]


def _metrics(run: Path):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    """A tiny-64 tokenizer (random init: its tokens are still a fixed function of the images) and
    the token shards of 8 generated images in 2 classes, with mirrors."""
    root = tmp_path_factory.mktemp("var")
    preset = load_preset("tiny-64")
    torch.manual_seed(0)
    tok = Tokenizer(preset.tokenizer, preset.patch_nums)
    tok_dir = save_checkpoint(root / "tok", kind="tokenizer", preset=preset, state_dict=tok.state_dict(),
                              provenance={"source": "test"})
    data = make_folder(root / "data", per_class=4)
    good, _ = validate(scan_image_folder(data))
    ds = ImageFolderDataset.from_config(good, preset.resolution, preset.data, train=False)
    tokenize_dataset(tok, preset, ds, root / "shards", batch_size=8, flip=True, tokenizer_path=tok_dir)
    return root, tok_dir, root / "shards", data


def test_student_overfits_a_handful_of_token_sequences(tokens, cli):
    root, _, shards, data = tokens
    run = root / "overfit"
    r = cli("train", "--preset", "tiny-64", "--tokens", str(shards), "--out", str(run), "--steps", "150",
            *_sets(*FAST, "train.lr=2e-2", "train.batch_size=8", "model.cond_drop=0", "train.ckpt_every=150"))
    assert r.code == 0, r.err
    m = _metrics(run)
    assert m[0]["student_ce"] > 0.8 * math.log(64)
    assert m[-1]["student_ce"] < 0.25 * math.log(64), [x["student_ce"] for x in m]
    assert m[-1]["acc"] > 0.8
    # The checkpoint is a plain VAR checkpoint whose provenance finds the run's tokenizer copy.
    ck = load_checkpoint(run / "checkpoints" / "step-0000150", expect_kind="var")
    assert find_tokenizer(ck.path, ck.provenance).resolve() == (run / "tokenizer").resolve()
    assert (run / "checkpoints" / "best").read_text().strip() == "step-0000150"

    # What a user does next: sample and inpaint with the run itself (its tokenizer copy and
    # class index found through the checkpoint's provenance and the run directory).
    r = cli("sample", "--ckpt", str(run), "--class", "0,1", "--n", "2", "--out", str(root / "samples"),
            "--device", "cpu")
    assert r.code == 0, r.err
    side = json.loads((root / "samples" / "samples.json").read_text())
    assert [e["class_name"] for e in side["images"]] == ["shapes", "shapes", "strokes", "strokes"]
    assert (root / "samples" / "grid.png").is_file() and len(list((root / "samples").glob("0*.png"))) == 4
    image = sorted((data / "strokes").glob("*.png"))[0]
    r = cli("inpaint", "--ckpt", str(run), "--image", str(image), "--box", "0.25,0.25,0.75,0.75", "--class", "1",
            "--out", str(root / "edit"), "--device", "cpu")
    assert r.code == 0, r.err
    assert all((root / "edit" / f).is_file() for f in ("compare.png", "result.png", "edit.json"))


def test_distill_trains_both_and_saves_a_plain_student(tokens, cli, tmp_path):
    root, _, shards, _ = tokens
    run = tmp_path / "distill"
    r = cli("distill", "--preset", "tiny-64", "--tokens", str(shards), "--out", str(run), "--steps", "60",
            "--save-teacher", *_sets(*FAST, "train.lr=6e-2", "train.batch_size=8", "train.ckpt_every=60"))
    assert r.code == 0, r.err
    m = _metrics(run)
    for k in ("student_ce", "teacher_ce"):
        assert m[-1][k] < 0.7 * m[0][k], (k, m[0][k], m[-1][k])
    assert {"feat", "kd", "teacher_acc"} <= set(m[-1])
    ck = load_checkpoint(run / "checkpoints" / "step-0000060", expect_kind="var")
    student = build_var(ck)  # strict load into a vanilla VAR
    assert set(student.state_dict()) == set(ck.state_dict)
    teacher = load_checkpoint(run / "teacher", expect_kind="teacher")
    gates = [v for k, v in teacher.state_dict.items() if k.endswith("gate")]
    assert gates and any(g.abs().max() > 0 for g in gates)  # the alias gates opened


def _weights(run: Path, step: int) -> dict:
    return load_checkpoint(run / "checkpoints" / f"step-{step:07d}").state_dict


@pytest.mark.parametrize("mode,kill", [("train", "step"), ("distill", "checkpoint-write")])
def test_resume_equals_an_uninterrupted_run_bitwise(tokens, cli, tmp_path, monkeypatch, mode, kill):
    """2N steps straight vs N steps, a kill, and a resume: identical weights (bitwise on CPU),
    including the teacher's (in the training state) for distillation."""
    root, _, shards, _ = tokens
    common = ["--preset", "tiny-64", "--tokens", str(shards), "--steps", "8",
              *_sets(*FAST, "train.batch_size=4", "train.ckpt_every=4", "data.hflip=true")]
    straight = tmp_path / "straight"
    assert cli(mode, *common, "--out", str(straight)).code == 0
    broken = tmp_path / "broken"
    import fvar_core.train.transformer as tt

    if kill == "step":
        kill_at_step(monkeypatch, tt.VARTask, 6)
    else:
        real_save = ckpt_mod.save_file
        calls = []

        def dying_save(sd, path, *a, **k):  # the 2nd checkpoint dies half-written
            calls.append(path)
            if len(calls) == 2:
                Path(path).write_bytes(b"partial")
                raise KeyboardInterrupt
            return real_save(sd, path, *a, **k)
        monkeypatch.setattr(ckpt_mod, "save_file", dying_save)
    assert cli(mode, *common, "--out", str(broken)).code == 130
    assert [s for s, _ in complete_checkpoints(broken)] == [4]
    monkeypatch.undo()
    r = cli(mode, *common, "--out", str(broken))
    assert r.code == 0 and "from step 4" in r.err, r.err
    a, b = _weights(straight, 8), _weights(broken, 8)
    assert all(torch.equal(a[k], b[k]) for k in a)
    if mode == "distill":
        ta = ckpt_mod.load_training_state(straight / "checkpoints" / "step-0000008")["task"]["teacher"]
        tb = ckpt_mod.load_training_state(broken / "checkpoints" / "step-0000008")["task"]["teacher"]
        assert all(torch.equal(ta[k], tb[k]) for k in ta)


def test_training_from_images_encodes_on_the_fly(tokens, cli, tmp_path):
    root, tok_dir, _, data = tokens
    run = tmp_path / "img"
    r = cli("distill", "--preset", "tiny-64", "--data", str(data), "--tokenizer", str(tok_dir), "--out", str(run),
            "--steps", "4", *_sets(*FAST, "train.batch_size=4", "train.ckpt_every=4"))
    assert r.code == 0, r.err
    log = (run / "log.txt").read_text()
    assert "encoded on the fly" in log and "`fvar tokenize` once" in log
    assert [s for s, _ in complete_checkpoints(run)] == [4]


def test_default_run_dir_is_under_fvar_runs(tokens, cli, tmp_path, monkeypatch):
    root, _, shards, _ = tokens
    monkeypatch.setenv("FVAR_RUNS", str(tmp_path / "myruns"))
    r = cli("train", "--preset", "tiny-64", "--tokens", str(shards), "--steps", "2",
            *_sets(*FAST, "train.batch_size=4"))
    assert r.code == 0, r.err
    assert [s for s, _ in complete_checkpoints(tmp_path / "myruns" / "tiny-64-train")] == [2]


@pytest.mark.parametrize("args,message", [
    (["--set", "tokenizer.vocab_size=32"], "use a vocabulary of 64 codes, preset tiny-64 32"),
    (["--set", "model.num_classes=1"], "class 1 out of range: preset tiny-64 has 1 classes"),
    (["--set", "tokenizer.ch=64"], "tokenizer.ch is 32 there, 64 in the preset"),
    (["--set", "pyramid.kernel=area"], "encoded with pyramid.kernel disk, preset tiny-64 says area"),
])
def test_inputs_that_do_not_fit_the_preset_fail_in_one_line(tokens, cli, tmp_path, args, message):
    root, _, shards, _ = tokens
    run = tmp_path / "bad"
    r = cli("train", "--preset", "tiny-64", "--tokens", str(shards), "--out", str(run), "--steps", "2", *args)
    assert r.code == 2 and message in r.err and r.err.strip().count("\n") == 0, r.err
    assert not run.exists()


def test_a_resumed_run_with_another_preset_is_refused_and_nothing_overwritten(tokens, cli, tmp_path):
    root, _, shards, _ = tokens
    run = tmp_path / "run"
    args = ["--tokens", str(shards), "--out", str(run), "--steps", "2", *_sets(*FAST, "train.batch_size=4")]
    assert cli("train", "--preset", "tiny-64", *args).code == 0
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    r = cli("train", "--preset", "tiny-64", *args, "--set", "train.lr=5e-4")
    assert r.code == 2 and "another preset" in r.err and "train.lr" in r.err
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before
    r = cli("distill", "--preset", "tiny-64", *args)  # same preset, other mode
    assert r.code == 2 and "'train' run" in r.err


def test_distill_needs_alias_tokens(tokens, cli, tmp_path):
    root, _, shards, _ = tokens
    r = cli("distill", "--preset", "tiny-64", "--tokens", str(shards), "--out", str(tmp_path / "r"),
            "--set", "teacher.enabled=false")
    assert r.code == 2 and "train it with `fvar train`" in r.err


def test_two_process_accelerate_launch_agrees_on_weights(tokens, tmp_path):
    """Two processes of DDP over gloo on CPU: train and distill run and every rank ends with the
    same weights (fit checks and logs it)."""
    root, _, shards, _ = tokens
    for mode in ("train", "distill"):
        run = tmp_path / mode
        p = accelerate_launch([mode, "--preset", "tiny-64", "--tokens", str(shards), "--out", str(run), "--steps", "3",
                               *_sets(*FAST, "train.batch_size=4", "train.ckpt_every=3")], config=tmp_path / "none.yaml")
        assert p.returncode == 0, p.stderr[-3000:]
        log = (run / "log.txt").read_text()
        assert "2 processes, DDP" in log and "all 2 processes hold identical weights" in log, log
        assert [s for s, _ in complete_checkpoints(run)] == [3]


def test_gradient_accumulation_equals_the_full_batch(tokens, cli, tmp_path):
    """grad_accum 2 of 4 images = one batch of 8 (mean losses, one update): same weights to 1e-6
    (float32 sums in another order; label dropout draws the same stream either way)."""
    root, _, shards, _ = tokens
    common = ["--preset", "tiny-64", "--tokens", str(shards), "--steps", "3"]
    for accum in (1, 2):
        r = cli("train", *common, "--out", str(tmp_path / f"a{accum}"),
                *_sets(*FAST, "train.lr=5e-2", "train.batch_size=8", f"train.grad_accum={accum}"))
        assert r.code == 0, r.err
    a, b = _weights(tmp_path / "a1", 3), _weights(tmp_path / "a2", 3)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    p = load_preset("tiny-64")
    torch.manual_seed(p.train.seed)  # the loop's initialisation
    init = VAR(p.model, p.patch_nums, p.tokenizer.vocab_size, p.tokenizer.z_channels).state_dict()
    assert (a["head.weight"] - init["head.weight"]).abs().max() > 1e-3  # the steps did train


@pytest.mark.parametrize("kind", ["gaussian-pyramid", "shared-tokenizer"])
def test_pyramid_and_tokenizer_ablations_tokenize_and_train(tokens, cli, tmp_path, kind):
    """The paper's ablation rows reach `fvar tokenize` + `fvar distill`: Gaussian blur instead of
    the disk PSF (tokenize --set pyramid.kernel=gaussian), and the shared tokenizer (alias
    residuals coded with the structure codebook, so the teacher's alias vocabulary is V)."""
    root, tok_dir, _, data = tokens
    if kind == "gaussian-pyramid":
        sets = ["pyramid.kernel=gaussian"]
        tok = tok_dir
    else:
        sets = ["tokenizer.alias_vocab_size=0", "tokenizer.shared_codebook=true"]
        preset = load_preset("tiny-64", sets)
        torch.manual_seed(0)
        model = Tokenizer(preset.tokenizer, preset.patch_nums)
        tok = save_checkpoint(tmp_path / "tok", kind="tokenizer", preset=preset, state_dict=model.state_dict(),
                              provenance={"source": "test"})
    shards = tmp_path / "shards"
    r = cli("tokenize", "--tokenizer", str(tok), "--data", str(data), "--out", str(shards), "--device", "cpu",
            *(_sets(*sets) if kind == "gaussian-pyramid" else []))
    assert r.code == 0, r.err
    manifest = json.loads((shards / "manifest.json").read_text())
    if kind == "gaussian-pyramid":
        assert manifest["preset_config"]["pyramid"]["kernel"] == "gaussian"
        r = cli("train", "--preset", "tiny-64", "--tokens", str(shards), "--out", str(tmp_path / "bad"), "--steps", "1")
        assert r.code == 2 and "pyramid.kernel gaussian" in r.err
    else:
        assert manifest["alias_vocab_size"] == 64
    r = cli("distill", "--preset", "tiny-64", "--tokens", str(shards), "--out", str(tmp_path / "run"), "--steps", "2",
            *_sets(*FAST, *sets, "train.batch_size=4"))
    assert r.code == 0, r.err
    assert [s for s, _ in complete_checkpoints(tmp_path / "run")] == [2]
