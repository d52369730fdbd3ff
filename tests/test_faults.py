"""The fault suite: fvar attacked as a crashing machine and a careless user would (issue #13).

kill -9 at random points (training and tokenize resume bitwise), a full disk (a small tmpfs, as
root; skipped otherwise), corrupt and incomplete checkpoints, a symlink loop, two processes on
one run, resuming on other data, Ctrl-C, and a table of bad command lines that must each end in
one line on stderr, exit 2, and no change to any file already there.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shlex
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fvar_core import checkpoints as ck
from fvar_core.data.folders import scan_image_folder
from fvar_core.runs import SKIPPED_FILES
from fvar_core.errors import FvarWarning, UserError
from fvar_core.presets import load_preset
from fvar_core.runlock import LOCK_NAME, RunLock
from fvar_core.runs import resolve_checkpoint
from fvar_core.runs import complete_checkpoints

from .helpers import make_folder
from .test_convert import official_vae  # noqa: F401  (a fixture)
from .test_training_loop import ToyTask, _preset, _run

REPO = Path(__file__).resolve().parents[1]
FVAR = [sys.executable, "-c", "from fvar_cli.app import main; main()"]
# A tokenizer run of a few CPU seconds: tiny-64, batch 4, a checkpoint every 2 steps.
TINY = ["--preset", "tiny-64", "--set", "tokenizer_train.batch_size=4", "--set", "tokenizer_train.ckpt_every=2",
        "--set", "tokenizer_train.log_every=1", "--set", "tokenizer_train.precision=fp32",
        "--set", "tokenizer_train.sample_every=0", "--set", "tokenizer_train.keep_last=2"]


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore::FutureWarning")
    env.pop("FVAR_FOLLOW_LINKS", None)
    return env


def _train_cmd(data: Path, out: Path, steps: int) -> list[str]:
    return ["train-tokenizer", "--data", str(data), "--out", str(out), *TINY,
            "--set", f"tokenizer_train.steps={steps}"]


def _weights(run: Path) -> dict:
    return load_file(str(complete_checkpoints(run)[-1][1] / "model.safetensors"))


def _same_weights(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def tree_hash(root: Path) -> dict:
    """{relative path: sha256 (files) or 'dir'} of everything below root."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _one_line_error(r) -> str:
    assert r.code == 2, (r.code, r.out, r.err)
    lines = r.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fvar: error: "), r.err
    assert "Traceback" not in r.err
    return lines[0]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A data folder, a second one, and a finished 4-step tokenizer run on the first."""
    root = tmp_path_factory.mktemp("faults")
    data = make_folder(root / "data", per_class=8, size=64)
    other = make_folder(root / "other", per_class=4, size=64)
    r = subprocess.run([*FVAR, *_train_cmd(data, root / "run", 4)], capture_output=True, text=True, env=_env(),
                       cwd=root, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return {"root": root, "data": data, "other": other, "run": root / "run"}


# --------------------------------------------------------------------------- kill -9, resume
def _wait_for(pred, proc: subprocess.Popen, timeout: float = 120.0) -> bool:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if pred():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.01)
    raise AssertionError("timed out waiting for the process")


def _metrics_steps(run: Path) -> int:
    try:
        return len((run / "metrics.jsonl").read_text().splitlines())
    except OSError:
        return 0


def test_kill_9_at_random_steps_then_resume_gives_the_uninterrupted_weights(world, tmp_path):
    data, steps = world["data"], 8
    ref = tmp_path / "ref"
    r = subprocess.run([*FVAR, *_train_cmd(data, ref, steps)], capture_output=True, text=True, env=_env(),
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    run, rng = tmp_path / "killed", random.Random(13)
    kills = []
    for _ in range(3):
        at = rng.randint(1, steps - 1)  # kill once this many metrics lines exist: mid-step or mid-save
        p = subprocess.Popen([*FVAR, *_train_cmd(data, run, steps)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, env=_env())
        if _wait_for(lambda: _metrics_steps(run) >= at, p):
            time.sleep(rng.uniform(0.0, 0.3))
            p.send_signal(signal.SIGKILL)
            kills.append(at)
        p.wait()
    r = subprocess.run([*FVAR, *_train_cmd(data, run, steps)], capture_output=True, text=True, env=_env(),
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert kills, "no kill landed"
    assert complete_checkpoints(run)[-1][0] == steps
    _same_weights(_weights(ref), _weights(run))
    assert not (run / LOCK_NAME).exists()  # the last, finished run released the lock


def _shard_files(d: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(d.glob("shard-*.npy"))}


def test_kill_9_during_tokenize_then_rerun_gives_the_same_shards(world, tmp_path):
    data = make_folder(tmp_path / "many", per_class=24, size=64)
    tok = world["run"]
    cmd = ["tokenize", "--tokenizer", str(tok), "--data", str(data), "--shard-size", "4", "--batch", "4"]
    r = subprocess.run([*FVAR, *cmd, "--out", str(tmp_path / "ref")], capture_output=True, text=True, env=_env(),
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out, rng = tmp_path / "killed", random.Random(7)

    def shards_done() -> int:
        try:
            return sum(e["complete"] for e in json.loads((out / "manifest.json").read_text())["shards"])
        except (OSError, ValueError, KeyError):
            return 0
    for _ in range(2):
        at = rng.randint(1, 10)
        p = subprocess.Popen([*FVAR, *cmd, "--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             env=_env())
        if _wait_for(lambda: shards_done() >= at, p):
            p.send_signal(signal.SIGKILL)
        p.wait()
    r = subprocess.run([*FVAR, *cmd, "--out", str(out)], capture_output=True, text=True, env=_env(), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert _shard_files(out) == _shard_files(tmp_path / "ref") and len(_shard_files(out)) == 12 * 4


# ------------------------------------------------------------------------------ Ctrl-C
def test_ctrl_c_says_where_the_run_stopped_and_the_command_that_resumes_it(world, tmp_path):
    run = tmp_path / "run"
    # Ctrl-C in a terminal: SIGINT handled by default in the child even when this test runs under a
    # shell that started it in the background (which makes children inherit SIGINT ignored, and the
    # run would then finish with exit 0)
    p = subprocess.Popen([*FVAR, *_train_cmd(world["data"], run, 40)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=_env(),
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert _wait_for(lambda: _metrics_steps(run) >= 3, p)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130
    last = err.strip().splitlines()[-1]
    newest = complete_checkpoints(run)[-1]
    assert 2 <= newest[0] < 40
    assert last.startswith("fvar: interrupted at step ") and "of 40 in" in last and newest[1].name in last, last
    resume = shlex.split(last.split("to resume, rerun: ", 1)[1])
    assert resume[0] == "fvar" and resume[1:] == _train_cmd(world["data"], run, 40)
    r = subprocess.run([*FVAR, *resume[1:]], capture_output=True, text=True, env=_env(), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming" in (run / "log.txt").read_text() and complete_checkpoints(run)[-1][0] == 40


# --------------------------------------------------------------------- checkpoints: verify, fall back
def _toy_run(tmp_path, steps=6, name="r"):
    return _run(tmp_path / name, _preset(steps, ckpt_every=2, keep_last=3))


def test_a_truncated_newest_checkpoint_is_skipped_kept_and_the_run_resumes_bitwise(tmp_path):
    _toy_run(tmp_path, 6)
    run = tmp_path / "r"
    bad = run / "checkpoints" / "step-0000006" / "model.safetensors"
    bad.write_bytes(bad.read_bytes()[:-40])
    with pytest.warns(FvarWarning, match=r"skipping .*step-0000006: model.safetensors is unreadable or corrupt "
                                         r"\(\d+ bytes, \d+ were written"):
        assert resolve_checkpoint(run).name == "step-0000004"  # what `fvar sample --ckpt RUN` uses
    _, res = _run(run, _preset(6, ckpt_every=2, keep_last=3))
    assert res.resumed_from == 4 and res.step == 6
    log = (run / "log.txt").read_text()
    assert "skipped checkpoint step-0000006: model.safetensors is unreadable or corrupt" in log
    assert "kept as step-0000006.bad" in log
    kept = run / "checkpoints" / "step-0000006.bad" / "model.safetensors"
    full, _ = _toy_run(tmp_path, 6, "full")
    assert kept.stat().st_size == (tmp_path / "full" / "checkpoints" / "step-0000006" / "model.safetensors"
                                   ).stat().st_size - 40
    _same_weights(full.net.state_dict(), _weights(run))


def test_a_flipped_byte_of_the_same_size_fails_the_checksum(tmp_path):
    _toy_run(tmp_path, 4)
    f = tmp_path / "r" / "checkpoints" / "step-0000004" / "model.safetensors"
    b = bytearray(f.read_bytes())
    b[-3] ^= 0xFF
    f.write_bytes(bytes(b))
    assert "sha256 differs" in ck.verify_checkpoint(f.parent)
    with pytest.raises(UserError, match="model.safetensors is unreadable or corrupt"):
        ck.load_checkpoint(f.parent)


def test_an_incomplete_newest_checkpoint_is_named_when_skipped(tmp_path):
    _toy_run(tmp_path, 6)
    run = tmp_path / "r"
    (run / "checkpoints" / "step-0000006" / "training_state.pt").unlink()
    _, res = _run(run, _preset(6, ckpt_every=2, keep_last=3))
    assert res.resumed_from == 4
    assert "skipped checkpoint step-0000006: incomplete (training_state.pt missing)" in (run / "log.txt").read_text()


def test_a_run_whose_every_checkpoint_is_broken_is_refused_not_restarted(tmp_path):
    _toy_run(tmp_path, 2)
    run = tmp_path / "r"
    (run / "checkpoints" / "step-0000002" / "model.safetensors").write_bytes(b"junk")
    before = tree_hash(run)
    with pytest.raises(UserError, match="no usable checkpoint.*move .* away to start over"):
        _run(run, _preset(4, ckpt_every=2, keep_last=3))
    assert tree_hash(run) == before


# ------------------------------------------------------------------------------- full disk
@contextmanager
def small_tmpfs(path: Path, size: str = "4m"):
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (CI runs as root)")
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                       text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(disk: Path, leave: int = 0) -> Path:
    """Write a filler file until the disk is full, then give back `leave` bytes."""
    f = disk / "filler"
    with open(f, "wb") as out:
        try:
            while True:
                out.write(b"\0" * 65536)
                out.flush()
        except OSError:
            pass
    with open(f, "ab") as out:
        out.truncate(max(0, f.stat().st_size - leave))
    return f


class FillingTask(ToyTask):
    """A ToyTask that fills the disk after optimiser step `at` (the disk fills up mid-run)."""

    def __init__(self, disk: Path, at: int):
        super().__init__()
        self.disk, self.at = disk, at

    def after_step(self, step):
        super().after_step(step)
        if step == self.at:
            fill(self.disk)


def test_disk_full_mid_run_is_one_line_keeps_the_last_checkpoint_and_resumes_bitwise(tmp_path):
    with small_tmpfs(tmp_path / "disk") as disk:
        run = disk / "r"
        preset = _preset(6, ckpt_every=3, keep_last=3)
        with pytest.raises(UserError, match="no space left on device") as e:
            _run(run, preset, FillingTask(disk, at=4))
        assert "\n" not in str(e.value)
        assert [s for s, _ in complete_checkpoints(run)] == [3]
        ck.load_checkpoint(run / "checkpoints" / "step-0000003")  # verifies
        (disk / "filler").unlink()
        resumed, res = _run(run, preset)
        assert res.resumed_from == 3 and res.step == 6
    full, _ = _run(tmp_path / "full", preset)
    _same_weights(full.net.state_dict(), resumed.net.state_dict())


@pytest.mark.parametrize("what", ["weights", "training_state"])
def test_disk_full_inside_safetensors_or_torch_save_is_a_user_error(tmp_path, what):
    """safetensors raises its own error type, torch.save a RuntimeError ('unexpected pos'): both
    carry no errno, and both must become one line with the old checkpoint untouched."""
    p = load_preset("tiny-32")
    small = {"w": torch.ones(8)}
    big = {"w": torch.randn(1 << 20)}  # 4 MB
    with small_tmpfs(tmp_path / "disk", "2m") as disk:
        target = ck.save_checkpoint(disk / "c", kind="tokenizer", preset=p, state_dict=small)
        before = tree_hash(target)
        fill(disk, leave=64 << 10)
        sd, state = (big, None) if what == "weights" else (small, {"blob": big["w"]})
        with pytest.raises(UserError, match=r"cannot write checkpoint .*: no space left on device; nothing was "
                                            r"overwritten"):
            ck.save_checkpoint(target, kind="tokenizer", preset=p, state_dict=sd, training_state=state)
        assert tree_hash(target) == before
        assert sorted(x.name for x in disk.iterdir()) == ["c", "filler"]  # no temporaries left


def test_convert_import_onto_a_full_disk_is_one_line(cli, tmp_path, official_vae):  # noqa: F811
    src, _ = official_vae
    with small_tmpfs(tmp_path / "disk", "2m") as disk:
        fill(disk, leave=16 << 10)
        line = _one_line_error(cli("convert", "import", str(src), "--out", str(disk / "tok")))
        assert "no space left on device" in line
        assert sorted(x.name for x in disk.iterdir()) == ["filler"]


# ------------------------------------------------------------------------------ hostile data
def _loop_folder(root: Path) -> Path:
    from PIL import Image

    for c in ("c0", "c1"):
        (root / c).mkdir(parents=True)
        for i in range(8):
            Image.new("RGB", (64, 64), (30 * i, 100 if c == "c0" else 200, 0)).save(root / c / f"{i}.png")
    os.symlink("..", root / "c0" / "loop")
    return root


def test_a_symlink_loop_neither_duplicates_nor_mislabels(tmp_path):
    root = _loop_folder(tmp_path / "D")
    idx = scan_image_folder(root)
    assert len(idx) == 16 and idx.class_counts() == [8, 8]
    assert all(f.parent.name == idx.classes[y] for f, y in zip(idx.files, idx.labels))
    assert [(p.name, "loop" in r or "already indexed" in r) for p, r in idx.skipped] == [("loop", True)]


def test_links_between_classes_and_out_of_the_folder_are_skipped_and_said(tmp_path, monkeypatch):
    root = _loop_folder(tmp_path / "D")
    (root / "c0" / "loop").unlink()
    os.symlink("../c1", root / "c0" / "c1-again")
    outside = make_folder(tmp_path / "elsewhere", per_class=2, size=64)
    os.symlink(outside / "shapes", root / "c1" / "ext")
    idx = scan_image_folder(root)
    assert idx.class_counts() == [8, 8]
    reasons = {p.name: r for p, r in idx.skipped}
    assert "already indexed" in reasons["c1-again"] and "outside the data folder" in reasons["ext"]
    monkeypatch.setenv("FVAR_FOLLOW_LINKS", "1")  # asked: links out of the folder are followed
    assert scan_image_folder(root).class_counts() == [8, 10]


def test_tokenize_on_a_symlink_loop_stores_each_image_once_under_its_label(cli, world, tmp_path):
    root = _loop_folder(tmp_path / "D")
    r = cli("tokenize", "--tokenizer", str(world["run"]), "--data", str(root), "--out", str(tmp_path / "tok"))
    assert r.code == 0, r.err
    assert "wrote 16 items" in r.out and "loop" in r.err
    m = json.loads((tmp_path / "tok" / "manifest.json").read_text())
    assert m["total"] == 16
    listed = (tmp_path / "tok" / SKIPPED_FILES).read_text().splitlines()
    assert len(listed) == 1 and listed[0].startswith(str(root / "c0" / "loop") + "\t")


def test_every_skipped_file_is_listed_in_the_run_directory(cli, world, tmp_path):
    data = make_folder(tmp_path / "data", per_class=4, size=64, corrupt=7)
    run = tmp_path / "run"
    r = cli(*_train_cmd(data, run, 1))
    assert r.code == 0, r.err
    listed = (run / SKIPPED_FILES).read_text().splitlines()
    assert sorted(line.split("\t")[0].rsplit("/", 1)[1] for line in listed) == [f"broken{j}.png" for j in range(7)]
    assert all(line.split("\t")[1] for line in listed)  # each with its reason
    assert f"… and 2 more: every one in {run / SKIPPED_FILES}" in r.err + (run / "log.txt").read_text()


# ------------------------------------------------------------------------------ the lock
def test_a_second_process_on_a_run_is_refused_and_a_dead_holders_lock_is_taken_over(cli, world, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom fvar_core.runlock import RunLock\n"
                               "RunLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(300)",
                               str(run)], stdout=subprocess.PIPE, text=True, env=_env())
    try:
        assert holder.stdout.readline().strip() == "locked"
        line = _one_line_error(cli(*_train_cmd(world["data"], run, 2)))
        assert f"in use by pid {holder.pid} on " in line
        assert sorted(p.name for p in run.iterdir()) == [LOCK_NAME]  # nothing written
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (run / LOCK_NAME).exists()  # kill -9 left the file behind ...
    r = cli(*_train_cmd(world["data"], run, 2))  # ... and it does not block the run
    assert r.code == 0, r.err
    assert f"fvar: warning: {run}: taking over the lock of pid {holder.pid}" in r.err
    assert not (run / LOCK_NAME).exists()


def test_two_locks_in_one_process_exclude_each_other(tmp_path):
    with RunLock(tmp_path):
        with pytest.raises(UserError, match=f"in use by pid {os.getpid()}"):
            RunLock(tmp_path).acquire()
    with RunLock(tmp_path):  # released: takes it again
        pass


# -------------------------------------------------------------------------- data identity
def test_resuming_on_other_data_is_refused_unless_allowed_and_then_logged(cli, world, tmp_path):
    run = tmp_path / "run"
    assert cli(*_train_cmd(world["data"], run, 2)).code == 0
    before = tree_hash(run)
    line = _one_line_error(cli(*_train_cmd(world["other"], run, 4)))
    assert "was trained on other data" in line and "path, fingerprint differ" in line and "--allow-data-change" in line
    assert tree_hash(run) == before
    r = cli(*_train_cmd(world["other"], run, 4), "--allow-data-change")
    assert r.code == 0, r.err
    assert "continuing on the new data (--allow-data-change)" in (run / "log.txt").read_text()
    assert cli(*_train_cmd(world["other"], run, 4)).code == 0  # the new data is now the run's


# ---------------------------------------------------------------------------- bad command lines
def _eval_cases(w: dict, t: Path) -> list[tuple[list[str], str]]:
    """fvar eval's inputs, each wrong in one way: named before the Inception weights are needed."""
    run = w["run"]
    return [
        (["eval", "--tokenizer", str(run)], "--data"),
        (["eval", "--samples", str(t / "missing")], "no such folder"),
        (["eval", "--samples", str(t / "empty")], "empty"),
        (["eval", "--samples", str(t / "samples"), "--ref", "no-such-ref"], "no reference named"),
        (["eval", "--samples", str(t / "samples"), "--ref", str(t / "bad.npz")], "bad.npz"),
        (["eval", "--samples", str(t / "samples"), "--ref", str(t / "empty")], "empty"),
        (["eval", "--tokenizer", str(run), "--data", str(t / "missing")], "no such data folder"),
    ]


