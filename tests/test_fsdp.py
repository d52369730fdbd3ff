"""Sharded training (train.strategy fsdp: torch FSDP2) with two gloo processes on the CPU, tiny-64:
the same losses and weights as DDP, checkpoints every command reads, bitwise resume after kill -9,
the corrupt-newest fallback, a changed world size, the NaN guard on every rank, and refusals.

Tolerances: FSDP and DDP run the same fp32 maths with gradients summed in another order
(reduce-scatter vs all-reduce): 2.0e-7 apart in the weights after 8 steps at a peak lr of 7.8e-3,
2.4e-7 in the logged losses; the tests allow 1e-6. A run resumed on another number of processes
sees the same global batches (the data stream is global, each process takes a contiguous slice of
it; logged metrics are means over the processes) and, with label dropout off, the same maths:
1.4e-6 (1 → 2) and 6e-8 (2 → 1) in the weights, 2.4e-7 in the losses; allowed 1e-5.
"""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fvar_core.checkpoints import load_checkpoint, load_training_state
from fvar_core.runs import complete_checkpoints
from fvar_core.train.sharding import check_strategy
from fvar_core.errors import UserError

from .helpers import accelerate_launch, kill_9_launch, kill_at_step, make_folder
from .test_train_transformer import tokens  # noqa: F401 — the module's tiny-64 tokenizer and shards

STEPS = 8
# label dropout off: with it, each process draws its own labels (seeded per rank), so runs on
# different numbers of processes would differ by their draws, not by the sharding under test
COMMON = ["--preset", "tiny-64", "--steps", str(STEPS), "--set", "train.precision=fp32", "--set", "train.log_every=1",
          "--set", "train.warmup_frac=0", "--set", "train.lr=0.5", "--set", "train.batch_size=4",
          "--set", "train.ckpt_every=2", "--set", "train.keep_last=10", "--set", "model.cond_drop=0.0",
          "--set", "train.sample_every=8"]
FSDP = ["--set", "train.strategy=fsdp"]


def _args(shards: Path, out: Path, *more: str, mode: str = "train") -> list:
    return [mode, "--tokens", str(shards), "--out", str(out), *COMMON, *more]


def _losses(run: Path) -> list:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def _weights(run: Path, step: int = STEPS) -> dict:
    return load_checkpoint(run / "checkpoints" / f"step-{step:07d}").state_dict


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def fsdp_run(tokens, tmp_path_factory):  # noqa: F811
    """An uninterrupted 8-step FSDP run (checkpoints every 2 steps, a sample grid at step 8)."""
    _, _, shards, _ = tokens
    root = tmp_path_factory.mktemp("fsdp")
    run = root / "straight"
    p = accelerate_launch(_args(shards, run, *FSDP), config=root / "none.yaml")
    assert p.returncode == 0, p.stderr[-3000:]
    return shards, run


def test_fsdp_trains_like_ddp_and_logs_what_each_process_holds(fsdp_run, tmp_path):
    shards, run = fsdp_run
    ddp = tmp_path / "ddp"
    p = accelerate_launch(_args(shards, ddp), config=tmp_path / "none.yaml")
    assert p.returncode == 0, p.stderr[-3000:]
    assert np.allclose(_losses(run), _losses(ddp), rtol=0, atol=1e-6)
    assert _max_diff(_weights(run), _weights(ddp)) < 1e-6
    assert _max_diff(_weights(run), _weights(run, 2)) > 1e-2  # it did train (peak lr 0.5·4/256)
    log = (run / "log.txt").read_text()
    assert "2 processes, FSDP" in log and "all 2 processes hold identical replicated state" in log
    # each process holds about half of the 16 bytes per parameter (padding of odd-sized rows aside)
    line = next(x for x in log.splitlines() if "sharded state on this process" in x)
    held, half = float(line.split(": ")[1].split(" MiB")[0]), float(line.rsplit("of it ", 1)[1])
    assert abs(held / half - 1) < 0.05, line
    # the optimiser state is saved full, in the layout a one-process run saves
    a, b = (load_training_state(r / "checkpoints" / f"step-{STEPS:07d}")["optimizer"] for r in (run, ddp))
    assert a["state"].keys() == b["state"].keys()
    assert all(a["state"][i][k].shape == b["state"][i][k].shape and torch.allclose(a["state"][i][k], b["state"][i][k],
                                                                                  atol=1e-6)
               for i in a["state"] for k in ("exp_avg", "exp_avg_sq"))


