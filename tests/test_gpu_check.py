"""benchmarks/gpu_check.sh: its CPU dry run starts every command it would run on a GPU."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_check  # noqa: E402


def test_dry_run_maps_every_job_to_a_toy_cpu_run():
    for name, cmd, _ in gpu_check.JOBS:
        toy = gpu_check.dry(cmd)
        if cmd.startswith("pytest"):
            assert toy.endswith("--collect-only")
            continue
        assert toy.endswith("--device cpu") and "tiny-64" in toy and "--batch 2" in toy, toy
        assert "reduce-overhead" not in toy and " --compile " not in f" {toy} ".replace("--compile off", ""), toy
        assert toy.split()[:2] == cmd.split()[:2]  # the same subcommand


def test_dry_run_starts_every_command_and_writes_the_report(tmp_path):
    r = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    doc = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [j["name"] for j in doc["jobs"]] == [n for n, _, _ in gpu_check.JOBS]
    assert all(j["status"] == "ok" for j in doc["jobs"]), [(j["name"], j["status"]) for j in doc["jobs"]]
    bench_jobs = [j for j in doc["jobs"] if not j["name"].startswith("cuda")]
    assert all(j["result"]["machine"]["device_type"] == "cpu" for j in bench_jobs)
    md = (tmp_path / "gpu_check.md").read_text()
    assert "Dry run" in md and "| 191.6 | ≥ 383.2 |" in md and "| 118.4 | ≥ 355.2 |" in md and "≤ 27.1" in md


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_without_a_gpu_the_real_run_refuses_in_one_line(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--out", str(tmp_path)],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "no CUDA GPU" in r.stderr
