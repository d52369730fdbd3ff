"""Peak memory and time of one training step, the current step against the pre-#14 one, in one process.

    python benchmarks/step_memory.py [--preset var-d16-256] [--distill] [--batch 8] [--rounds 3]

The baseline is the old step rebuilt from today's parts: full (B, L, V) logits through
`train.distill.distill_loss`, a separate argmax for the accuracy, no activation checkpointing, the
unfused AdamW. The current step is `VARTask.step` as `fvar train`/`fvar distill` run it (chunked head
losses, the device's default checkpointing, fused AdamW). Both run on the same model (depth 8 / width
512 unless --set says otherwise), alternately, so the machine's state is the same for both. Peak
memory is the exact peak of live tensor bytes during the step (`pipelines.bench.TensorMemory`, in an
untimed step); time is the median of the timed steps. Prints one JSON line per mode.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch.utils.data import default_collate

from fvar_core.models.tokenizer import Tokenizer
from fvar_core.pipelines.bench import RandomTokens, TensorMemory, machine
from fvar_core.presets import load_preset
from fvar_core.train.distill import distill_loss
from fvar_core.train.transformer import VARTask, var_param_groups


def old_step(task: VARTask, batch, step: int):
    """The step as it was before the chunked head losses: full logits, then the loss, then argmax."""
    structure, alias, label = task.tokens(batch)
    sizes = [p * p for p in task.preset.patch_nums]
    x_in = task.tok.quantize.idx_to_var_input(list(torch.split(structure, sizes, dim=1)))
    if task.teacher is None:
        logits = task.run(label, x_in)
        loss, parts = distill_loss(logits, structure, task.preset.teacher)
    else:
        logits, sf, t_logits, tf = task.run(label, x_in, alias)
        loss, parts = distill_loss(logits, structure, task.preset.teacher, teacher_logits=t_logits,
                                   student_feats=sf, teacher_feats=tf)
        parts["teacher_acc"] = (t_logits.detach().argmax(-1) == structure).float().mean()
    with torch.no_grad():
        hit = logits.detach().argmax(-1) == structure
        parts["acc"], parts["tail_acc"] = hit.float().mean(), hit[:, -sizes[-1]:].float().mean()
    return loss, parts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default=None, help="default: var-d16-256 (train), d16-256 (--distill)")
    ap.add_argument("--set", nargs="*", default=["model.depth=8", "model.width=512", "model.num_heads=8"])
    ap.add_argument("--distill", action="store_true")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3, help="timed steps per mode (alternating)")
    a = ap.parse_args()
    p = load_preset(a.preset or ("d16-256" if a.distill else "var-d16-256"), a.set)
    torch.manual_seed(0)
    task = VARTask(p, Tokenizer(p.tokenizer, p.patch_nums), distill=a.distill, source="tokens")
    model = task.build()
    task.attach(model)
    model.train()
    data = RandomTokens(a.batch, p.seq_len, p.tokenizer.vocab_size, p.tokenizer.alias_tokens if a.distill else 0,
                        p.model.num_classes)
    batch = default_collate([data[i] for i in range(a.batch)])
    nets = [task.student] + ([task.teacher.net] if task.teacher is not None else [])
    modes = {"before": (old_step, "off", False), "now": (VARTask.step, task.checkpointing, True)}
    opts = {m: torch.optim.AdamW(var_param_groups(model), lr=1e-6, fused=fused) for m, (_, _, fused) in modes.items()}

    def one(mode: str):
        fn, ckpt, _ = modes[mode]
        for n in nets:
            n.activation_checkpointing = ckpt
        torch.manual_seed(1)
        loss, _ = fn(task, batch, 0)
        loss.backward()
        opts[mode].step()
        opts[mode].zero_grad(set_to_none=True)
        return float(loss)

    out = {m: {"seconds": []} for m in modes}
    for m in modes:  # warm-up (optimiser state allocated), then the exact memory account
        one(m)
        with TensorMemory() as mem:
            out[m]["loss"] = one(m)
        out[m]["peak_tensor_bytes"] = mem.peak
    for _ in range(a.rounds):
        for m in modes:
            t = time.perf_counter()
            one(m)
            out[m]["seconds"].append(time.perf_counter() - t)
    base = out["before"]
    for m, r in out.items():
        r["median_s"] = statistics.median(r["seconds"])
        r["memory_vs_before"] = r["peak_tensor_bytes"] / base["peak_tensor_bytes"]
        r["time_vs_before"] = r["median_s"] / statistics.median(base["seconds"])
        print(json.dumps({"mode": m, "preset": p.name, "distill": a.distill, "batch": a.batch,
                          "checkpointing": modes[m][1], **r, "device": machine("cpu")["device"]}))


if __name__ == "__main__":
    main()