def test_fsdp_distill_trains_like_ddp(tokens, tmp_path):  # noqa: F811
    _, _, shards, _ = tokens
    runs = {}
    # FSDP with whole-block recompute, DDP with the CPU default (pointwise): the same maths either way
    for name, more in (("fsdp", [*FSDP, "--set", "train.activation_checkpointing=full"]), ("ddp", [])):
        runs[name] = tmp_path / name
        p = accelerate_launch(_args(shards, runs[name], "--set", "model.cond_drop=0.1", "--steps", "3",
                                    "--set", "train.grad_accum=2", "--set", "train.ckpt_every=3", *more,
                                    mode="distill"), config=tmp_path / "none.yaml")
        assert p.returncode == 0, p.stderr[-3000:]
    assert np.allclose(_losses(runs["fsdp"]), _losses(runs["ddp"]), rtol=0, atol=1e-6)
    assert _max_diff(_weights(runs["fsdp"], 3), _weights(runs["ddp"], 3)) < 1e-6
    ta, tb = (load_training_state(runs[n] / "checkpoints" / "step-0000003")["task"]["teacher"] for n in ("fsdp", "ddp"))
    assert _max_diff(ta, tb) < 1e-6 and any(v.abs().max() > 0 for k, v in ta.items() if k.endswith("gate"))


def test_an_fsdp_checkpoint_samples_exports_and_loads_in_one_process(fsdp_run, cli, tmp_path, request):
    """The grid the sharded run drew at step 8 (from its gathered weights) is what `fvar sample` and
    fvar.Pipeline draw from the saved checkpoint in one process; `fvar convert export` writes it."""
    import fvar

    _, run = fsdp_run
    ck = run / "checkpoints" / f"step-{STEPS:07d}"
    # the launched processes ran one thread each (OMP_NUM_THREADS=1); the decoder's float sums
    # depend on the thread count (±1 in a few 8-bit values), so draw with one thread too
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    request.addfinalizer(lambda: torch.set_num_threads(threads))
    grid = np.asarray(Image.open(run / "samples" / f"step-{STEPS:07d}.png"))
    assert grid.shape == (64, 128, 3)  # one image per class (2 classes), seeds 0 and 1
    r = cli("sample", "--ckpt", str(ck), "--class", "0,1", "--n", "1", "--out", str(tmp_path / "s"))
    assert r.code == 0, r.err
    pngs = sorted((tmp_path / "s").glob("*.png"))
    drawn = [np.asarray(Image.open(p)) for p in pngs if p.name != "grid.png"]
    assert len(drawn) == 2 and np.array_equal(np.concatenate(drawn, axis=1), grid)
    pipe = fvar.Pipeline.from_pretrained(ck)
    images = pipe.sample([0, 1], n=1, seed=0)
    assert np.array_equal(np.concatenate([np.asarray(i) for i in images], axis=1), grid)
    r = cli("convert", "export", str(ck), "--out", str(tmp_path / "var.pth"))
    assert r.code == 0, r.err
    exported = torch.load(tmp_path / "var.pth", map_location="cpu", weights_only=True)
    assert all(torch.equal(exported[k], v) for k, v in _weights(run).items())