def _bad_cases(w: dict, t: Path) -> list[tuple[list[str], str]]:
    run, data = w["run"], w["data"]
    step = str(complete_checkpoints(run)[-1][1])
    return [
        (["presets", "show", "nope"], "unknown preset"),
        (["presets", "show", "tiny-32", "--set", "train.lr=.inf"], "finite number"),
        (["presets", "show", "tiny-32", "--set", "train.lr=nan"], "finite number"),
        (_train_cmd(data, run, 4)[:-2] + ["--set", "tokenizer_train.lr=-.inf"], "finite number"),
        (_train_cmd(t / "missing", run, 4), "no such data folder"),
        (_train_cmd(w["other"], run, 4), "trained on other data"),
        (_train_cmd(data, run, 4) + ["--preset", "tiny-32"], "another preset"),
        (_train_cmd(data, t / "afile", 4), "exists and is not a folder"),
        (_train_cmd(data, t / "afile" / "run", 4), "is a file, not a folder"),
        (["pyramid", "visualize", "chart", "--out", str(t / "adir")], "is a folder"),
        (["pyramid", "visualize", "chart", "--out", str(t / "afile" / "fig.png")], "is a file, not a folder"),
        (["pyramid", "visualize", str(t / "corrupt.png")], "corrupt.png"),
        (["bench", "sample", "--json", str(t / "afile" / "b.json")], "is a file, not a folder"),
        (["convert", "export", step, "--out", str(t / "afile" / "v.pth")], "is a file, not a folder"),
        (["convert", "export", step, "--out", str(t / "afile")], "--overwrite"),
        (["convert", "import", str(t / "corrupt.png"), "--out", str(t / "x")], "not a readable PyTorch checkpoint"),
        (["convert", "import", str(t / "corrupt.png"), "--out", step], "not a readable PyTorch checkpoint"),
        (["sample", "--ckpt", str(t / "missing"), "--class", "0"], "no checkpoint"),
        (["sample", "--ckpt", str(run), "--class", "0"], "expected a var"),
        (["sample", "--ckpt", str(run)], "Missing option '--class'"),
        (["sample", "--class", "0", "--n", "abc"], "valid integer"),
        (["no-such-command"], "No such command"),
        (["tokenize", "--tokenizer", str(run), "--data", str(data), "--out", str(t / "afile")], "not a folder"),
        (["tokenize", "--tokenizer", str(t / "missing"), "--data", str(data), "--out", str(t / "tk")], "no checkpoint"),
        (["train", "--tokens", str(t / "missing")], "manifest.json"),
        (["train", "--tokens", str(run), "--out", str(run)], "manifest.json"),
        *_eval_cases(w, t),
    ]


