"""The GPU check: CUDA-only tests and the `fvar bench` figures of the issue "the GPU path", in one
run of at most ~8 minutes on one CUDA GPU, written as one JSON and one markdown table that puts the
official VAR code's H100 figures beside the measured ones.

    bash benchmarks/gpu_check.sh [--out DIR] [--budget-s 480]
    bash benchmarks/gpu_check.sh --dry-run      # on any machine: every command parses and starts

--dry-run runs every job on the CPU at toy size (preset tiny-64, batch 2, one step, no compile,
`pytest --collect-only` for the tests), so CI can check that the script and each command it runs
still work; its numbers mean nothing. Jobs run in order until the time budget is spent; a job that
fails or times out is recorded as such and the next one runs.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

# The official VAR code on one H100 80GB (the measurements, from the project's notes):
# d16-256, batch 64, bf16 — training and sampling (cfg 1.5, top-k 900, top-p 0.96, decode included).
OFFICIAL_H100 = {"train_img_per_s": 191.6, "train_peak_gib": 45.1, "train_mfu": 0.214, "sample_img_per_s": 118.4,
                 "sample_decode_share": 0.36}
# The targets (benchmarks/RESULTS.md): train ≥ 2× at ≤ 60% of the memory; sample ≥ 3×.
TARGETS = {"train_img_per_s": 2 * OFFICIAL_H100["train_img_per_s"],
           "train_peak_gib": 0.6 * OFFICIAL_H100["train_peak_gib"],
           "sample_img_per_s": 3 * OFFICIAL_H100["sample_img_per_s"]}

# name, command (after `fvar`, or "pytest …", or "launch …": `fvar …` under `accelerate launch` on every
# GPU), timeout seconds. {json} is the job's JSON path, {batch16} 16 images per GPU.
JOBS = [
    ("cuda-tests", "pytest -q -rs -m cuda", 150),
    ("train-d16-eager", "bench train --preset var-d16-256 --batch 64 --steps 10 --warmup 3 --no-compile "
                        "--precision bf16 --json {json}", 90),
    ("train-d16-compiled", "bench train --preset var-d16-256 --batch 64 --steps 10 --warmup 3 --compile "
                           "--precision bf16 --no-flops --json {json}", 240),
    ("train-d16-pointwise", "bench train --preset var-d16-256 --set train.activation_checkpointing=pointwise "
                            "--batch 64 --steps 5 --warmup 2 --no-compile --precision bf16 --no-flops --json {json}", 90),
    ("distill-d16-eager", "bench train --preset d16-256 --distill --batch 64 --steps 5 --warmup 2 --no-compile "
                          "--precision bf16 --no-flops --json {json}", 120),
    ("train-d30-full-ckpt", "bench train --preset var-d30-256 --set train.activation_checkpointing=full --batch 64 "
                            "--steps 3 --warmup 2 --no-compile --precision bf16 --no-flops --json {json}", 150),
    ("sample-d16", "bench sample --preset var-d16-256 --batch 64 --steps 3 --json {json}", 120),
    ("tokenize-var", "bench tokenize --preset var-d16-256 --batch 32 --steps 3 --json {json}", 60),
    ("tokenize-fvar", "bench tokenize --preset d16-256 --batch 16 --steps 3 --json {json}", 90),
    ("sample-d16-compiled", "bench sample --preset var-d16-256 --batch 64 --steps 3 --compile reduce-overhead "
                            "--no-flops --json {json}", 240),
    # the training-free speed-ups (docs/sampling-speed.md), each against sample-d16 above
    ("sample-d16-cfg-scales", "bench sample --preset var-d16-256 --batch 64 --steps 3 --cfg-scales 7 --no-flops "
                              "--json {json}", 90),
    ("sample-d16-prune", "bench sample --preset var-d16-256 --batch 64 --steps 3 --prune 13:0.5,16:0.75 --no-flops "
                         "--json {json}", 90),
    ("sample-d16-refine-d4", "bench sample --preset var-d16-256 --batch 64 --steps 3 --refiner-depth 4 "
                             "--refine-from 7 --no-flops --json {json}", 90),
    ("sample-d16-512-kv-budget", "bench sample --preset d16-512 --batch 16 --steps 2 --kv-budget 1,1 --no-flops "
                                 "--json {json}", 120),
    # sharded training (docs/design.md §7.1): with several GPUs the d30 distillation that fits no single
    # GPU at B=64, measured per GPU against the FSDP memory table; with one GPU the CUDA FSDP test
    ("fsdp-d30-distill", "launch bench train --preset d30-256 --distill --set train.strategy=fsdp "
                         "--set train.activation_checkpointing=full --batch {batch16} --steps 3 --warmup 2 "
                         "--no-compile --precision bf16 --no-flops --json {json}", 300),
]


def dry(cmd: str) -> str:
    """The toy CPU version of a job's command (same subcommand and flags, tiny sizes)."""
    if cmd.startswith("pytest"):
        return cmd + " --collect-only"
    a = shlex.split(cmd)
    out: List[str] = []
    i = 0
    toy = {"--preset": "tiny-64", "--batch": "2", "--steps": "1", "--warmup": "1", "--prune": "4:0.5",
           "--refine-from": "2", "--cfg-scales": "2"}
    while i < len(a):
        if a[i] in toy:
            out += [a[i], toy[a[i]]]
            i += 2
        elif a[i] == "--compile" and a[0] == "bench" and a[1] == "train":
            out.append("--no-compile")
            i += 1
        elif a[i] == "--compile":  # sample's --compile MODE
            out += ["--compile", "off"]
            i += 2
        else:
            out.append(a[i])
            i += 1
    return shlex.join(out + ["--device", "cpu"])