def test_kill_9_mid_run_then_resume_is_bitwise(fsdp_run, tmp_path):
    shards, straight = fsdp_run
    run = tmp_path / "killed"
    interrupted = []
    for at in (3, 6):  # kill every process once this many metrics lines exist (mid-step or mid-save)
        p = accelerate_launch(_args(shards, run, *FSDP), config=tmp_path / "none.yaml", popen=True)
        t0 = time.time()
        while p.poll() is None and time.time() - t0 < 120:
            lines = (run / "metrics.jsonl").read_text().splitlines() if (run / "metrics.jsonl").exists() else []
            if len(lines) >= at:
                kill_9_launch(p)
                done = complete_checkpoints(run)
                interrupted.append(done[-1][0] if done else 0)
                break
            time.sleep(0.005)
        p.wait()
    assert interrupted and min(interrupted) < STEPS, f"no kill landed before the end: {interrupted}"
    p = accelerate_launch(_args(shards, run, *FSDP), config=tmp_path / "none.yaml")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resuming" in (run / "log.txt").read_text()
    a, b = _weights(straight), _weights(run)
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    assert _losses(run) == _losses(straight)


def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous_one(fsdp_run, tmp_path):
    shards, straight = fsdp_run
    run = tmp_path / "run"
    shutil.copytree(straight, run)
    state = run / "checkpoints" / f"step-{STEPS:07d}" / "training_state.pt"
    state.write_bytes(state.read_bytes()[:100])  # a torn write of the newest optimiser state
    p = accelerate_launch(_args(shards, run, *FSDP), config=tmp_path / "none.yaml")
    assert p.returncode == 0, p.stderr[-3000:]
    log = (run / "log.txt").read_text()
    assert f"skipped checkpoint step-{STEPS:07d}" in log and f"from step {STEPS - 2}" in log, log
    a, b = _weights(straight), _weights(run)
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]


def test_a_run_resumes_on_another_number_of_processes(fsdp_run, cli, tmp_path, monkeypatch):
    """2 → 1: the FSDP run's step-4 checkpoint continued by one process (strategy ddp); 1 → 2: a
    one-process run killed after step 4, continued by two FSDP processes. Both end where the
    straight FSDP run ended, and their losses continue its curve."""
    shards, straight = fsdp_run
    two_one = tmp_path / "two-one"
    shutil.copytree(straight, two_one)
    for step, d in complete_checkpoints(two_one):
        if step > 4:
            shutil.rmtree(d)
    (two_one / "metrics.jsonl").write_text("".join(line + "\n" for line in
                                                   (straight / "metrics.jsonl").read_text().splitlines()[:4]))
    r = cli(*_args(shards, two_one))
    assert r.code == 0 and "from step 4" in r.err, r.err

    import fvar_core.train.transformer as tt

    one_two = tmp_path / "one-two"
    kill_at_step(monkeypatch, tt.VARTask, 5)  # killed during step 6, after checkpoint 4
    assert cli(*_args(shards, one_two)).code == 130
    monkeypatch.undo()
    p = accelerate_launch(_args(shards, one_two, *FSDP), config=tmp_path / "none.yaml")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "from step 4" in (one_two / "log.txt").read_text()
    for run in (two_one, one_two):
        assert _max_diff(_weights(straight), _weights(run)) < 1e-5
        assert np.allclose(_losses(run), _losses(straight), rtol=0, atol=1e-5)


def test_a_non_finite_loss_stops_every_process_at_the_same_step(tokens, tmp_path):  # noqa: F811
    _, _, shards, _ = tokens
    run = tmp_path / "nan"
    p = accelerate_launch(_args(shards, run, *FSDP, "--set", "train.lr=1e38"), config=tmp_path / "none.yaml")
    assert p.returncode != 0
    stops = [line for line in p.stderr.splitlines() if line.startswith("fvar: error: loss")]
    assert len(stops) == 2 and len({s.split(" at step ")[1].split(":")[0] for s in stops}) == 1, p.stderr[-3000:]
    assert not complete_checkpoints(run)


