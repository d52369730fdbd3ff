"""Test data the tests generate (image folders of shapes, gradients and text-like strokes), faults
they inject, and multi-process launches."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

from fvar_core.focus.testimages import draw_image_folder


def make_folder(root: Path, per_class: int = 8, size: int = 80, corrupt: int = 0) -> Path:
    """2 classes of shapes, gradients and text-like strokes; `corrupt` unreadable files added."""
    draw_image_folder(root, per_class=per_class, size=size, seed=0)
    for j in range(corrupt):
        (root / "shapes" / f"broken{j}.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    return root


def kill_at_step(monkeypatch, task_cls, step: int):
    """Make task_cls.step raise KeyboardInterrupt (what a kill looks like to the loop) at `step`;
    returns a function that undoes it."""
    real = task_cls.step

    def dying(self, batch, s):
        if s == step:
            raise KeyboardInterrupt
        return real(self, batch, s)

    monkeypatch.setattr(task_cls, "step", dying)
    return lambda: monkeypatch.setattr(task_cls, "step", real)


def accelerate_launch(args: Sequence[str], *, processes: int = 2, popen: bool = False, config: Path,
                      timeout: float = 300):
    """`accelerate launch` of `fvar ARGS` as `processes` processes over gloo on the CPU, on a free
    rendezvous port (torchrun's fixed 29500 may still be held by the previous launch). `--multi_gpu`
    is accelerate's torchrun launcher, which falls back to gloo without GPUs (`--cpu
    --num_processes 2` would start ONE process). `config`: a path with no accelerate config file,
    so the user's own is not read. popen: a Popen in its own session (kill it with `kill_9_launch`);
    else the finished CompletedProcess."""
    launcher = shutil.which("accelerate", path=os.path.dirname(sys.executable))
    assert launcher, "accelerate's launcher is installed with fvar"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    cmd = [launcher, "launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
           "--main_process_port", port, "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "fvar_cli.app",
           *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_CONFIG_FILE": str(config)}
    if popen:
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                                start_new_session=True)
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)


def _descendants(pid: int) -> list:
    """Every process under `pid` (from /proc's parent links)."""
    children: dict = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def kill_9_launch(proc: subprocess.Popen, timeout: float = 30) -> None:
    """kill -9 a launcher and every process it started, at once, and wait until they are gone:
    torchrun starts each rank in a session of its own, out of reach of os.killpg, so killing the
    launcher's group alone leaves the ranks training on as orphans."""
    pids = [proc.pid, *_descendants(proc.pid)]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    t0 = time.time()
    while any(_alive(pid) for pid in pids):
        assert time.time() - t0 < timeout, f"processes {pids} survived SIGKILL"
        time.sleep(0.01)


def _alive(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False
