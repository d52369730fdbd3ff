"""Training memory per preset on paper: weights, optimiser, activations (checkpointing off /
pointwise / full) and logits, for one GPU at a given batch — the table in benchmarks/RESULTS.md.

    python benchmarks/memory_table.py [--batch 64] [--presets d16-256 d30-256 ...] [--markdown]

Parameters are counted exactly (models built on the meta device, teacher included for distill).
Weights, gradients and AdamW state are fp32 (bf16 autocast keeps fp32 master weights): 16 bytes per
trainable parameter. Activations are *measured*, not modelled: a proxy of the preset (same token
schedule, vocabulary and head width 64; width 256, batch 8, depths 2 and 4) runs the real step (`VARTask.step`)
under bf16 autocast on the CPU, and `pipelines.bench.TensorMemory` gives the tensor bytes alive at
the end of the forward pass (what the backward pass will read) per checkpointing mode; per block
and for the rest (`row`), per (batch · token · width), scaled to the preset — activations grow
linearly in each at a fixed head width, with attention through flash/fused kernels (no L × L
matrix kept). CPU autocast
casts the same op families as CUDA's (matmuls to bf16, norms and softmax in fp32), so the dtype mix
matches a GPU run; kernel workspaces and allocator fragmentation are not included (add ~10%).
"""
from __future__ import annotations

import argparse
import json
from typing import Optional

import torch
from torch.utils.data import default_collate

from fvar_core.models.teacher import Teacher
from fvar_core.models.tokenizer import Tokenizer
from fvar_core.models.transformer import VAR
from fvar_core.pipelines.bench import RandomTokens, TensorMemory
from fvar_core.presets import load_preset
from fvar_core.train.transformer import VARTask

GiB = 2 ** 30
MODES = ("off", "pointwise", "full")
PROXY_WIDTH, PROXY_BATCH = 256, 8


def params(preset, distill: bool) -> int:
    with torch.device("meta"):
        s = VAR(preset.model, preset.patch_nums, preset.tokenizer.vocab_size, preset.tokenizer.z_channels)
        n = sum(p.numel() for p in s.parameters())
        if distill:
            t = Teacher(preset.model, preset.teacher, preset.patch_nums, preset.tokenizer.vocab_size,
                        preset.tokenizer.z_channels, preset.tokenizer.alias_tokens)
            n += sum(p.numel() for p in t.parameters())
    return n


def proxy_activation_bytes(preset, distill: bool, depth: int) -> dict:
    """{mode: tensor bytes alive after the forward pass} of a proxy of the preset at this depth."""
    p = load_preset(preset.name, [f"model.depth={depth}", f"model.width={PROXY_WIDTH}",
                                  f"model.num_heads={PROXY_WIDTH // 64}", "teacher.xattn_blocks=1", "teacher.feat_blocks=1"])
    torch.manual_seed(0)
    task = VARTask(p, Tokenizer(p.tokenizer, p.patch_nums), distill=distill, source="tokens")
    model = task.build()
    task.attach(model)
    model.train()
    B = PROXY_BATCH
    data = RandomTokens(B, p.seq_len, p.tokenizer.vocab_size, p.tokenizer.alias_tokens if distill else 0,
                        p.model.num_classes)
    b = default_collate([data[i] for i in range(B)])
    out = {}
    nets = [task.student] + ([task.teacher.net] if task.teacher is not None else [])
    for mode in MODES:
        for n in nets:
            n.activation_checkpointing = mode
        with torch.autocast("cpu", dtype=torch.bfloat16), TensorMemory() as mem:
            loss, _ = task.step(b, 0)
            out[mode] = mem.live
        del loss
    return out


def unit_bytes(preset, distill: bool) -> dict:
    """{mode: (per block, rest)} activation bytes per batch · token · width unit. Per block: the
    difference of a depth-4 and a depth-2 proxy; the rest (embeddings, head input, the loss's
    stored gradients): the depth-2 proxy minus two blocks, scaled by batch · token · width too (an
    overestimate: its V·C part does not grow with B)."""
    two, four = proxy_activation_bytes(preset, distill, 2), proxy_activation_bytes(preset, distill, 4)
    proxy_units = PROXY_BATCH * preset.seq_len * PROXY_WIDTH
    out = {}
    for mode in MODES:
        block = (four[mode] - two[mode]) / 2 / proxy_units
        out[mode] = (block, (two[mode] - 2 * block * proxy_units) / proxy_units)
    return out


def row(name: str, batch: int, distill: bool, units_of: Optional[dict] = None) -> dict:
    """The table's row of a preset at `batch`. units_of: `unit_bytes` measured on another preset
    of the same vocabulary (the 512/1024 presets reuse their 256 sibling's: per unit the costs do
    not depend on the token count with fused attention, and a CPU proxy at 9,451 tokens would keep
    the L × L scores its CPU kernel materialises)."""
    p = load_preset(name)
    per_unit = units_of if units_of is not None else unit_bytes(p, distill)
    units = batch * p.seq_len * p.model.width
    n = params(p, distill)
    nets = 2 if distill else 1
    r = {"preset": name, "mode": "distill" if distill else "train", "batch": batch, "params": n,
         "weights_grads_adam_gib": 16 * n / GiB,
         "logits_full_gib": 3 * nets * batch * p.seq_len * p.tokenizer.vocab_size * 4 / GiB}
    for mode in MODES:
        block, rest = per_unit[mode]
        r[f"activations_{mode}_gib"] = (block * p.model.depth + rest) * units / GiB
        r[f"block_{mode}_gib"] = block * units / GiB
    # with full checkpointing the backward recomputes one block at a time: its activations come back
    r["peak_full_gib"] = r["weights_grads_adam_gib"] + r["activations_full_gib"] + nets * r["block_off_gib"]
    r["peak_pointwise_gib"] = r["weights_grads_adam_gib"] + r["activations_pointwise_gib"]
    return r


def markdown(rows) -> str:
    head = ("| preset | mode | batch | params | weights + grads + AdamW | activations: off | pointwise | full "
            "| full logits (before) | peak, pointwise | peak, full |\n|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        lines.append(f"| `{r['preset']}` | {r['mode']} | {r['batch']} | {r['params'] / 1e9:.2f} B | "
                     f"{r['weights_grads_adam_gib']:.1f} GiB | {r['activations_off_gib']:.1f} | "
                     f"{r['activations_pointwise_gib']:.1f} | {r['activations_full_gib']:.1f} | "
                     f"{r['logits_full_gib']:.1f} | {r['peak_pointwise_gib']:.1f} GiB | {r['peak_full_gib']:.1f} GiB |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--presets", nargs="*", default=["var-d16-256", "d16-256", "d20-256", "d24-256", "d30-256",
                                                      "d36-256"])
    ap.add_argument("--distill", action="store_true", help="also the distillation step of FVAR presets")
    ap.add_argument("--markdown", action="store_true")
    a = ap.parse_args()
    rows = []
    for name in a.presets:
        rows.append(row(name, a.batch, False))
        if a.distill and not name.startswith("var-"):
            rows.append(row(name, a.batch, True))
    print(markdown(rows) if a.markdown else "\n".join(json.dumps(r) for r in rows))


if __name__ == "__main__":
    main()
