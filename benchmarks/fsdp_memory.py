"""Memory per GPU under FSDP (train.strategy fsdp) — the table in benchmarks/RESULTS.md — and the
CPU measurement its formula is checked against.

    python benchmarks/fsdp_memory.py measure [--preset d16-256] [--processes 2 4]   # gloo, CPU
    python benchmarks/fsdp_memory.py table [--gpus 8] [--gpu-gib 80] [--markdown]

measure: N processes (gloo on the CPU) build the preset's real training task, shard it with
fvar's own `train.sharding.shard`, and run one real step (random tokens, one image per process);
each reports the bytes of its local weights, gradients and AdamW state (`local_state_bytes`)
against the formula 16 · trainable parameters / N.

table: per GPU of an N-GPU FSDP run, for every preset at 256/512/1024, train and distill:
    sharded state   16 · P / N           fp32 weights, gradients, AdamW m and v, divided exactly
    transient       8 · root + 2 · 8 · block
                    the root group (embeddings, heads: FSDP keeps it gathered, with its unsharded
                    gradients, for the whole step) and two blocks in flight (the running one and the
                    prefetched one), fp32 weights and gradients (`train.sharding`: FSDP gathers fp32,
                    autocast computes in bf16)
    activations     per image, from `memory_table.unit_bytes` of the preset's 256 sibling (same
                    vocabulary; per batch · token · width unit the costs do not depend on the token
                    count with fused attention), times the preset's tokens and width; with full
                    checkpointing plus one block recomputed in the backward pass (per network)
and the largest per-GPU batch whose total stays within 90 % of the GPU (10 % for kernel workspaces
and fragmentation, as in the one-GPU table).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from pathlib import Path
from typing import Dict, List

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.memory_table import GiB, unit_bytes  # noqa: E402
from fvar_core.models.teacher import Teacher  # noqa: E402
from fvar_core.models.transformer import VAR  # noqa: E402
from fvar_core.presets import load_preset  # noqa: E402

SIZES = ("d12", "d16", "d20", "d24", "d30", "d36")
RESOLUTIONS = (256, 512, 1024)


# ------------------------------------------------------------------------------------ measure
def _worker(rank: int, world: int, port: int, name: str, distill: bool, out: str) -> None:
    import torch.distributed as dist
    from torch.utils.data import default_collate

    from fvar_core.models.tokenizer import Tokenizer
    from fvar_core.pipelines.bench import RandomTokens
    from fvar_core.train.loop import build_optimizer
    from fvar_core.train.sharding import local_state_bytes, shard
    from fvar_core.train.transformer import VARTask

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, init_method=f"tcp://127.0.0.1:{port}")
    p = load_preset(name)
    torch.manual_seed(0)
    task = VARTask(p, Tokenizer(p.tokenizer, p.patch_nums), distill=distill, source="tokens")
    model = task.build()
    trainable = sum(x.numel() for x in model.parameters() if x.requires_grad)
    shard(model, task.shard_units(model))
    opt = build_optimizer(task, model, p.train, torch.device("cpu"))
    task.attach(model)
    model.train()
    data = RandomTokens(world, p.seq_len, p.tokenizer.vocab_size, p.tokenizer.alias_tokens if distill else 0,
                        p.model.num_classes)
    loss, _ = task.step(default_collate([data[rank]]), 0)
    loss.backward()
    opt.step()
    held = local_state_bytes(model, opt)
    rows = [None] * world
    dist.all_gather_object(rows, held)
    if rank == 0:
        Path(out).write_text(json.dumps({"preset": name, "mode": "distill" if distill else "train", "processes": world,
                                         "trainable": trainable, "ranks": rows}))
    dist.destroy_process_group()


def measure(name: str, distill: bool, world: int) -> dict:
    import tempfile

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "r.json")
        mp.spawn(_worker, args=(world, port, name, distill, out), nprocs=world, join=True)
        r = json.loads(Path(out).read_text())
    formula = 16 * r["trainable"] / world
    totals = [sum(x.values()) for x in r["ranks"]]
    r.update(formula=formula, worst=max(totals), deviation=max(abs(t / formula - 1) for t in totals))
    return r


# -------------------------------------------------------------------------------------- table
def counts(preset, distill: bool) -> Dict[str, int]:
    """Exact parameter counts (meta device): all, the largest FSDP unit (a block), the root group."""
    with torch.device("meta"):
        s = VAR(preset.model, preset.patch_nums, preset.tokenizer.vocab_size, preset.tokenizer.z_channels)
        nets: List[torch.nn.Module] = [s]
        units = list(s.blocks)
        if distill:
            t = Teacher(preset.model, preset.teacher, preset.patch_nums, preset.tokenizer.vocab_size,
                        preset.tokenizer.z_channels, preset.tokenizer.alias_tokens)
            nets.append(t)
            units += list(t.net.blocks) + list(t.xattn)
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    total = sum(n(m) for m in nets)
    return {"params": total, "block": max(n(u) for u in units), "root": total - sum(n(u) for u in units)}


def table(gpus: int, gpu_gib: float) -> List[dict]:
    rows = []
    budget = 0.9 * gpu_gib * GiB
    measured: Dict[tuple, dict] = {}  # the proxies depend on schedule, vocabulary and mode only
    for size in SIZES:
        for distill in (False, True):
            sibling = load_preset(f"{size}-256")
            key = (tuple(sibling.patch_nums), sibling.tokenizer.vocab_size, sibling.tokenizer.alias_tokens, distill)
            if key not in measured:
                measured[key] = unit_bytes(sibling, distill)
            per_unit = measured[key]
            for res in RESOLUTIONS:
                p = load_preset(f"{size}-{res}")
                c = counts(p, distill)
                nets = 2 if distill else 1
                state = 16 * c["params"] / gpus
                transient = 8 * c["root"] + 2 * 8 * c["block"]
                per_image = p.seq_len * p.model.width
                r = {"preset": p.name, "mode": "distill" if distill else "train", "params": c["params"],
                     "one_gpu_state_gib": 16 * c["params"] / GiB, "state_gib": state / GiB,
                     "transient_gib": transient / GiB}
                for mode in ("full", "pointwise"):
                    block, rest = per_unit[mode]
                    act = (block * p.model.depth + rest) * per_image
                    if mode == "full":
                        act += nets * per_unit["off"][0] * per_image  # one block recomputed per network
                    r[f"act_{mode}_gib_per_image"] = act / GiB
                    r[f"batch_{mode}"] = max(int((budget - state - transient) // act), 0)
                    if mode == "full":  # DDP: the whole state on every GPU, nothing gathered
                        r["batch_ddp_full"] = max(int((budget - 16 * c["params"]) // act), 0)
                rows.append(r)
    return rows


def markdown(rows: List[dict], gpus: int, gpu_gib: float) -> str:
    out = [f"| preset | mode | params | one GPU (DDP): weights + grads + AdamW | largest batch per GPU, DDP, full "
           f"| FSDP ×{gpus}, per GPU: sharded state | transient | activations per image, full / pointwise "
           f"| FSDP: largest batch per GPU, full (global) | pointwise (global) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        def fit(b: int) -> str:
            return f"{b} ({b * gpus})" if b else "does not fit"
        out.append(f"| `{r['preset']}` | {r['mode']} | {r['params'] / 1e9:.2f} B | {r['one_gpu_state_gib']:.1f} GiB | "
                   f"{r['batch_ddp_full'] or 'does not fit'} | {r['state_gib']:.1f} GiB | {r['transient_gib']:.1f} GiB | {r['act_full_gib_per_image']:.2f} / "
                   f"{r['act_pointwise_gib_per_image']:.2f} GiB | {fit(r['batch_full'])} | {fit(r['batch_pointwise'])} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("measure")
    m.add_argument("--preset", default="d16-256")
    m.add_argument("--processes", type=int, nargs="+", default=[2, 4])
    t = sub.add_parser("table")
    t.add_argument("--gpus", type=int, default=8)
    t.add_argument("--gpu-gib", type=float, default=80.0)
    t.add_argument("--markdown", action="store_true")
    a = ap.parse_args()
    if a.cmd == "measure":
        for world in a.processes:
            for distill in (False, True):
                r = measure(a.preset, distill, world)
                print(json.dumps(r), flush=True)
                print(f"{r['preset']} {r['mode']} ×{world}: formula {r['formula'] / 2**20:.1f} MiB per process, "
                      f"measured up to {r['worst'] / 2**20:.1f} MiB ({100 * r['deviation']:.2f} % off)", flush=True)
    else:
        rows = table(a.gpus, a.gpu_gib)
        print(markdown(rows, a.gpus, a.gpu_gib) if a.markdown else "\n".join(json.dumps(r) for r in rows))


if __name__ == "__main__":
    main()
