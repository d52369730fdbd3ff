"""The one training loop on a toy task: resume equivalence, atomic checkpoints, keep-last-N,
the NaN guard, the preset guard and the metrics log."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fvar_core import checkpoints as ckpt_mod
from fvar_core.errors import UserError
from fvar_core.presets import load_preset
from fvar_core.runs import complete_checkpoints
from fvar_core.train.loop import fit


class ToyData(torch.utils.data.Dataset):
    """y = x·w* + noise; with `set_epoch`, the per-item noise depends on (epoch, i) like fvar's crops."""

    def __init__(self, n: int = 12):
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(n, 4, generator=g)
        self.y = self.x @ torch.tensor([1.0, -2.0, 0.5, 3.0])
        self.epoch = 0

    def __len__(self):
        return len(self.x)

    def set_epoch(self, e):
        self.epoch = e

    def __getitem__(self, i):
        jitter = 0.01 * torch.randn(4, generator=torch.Generator().manual_seed(1000 * self.epoch + i))
        return self.x[i] + jitter, self.y[i]


class ToyTask:
    """A linear model with dropout (consumes the torch RNG every step) and a counter in extra state."""

    kind = "var"
    mode = "train"

    def __init__(self, nan_at: int | None = None, preset=None):
        self.preset = preset
        self.loop_config = preset.tokenizer_train if preset is not None else None
        self.nan_at = nan_at
        self.calls = 0

    def build(self):
        self.net = nn.Sequential(nn.Linear(4, 16), nn.Dropout(0.2), nn.Linear(16, 1))
        return self.net

    def param_groups(self, model):
        return [{"params": [p for p in model.parameters() if p.ndim > 1]},
                {"params": [p for p in model.parameters() if p.ndim <= 1], "weight_decay": False}]

    def attach(self, model):
        self.model = model

    def step(self, batch, step):
        x, y = batch
        loss = F.mse_loss(self.model(x).squeeze(-1), y)
        if self.nan_at is not None and step + 1 >= self.nan_at:
            loss = loss * float("nan")
        return loss, {"mse": loss.detach()}

    def state_dict(self):
        return self.net.state_dict()

    def load_state_dict(self, sd):
        self.net.load_state_dict(sd)

    def extra_state(self):
        return {"calls": self.calls}

    def load_extra_state(self, d):
        self.calls = d["calls"]

    def after_step(self, step):
        self.calls += 1


def _preset(steps=6, **kw):
    sets = [f"tokenizer_train.steps={steps}", "tokenizer_train.batch_size=5", "tokenizer_train.lr=0.05",
            "tokenizer_train.log_every=1", "tokenizer_train.ckpt_every=3", "tokenizer_train.keep_last=2",
            "tokenizer_train.precision=fp32"] + [f"tokenizer_train.{k}={v}" for k, v in kw.items()]
    return load_preset("tiny-32", sets)


def _run(run_dir, preset, task=None):
    task = task or ToyTask()
    task.preset, task.loop_config = preset, preset.tokenizer_train
    res = fit(task, ToyData(), run_dir, device="cpu", num_workers=0)
    return task, res


def test_settings_schedule_warmup_then_constant_for_tokenizer_and_lin0_for_train():
    p = load_preset("tiny-64")
    s = p.tokenizer_train
    assert s.lr_schedule == "constant" and s.lr_at(10_000) == s.peak_lr == s.lr
    assert s.warmup_steps == min(round(0.01 * s.steps), 1000) and s.lr_at(0) == pytest.approx(0.1 * s.lr)
    t = p.train.model_copy(update={"steps": 1000, "warmup_frac": 0.1})
    assert t.peak_lr == pytest.approx(p.train.lr * p.train.batch_size / 256)
    assert t.lr_at(0) == pytest.approx(t.peak_lr * p.train.warmup_start)
    assert t.lr_at(120) == pytest.approx(t.peak_lr)              # flat 5% after warm-up
    assert t.lr_at(999) == pytest.approx(t.peak_lr * p.train.lr_end, rel=2e-3)


def test_resume_is_bitwise_identical_to_an_uninterrupted_run(tmp_path):
    full, _ = _run(tmp_path / "full", _preset(6))
    half, r1 = _run(tmp_path / "split", _preset(3))
    assert r1.step == 3 and r1.resumed_from is None
    resumed, r2 = _run(tmp_path / "split", _preset(6))   # only `steps` changed: allowed
    assert r2.resumed_from == 3 and resumed.calls == 6
    for (k, a), (_, b) in zip(full.net.state_dict().items(), resumed.net.state_dict().items()):
        assert torch.equal(a, b), k                       # bitwise on CPU
    lines = [json.loads(line) for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3, 4, 5, 6]
    for m in lines:
        assert {"loss", "mse", "lr", "img_per_s", "grad_norm"} <= set(m)
    ref = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [m["loss"] for m in ref] == [m["loss"] for m in lines]