@pytest.fixture
def bad_inputs(world, tmp_path, monkeypatch):
    """A folder of things that are wrong: a file where a folder goes, a corrupt PNG, a truncated
    .npz, an empty folder; missing Inception weights, runs and cache pointed into it."""
    t = tmp_path
    (t / "afile").write_bytes(b"keep")
    (t / "adir").mkdir()
    (t / "empty").mkdir()
    (t / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (t / "bad.npz").write_bytes(b"PK\x03\x04 truncated")
    from PIL import Image

    (t / "samples").mkdir()
    for i in range(4):
        Image.new("RGB", (32, 32), (60 * i, 0, 0)).save(t / "samples" / f"{i}.png")
    # the Inception weights "cannot be had": an input error must be reported before they are needed
    monkeypatch.setenv("FVAR_FEATURE_WEIGHTS", str(t / "no-weights.pth"))
    monkeypatch.setenv("FVAR_RUNS", str(t / "runs"))
    monkeypatch.setenv("FVAR_CACHE", str(t / "cache"))
    monkeypatch.chdir(t)
    return t


def test_eval_names_a_bad_input_before_it_needs_the_inception_weights(cli, world, bad_inputs):
    for argv, expect in _eval_cases(world, bad_inputs):
        line = _one_line_error(cli(*argv))
        assert expect in line and "weights" not in line, (argv, line)


def test_bad_command_lines_end_in_one_line_exit_2_and_change_nothing(cli, world, bad_inputs):
    t = bad_inputs
    watched = [world["root"], t]
    for argv, expect in _bad_cases(world, t):
        before = [tree_hash(d) for d in watched]
        line = _one_line_error(cli(*argv))
        assert expect in line, (argv, line)
        assert [tree_hash(d) for d in watched] == before, argv


def test_read_only_outputs_are_one_line(cli, world, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() == 0:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)], capture_output=True)
        if r.returncode != 0:
            pytest.skip("cannot mount a read-only tmpfs here")
    else:
        ro.chmod(0o555)
    try:
        for argv in (["pyramid", "visualize", "chart", "--preset", "tiny-32", "--out", str(ro / "x.png")],
                     _train_cmd(world["data"], ro / "run", 2),
                     ["bench", "sample", "--json", str(ro / "b.json")]):
            assert "cannot write in" in _one_line_error(cli(*argv)), argv
        assert list(ro.iterdir()) == []
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", "-l", str(ro)], check=False)
        else:
            ro.chmod(0o755)