def launch(argv: List[str], processes: int) -> List[str]:
    """`accelerate launch` of `fvar ARGV` over `processes` GPUs (gloo processes on a CPU dry run);
    with one GPU, the CUDA FSDP test instead (FSDP needs two processes, NCCL one GPU each)."""
    if processes < 2:
        return [sys.executable, "-m", "pytest", "-q", "-rs", "-m", "cuda", "tests/test_fsdp.py"]
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--main_process_port", port, "--dynamo_backend", "no", "-m", "fvar_cli.app", *argv]


def run_job(name: str, cmd: str, timeout: float, out_dir: Path, processes: int = 1) -> Dict[str, Any]:
    json_path = out_dir / f"{name}.json"
    argv = shlex.split(cmd.format(json=json_path, batch16=16 * processes))
    if argv[0] == "launch":
        argv = launch(argv[1:], processes)
    elif argv[0] == "pytest":
        argv = [sys.executable, "-m", "pytest", *argv[1:]]
    else:
        argv = [sys.executable, "-m", "fvar_cli.app", *argv]
    t0 = time.perf_counter()
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        status = "ok" if p.returncode == 0 else f"failed (exit {p.returncode})"
        tail = (p.stdout + p.stderr)[-3000:]
    except subprocess.TimeoutExpired as e:
        status, tail = f"timed out after {timeout:.0f} s", ((e.stdout or b"") + (e.stderr or b"")).decode(errors="replace")[-3000:] \
            if isinstance(e.stdout, bytes) else str(e)
    rec: Dict[str, Any] = {"name": name, "command": shlex.join(argv[2:]), "status": status,
                           "wall_s": round(time.perf_counter() - t0, 1), "output_tail": tail}
    if json_path.is_file():
        rec["result"] = json.loads(json_path.read_text())
    return rec


def _res(jobs: Dict[str, Dict[str, Any]], name: str) -> Optional[Dict[str, Any]]:
    j = jobs.get(name)
    return j["result"]["results"] if j and "result" in j else None