def test_kill_during_checkpoint_write_keeps_previous_and_resume_works(tmp_path, monkeypatch):
    run = tmp_path / "run"
    real = ckpt_mod.save_file

    def dying_save_file(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        if "step-0000006" in str(filename):
            raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(ckpt_mod, "save_file", dying_save_file)
    with pytest.raises(KeyboardInterrupt):
        _run(run, _preset(6))
    monkeypatch.setattr(ckpt_mod, "save_file", real)
    # A SIGKILL would not run save_checkpoint's clean-up: leave what it would leave behind.
    torn = run / "checkpoints" / ".step-0000006.tmp-killed"
    torn.mkdir()
    (torn / "model.safetensors").write_bytes(b"\x00" * 10)
    assert [s for s, _ in complete_checkpoints(run)] == [3]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-0000003"
    ck = ckpt_mod.load_checkpoint(run / "checkpoints" / "step-0000003")
    assert ck.provenance["step"] == 3
    resumed, res = _run(run, _preset(6))
    assert res.resumed_from == 3 and res.step == 6
    full, _ = _run(tmp_path / "full", _preset(6))
    for a, b in zip(full.net.state_dict().values(), resumed.net.state_dict().values()):
        assert torch.equal(a, b)
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]


def test_keeps_only_the_last_n_checkpoints(tmp_path):
    _run(tmp_path / "r", _preset(12, ckpt_every=2, keep_last=2))
    assert [s for s, _ in complete_checkpoints(tmp_path / "r")] == [10, 12]
    assert (tmp_path / "r" / "checkpoints" / "latest").read_text().strip() == "step-0000012"


def test_nan_loss_stops_with_user_error_and_keeps_last_good_checkpoint(tmp_path):
    run = tmp_path / "r"
    with pytest.raises(UserError, match=r"at step 5.*step-0000003.*untouched"):
        _run(run, _preset(6), ToyTask(nan_at=5))
    assert [s for s, _ in complete_checkpoints(run)] == [3]
    sd = ckpt_mod.load_checkpoint(run / "checkpoints" / "step-0000003").state_dict
    assert all(torch.isfinite(v).all() for v in sd.values())


def test_other_preset_on_resume_is_refused_and_nothing_is_overwritten(tmp_path):
    run = tmp_path / "r"
    _run(run, _preset(3))
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with pytest.raises(UserError, match=r"another preset.*tokenizer_train.lr"):
        _run(run, _preset(6, lr=0.01))
    after = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert before == after


def test_finished_run_rerun_does_nothing(tmp_path):
    _run(tmp_path / "r", _preset(3))
    task, res = _run(tmp_path / "r", _preset(3))
    assert res.resumed_from == 3 and res.step == 3 and task.calls == 3


def test_a_non_finite_step_is_skipped_on_the_device_before_the_run_stops(tmp_path):
    """The NaN step's update never lands: when the error is raised the weights are exactly those of
    the four good steps (the check is read one step late; the fused optimiser skipped by found_inf)."""
    task = ToyTask(nan_at=5)
    with pytest.raises(UserError, match=r"not finite at step 5: its update was skipped"):
        _run(tmp_path / "bad", _preset(6, ckpt_every=100), task)
    clean, _ = _run(tmp_path / "good", _preset(4, ckpt_every=100))
    for a, b in zip(task.net.state_dict().values(), clean.net.state_dict().values()):
        assert torch.equal(a, b)


def test_micro_steps_add_no_host_reads(tmp_path):
    """Values are read back from the device once per optimiser step (the finiteness verdict) and at
    log lines — never per micro-step, so gradient accumulation adds no synchronisation."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class HostReads(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default:
                HostReads.n += 1
            return func(*args, **(kwargs or {}))

    counts = {}
    for accum, steps in ((1, 5), (4, 5), (1, 10)):
        HostReads.n = 0
        with HostReads():
            _run(tmp_path / f"a{accum}-{steps}", _preset(steps, grad_accum=accum, batch_size=8, log_every=steps,
                                                         ckpt_every=100))
        counts[accum, steps] = HostReads.n
    assert counts[4, 5] == counts[1, 5], counts  # 4 micro-steps per step: not one read more
    assert counts[1, 10] - counts[1, 5] <= 5, counts  # at most one read per optimiser step