def test_refused_combinations_are_one_line(tokens, cli, tmp_path):  # noqa: F811
    _, _, shards, _ = tokens
    r = cli(*_args(shards, tmp_path / "one", *FSDP))
    assert r.code == 2 and "strategy fsdp shards the training state over processes" in r.err
    assert len(r.err.strip().splitlines()[-1]) > 40 and "Traceback" not in r.err
    assert not (tmp_path / "one").exists()
    folder = make_folder(tmp_path / "imgs", per_class=2, size=64)
    r = cli("train-tokenizer", "--preset", "tiny-64", "--data", str(folder), "--out", str(tmp_path / "tok"),
            "--steps", "1", "--set", "tokenizer_train.strategy=fsdp")
    assert r.code == 2 and "tokenizer_train.strategy fsdp is refused" in r.err and "Traceback" not in r.err
    r = cli(*_args(shards, tmp_path / "bad", "--set", "train.strategy=zero3"))
    assert r.code == 2 and "strategy" in r.err
    with pytest.raises(UserError, match="not fp16"):
        check_strategy("fsdp", processes=8, precision="fp16", device_type="cuda")
    with pytest.raises(UserError, match="not on mps"):
        check_strategy("fsdp", processes=2, precision="bf16", device_type="mps")
    check_strategy("fsdp", processes=2, precision="bf16", device_type="cuda")  # the supported GPU case


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fsdp_bf16_on_one_cuda_gpu_trains_like_autocast():
    """The CUDA path of `shard` (NCCL, fp32 gathers and reduction, bf16 autocast) in a one-process
    group: three distillation steps track the unsharded model under the same autocast, and the gathered
    weights and optimiser state load back onto the shards unchanged (benchmarks/gpu_check.sh runs
    this on one GPU; with more it launches the sharded benchmark)."""
    import torch.distributed as dist
    from torch.utils.data import default_collate

    from fvar_core.models.tokenizer import Tokenizer
    from fvar_core.pipelines.bench import RandomTokens
    from fvar_core.presets import load_preset
    from fvar_core.train.loop import build_optimizer
    from fvar_core.train.sharding import gathered, gathered_optimizer, load_optimizer, shard
    from fvar_core.train.transformer import VARTask

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dist.init_process_group("nccl", rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{port}")
    try:
        p = load_preset("tiny-64", ["model.cond_drop=0.0"])
        dev = torch.device("cuda")
        data = RandomTokens(4, p.seq_len, p.tokenizer.vocab_size, p.tokenizer.alias_tokens, p.model.num_classes)
        batch = tuple(x.to(dev) for x in default_collate([data[i] for i in range(4)]))
        losses = {}
        for sharded in (False, True):
            torch.manual_seed(0)
            task = VARTask(p, Tokenizer(p.tokenizer, p.patch_nums).to(dev), distill=True, source="tokens")
            model = task.build().to(dev)
            if sharded:
                shard(model, task.shard_units(model))
            opt = build_optimizer(task, model, p.train, dev)
            task.attach(model)
            model.train()
            losses[sharded] = []
            for step in range(3):
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss, _ = task.step(batch, step)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                losses[sharded].append(loss.item())
        assert np.allclose(losses[True], losses[False], rtol=2e-2), losses
        weights = gathered(task.state_dict(), True)
        params = {n for n, _ in task.student.named_parameters()}
        assert params <= weights.keys() and all(weights[k].device.type == "cpu" and torch.isfinite(weights[k]).all()
                                                for k in params)
        full = gathered_optimizer(opt, True)
        load_optimizer(opt, full)
        again = gathered_optimizer(opt, True)
        assert all(torch.equal(full["state"][i][k], again["state"][i][k])
                   for i in full["state"] for k in ("exp_avg", "exp_avg_sq"))
    finally:
        dist.destroy_process_group()


def test_the_shipped_launch_files_parse():
    """examples/accelerate/*.yaml are configs accelerate reads as DDP and FSDP (the launcher picks the
    loop's strategy from them); the SLURM script is valid bash that launches the FSDP one."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    root = Path(__file__).resolve().parents[1] / "examples"
    ddp, fsdp = (load_config_from_file(str(root / "accelerate" / f"{n}.yaml")) for n in ("ddp", "fsdp"))
    assert ddp.distributed_type == DistributedType.MULTI_GPU and fsdp.distributed_type == DistributedType.FSDP
    assert fsdp.fsdp_config.get("fsdp_version") == 2 and ddp.num_processes == fsdp.num_processes == 8
    script = root / "slurm-fsdp.sbatch"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    assert "examples/accelerate/fsdp.yaml" in script.read_text()