# ------------------------------------------------------------------------------ schema, help
def _float_fields(model, prefix=""):
    from pydantic import BaseModel

    for name, f in model.model_fields.items():
        ann = f.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            yield from _float_fields(ann, f"{prefix}{name}.")
        elif "float" in str(ann) and "Literal" not in str(ann):
            yield f"{prefix}{name}", ann


def test_every_float_field_of_the_schema_refuses_inf_and_nan():
    from fvar_core.config import Preset

    fields = list(_float_fields(Preset))
    assert len(fields) > 20
    for path, ann in fields:
        for bad in (".inf", "-.inf", ".nan"):
            value = f"[{bad}, {bad}]" if "uple" in str(ann) else f"{{8: {bad}}}" if "Dict" in str(ann) else bad
            with pytest.raises(UserError, match="finite"):
                load_preset("tiny-32", [f"{path}={value}"])


def test_help_never_imports_torch():
    code = ("import sys\nfrom fvar_cli.app import build_app, discover, run\napp = build_app()\n"
            "for argv in [['--help'], *[[ep.name, '--help'] for ep in discover()]]:\n"
            "    run(app, argv)\n"
            "    assert 'torch' not in sys.modules, argv\nprint('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=120)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-2000:]


def test_ctrl_c_during_tokenize_names_the_shards_done_and_the_resume_command(cli, world, tmp_path, monkeypatch):
    from fvar_core.models.tokenizer import Tokenizer

    real, calls = Tokenizer.encode_with_pyramid, []

    def interrupted_after_two(self, *a, **k):
        calls.append(1)
        if len(calls) > 2:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(Tokenizer, "encode_with_pyramid", interrupted_after_two)
    out = tmp_path / "tok"
    argv = ["tokenize", "--tokenizer", str(world["run"]), "--data", str(world["data"]), "--out", str(out),
            "--shard-size", "4", "--batch", "4"]
    r = cli(*argv)
    assert r.code == 130
    assert r.err.strip().splitlines()[-1] == (f"fvar: interrupted in {out} with 2 of 4 shards complete (kept); "
                                              f"to resume, rerun: {shlex.join(['fvar', *argv])}")
    monkeypatch.undo()
    r = cli(*argv)
    assert r.code == 0 and "2 kept from an earlier run" in r.out, r.err


def test_a_run_killed_before_its_config_was_written_starts_again(tmp_path):
    """kill -9 between creating a run directory and renaming config.yaml into it leaves the lock and
    atomic_write's temporary: that folder is a new run, not a stranger's (which is refused)."""
    from fvar_core.presets import load_preset
    from fvar_core.runs import check_run_dir

    preset = load_preset("tiny-64")
    killed = tmp_path / "killed"
    killed.mkdir()
    (killed / ".config.yaml.k3j2x9.tmp").write_text("name: tiny")
    assert check_run_dir(killed, preset).stored is None
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="exists and is not an fvar run directory"):
        check_run_dir(stranger, preset)