def markdown(doc: Dict[str, Any]) -> str:
    jobs = {j["name"]: j for j in doc["jobs"]}
    gpu = doc.get("device") or "?"
    lines = [f"# GPU check — {gpu}", "", f"{doc['created']}; torch {doc.get('torch')}, CUDA {doc.get('cuda')}."
             + (" **Dry run on the CPU: toy sizes, the numbers mean nothing.**" if doc["dry_run"] else ""), "",
             "The official figures are the official VAR code on one **H100 80GB**; an H200 has 1.4× its memory "
             "bandwidth (4.8 vs 3.35 TB/s) and the same bf16 peak, so on an H200 the memory-bound parts run "
             "faster: compare ratios with that in mind.", "",
             "| measure | official (H100) | target | measured (this GPU) | ratio to official |", "|---|---|---|---|---|"]

    def add(label: str, official: Optional[float], target: Optional[str], value: Optional[float], fmt: str) -> None:
        v = "—" if value is None else format(value, fmt)
        o = "—" if official is None else format(official, fmt)
        r = "—" if value is None or not official else f"{value / official:.2f}×"
        lines.append(f"| {label} | {o} | {target or '—'} | {v} | {r} |")

    for name, label in (("train-d16-eager", "train d16-256 B=64 bf16, eager"),
                        ("train-d16-compiled", "train d16-256 B=64 bf16, compiled"),
                        ("train-d16-pointwise", "train d16-256 B=64 bf16, eager + pointwise ckpt")):
        r = _res(jobs, name)
        add(f"{label}: img/s", OFFICIAL_H100["train_img_per_s"], f"≥ {TARGETS['train_img_per_s']:.1f}",
            r and r["img_per_s"], ".1f")
        add(f"{label}: peak GiB", OFFICIAL_H100["train_peak_gib"], f"≤ {TARGETS['train_peak_gib']:.1f}",
            r and r["peak_memory"]["peak_gib"], ".1f")
    r = _res(jobs, "train-d16-eager")
    add("train d16-256: MFU", OFFICIAL_H100["train_mfu"], None, r and r.get("mfu"), ".3f")
    r = _res(jobs, "distill-d16-eager")
    add("distill d16-256 B=64 (teacher + student): img/s", None, None, r and r["img_per_s"], ".1f")
    add("distill d16-256: peak GiB", None, None, r and r["peak_memory"]["peak_gib"], ".1f")
    r = _res(jobs, "train-d30-full-ckpt")
    add("train d30-256 B=64, full checkpointing: img/s", None, None, r and r["img_per_s"], ".1f")
    add("train d30-256: peak GiB (paper: 49 GiB, RESULTS.md)", None, "≤ 80", r and r["peak_memory"]["peak_gib"], ".1f")
    r = _res(jobs, "fsdp-d30-distill")
    n = doc.get("gpus", 1)
    add(f"distill d30-256 FSDP ×{n}, 16 per GPU: img/s", None, None, r and r["img_per_s"], ".1f")
    add(f"distill d30-256 FSDP ×{n}: peak GiB per GPU (table: {60.6 / n + 1.4 + 16 * 0.75:.1f})", None, "≤ 80",
        r and r["peak_memory"]["peak_gib"], ".1f")
    for name, label in (("sample-d16", "sample d16-256 B=64"), ("sample-d16-compiled", "sample d16-256, reduce-overhead")):
        r = _res(jobs, name)
        add(f"{label}: img/s with decode", OFFICIAL_H100["sample_img_per_s"], f"≥ {TARGETS['sample_img_per_s']:.1f}",
            r and r["img_per_s"], ".1f")
        add(f"{label}: img/s without decode", None, None, r and r["img_per_s_no_decode"], ".1f")
        add(f"{label}: decode share", OFFICIAL_H100["sample_decode_share"], None, r and r["decode_share"], ".2f")
    for name, label in (("tokenize-var", "tokenize var-compat 256 px"), ("tokenize-fvar", "tokenize FVAR d16-256")):
        r = _res(jobs, name)
        add(f"{label}: img/s", None, None, r and r["img_per_s"], ".1f")
    lines += ["", "| job | status | wall s |", "|---|---|---|"]
    lines += [f"| {j['name']} | {j['status']} | {j['wall_s']} |" for j in doc["jobs"]]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("gpu-check"))
    ap.add_argument("--budget-s", type=float, default=480.0, help="stop starting jobs after this many seconds")
    ap.add_argument("--dry-run", action="store_true", help="toy CPU versions of every job (for CI)")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    import torch

    if not a.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU here (use --dry-run to check the commands on the CPU)", file=sys.stderr)
        return 2
    doc: Dict[str, Any] = {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "dry_run": a.dry_run,
                           "torch": torch.__version__, "cuda": torch.version.cuda,
                           "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() and not a.dry_run
                           else "CPU (dry run)", "official_h100": OFFICIAL_H100, "targets": TARGETS, "jobs": [],
                           "gpus": 2 if a.dry_run else torch.cuda.device_count()}
    t0 = time.perf_counter()
    for name, cmd, timeout in JOBS:
        if a.dry_run:
            cmd, timeout = dry(cmd), 300
        left = a.budget_s - (time.perf_counter() - t0)
        if left <= 10 and not a.dry_run:
            doc["jobs"].append({"name": name, "status": "skipped (time budget spent)", "wall_s": 0})
            continue
        rec = run_job(name, cmd, timeout if a.dry_run else min(timeout, left), a.out, doc["gpus"])
        print(f"{name}: {rec['status']} in {rec['wall_s']} s", flush=True)
        doc["jobs"].append(rec)
        (a.out / "gpu_check.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
    (a.out / "gpu_check.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
    (a.out / "gpu_check.md").write_text(markdown(doc))
    print(f"wrote {a.out / 'gpu_check.json'} and {a.out / 'gpu_check.md'}")
    return 0 if all(j["status"] == "ok" for j in doc["jobs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
