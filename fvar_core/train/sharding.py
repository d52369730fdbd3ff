"""Sharded training for the one loop: torch's FSDP2 (`fully_shard`), applied in one place.

`fit` calls `shard` once, after the weights of a resumed run are loaded into the plain model and
before the optimiser exists (its state lives on the shards). The order is torchtitan's: the
task's units (each transformer block, the teacher's AG-XAttn layers) are sharded first, the root
last, so the root group holds what is left — embeddings, the head — and FSDP keeps it
unsharded from its forward to the end of the backward (the head is applied by the loss outside
the forward: `train.head_loss`). The models know nothing of it.

Everything that leaves the loop is full, so an FSDP run writes the checkpoints a single-GPU or DDP
run writes (docs/design.md §7.1):
    gathered(sd)          a state dict's DTensors gathered to full tensors on the CPU of the main
                          process (a collective: every rank calls it; the others get {})
    gathered_optimizer    the optimiser's state in torch's own layout, full, main process only
    load_optimizer        that layout back onto the shards (each rank slices what it holds)

Precision: FSDP gathers and reduce-scatters fp32 (master weights and gradient reduction in fp32);
the compute precision comes from the loop's autocast, as in every other run (bf16 matmuls on CUDA,
the residual stream, norms, softmax and VAR's fp32 embeddings kept fp32). A bf16 parameter policy
would halve the all-gather traffic but cast each block's input — the residual stream — to bf16
and break VAR's fp32 embeddings: not the model DDP trains. On the CPU it is the exact fp32 path
the tests compare against DDP.
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, Mapping, Optional, Sequence

import torch
import torch.nn as nn

from fvar_core.errors import UserError

def _dtensor_cls():
    from torch.distributed.tensor import DTensor

    return DTensor


def check_strategy(strategy: str, *, processes: int, precision: str, device_type: str) -> None:
    """The combinations fvar refuses, one line each (before any model is built)."""
    if strategy != "fsdp":
        return
    if processes < 2:
        raise UserError("strategy fsdp shards the training state over processes, and this run has one: launch it "
                        "with `accelerate launch --num_processes N` (N ≥ 2), or use strategy ddp (the default)")
    if device_type == "cuda" and precision == "fp16":
        raise UserError("strategy fsdp trains in bf16 or fp32 on CUDA, not fp16 (its loss scaler would need "
                        "sharded gradients): --set train.precision=bf16")
    if device_type not in ("cuda", "cpu"):
        raise UserError(f"strategy fsdp runs on CUDA GPUs (and on CPUs, for tests), not on {device_type}")


def shard(model: nn.Module, units: Sequence[nn.Module]) -> nn.Module:
    """FSDP2 over `model`: each of `units` its own group (gathered just for its forward and
    backward), then the root. In place; returns `model` (now an FSDPModule)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(reduce_dtype=torch.float32)  # see the module docstring
    for unit in units:
        fully_shard(unit, mp_policy=mp, reshard_after_forward=True)
    fully_shard(model, mp_policy=mp)
    return model


def gathered(sd: Mapping[str, Any], main: bool) -> Dict[str, torch.Tensor]:
    """`sd` with every DTensor gathered to a full CPU tensor, in `sd`'s order (a collective: every
    rank walks the same keys). The main process gets the full state dict, the others {}: only one
    full copy is ever held, one tensor at a time on the device."""
    DTensor = _dtensor_cls()
    out: Dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if isinstance(v, DTensor):
            v = v.full_tensor()
        if main:
            out[k] = v.detach().cpu() if isinstance(v, torch.Tensor) else v
    return out


def gathered_tree(obj: Any, main: bool) -> Any:
    """`gathered` through nested dicts and lists (a task's extra state: the teacher's weights, a
    discriminator's, counters); the main process gets the whole tree, the others None."""
    DTensor = _dtensor_cls()
    if isinstance(obj, Mapping):
        out = {k: gathered_tree(v, main) for k, v in obj.items()}
    elif isinstance(obj, (list, tuple)):
        out = type(obj)(gathered_tree(v, main) for v in obj)
    elif isinstance(obj, torch.Tensor):
        full = obj.full_tensor() if isinstance(obj, DTensor) else obj
        out = full.detach().cpu() if main else None
    else:
        out = obj
    return out if main else None


def gathered_optimizer(opt: torch.optim.Optimizer, main: bool) -> Dict[str, Any]:
    """The optimiser's `state_dict()` with full tensors — the layout a one-process run saves
    (states keyed by parameter index), so any strategy and world size can resume from it."""
    sd = opt.state_dict()
    state = {i: gathered(s, main) for i, s in sd["state"].items()}
    return {"state": state, "param_groups": sd["param_groups"]} if main else {}


def load_optimizer(opt: torch.optim.Optimizer, full: Mapping[str, Any]) -> None:
    """`opt.load_state_dict` of a full state (`gathered_optimizer`'s layout) onto sharded
    parameters: each state tensor of a DTensor parameter becomes a DTensor laid out like it, from
    this rank's slice of the full tensor (every rank read the file; nothing is sent)."""
    from torch.distributed.tensor import distribute_tensor

    DTensor = _dtensor_cls()
    params = [p for g in opt.param_groups for p in g["params"]]
    state = {}
    for i, s in full["state"].items():
        p = params[int(i)] if int(i) < len(params) else None
        if isinstance(p, DTensor):
            s = {k: (distribute_tensor(v.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
                     if isinstance(v, torch.Tensor) and v.shape == p.shape else v) for k, v in s.items()}
        state[i] = s
    opt.load_state_dict({"state": state, "param_groups": full["param_groups"]})


def replicated_state(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The tensors every rank holds whole under sharding (buffers, any unsharded parameter): what
    the loop's "ranks agree" check compares (the shards themselves have no second copy)."""
    DTensor = _dtensor_cls()
    named = list(model.named_parameters()) + list(model.named_buffers())
    return {k: v.detach() for k, v in named if not isinstance(v, DTensor)}


def local_state_bytes(model: nn.Module, opt: Optional[torch.optim.Optimizer] = None) -> Dict[str, int]:
    """Bytes this rank holds of the weights, their gradients and the optimiser state (local shards
    only): what the memory table's per-GPU formula predicts."""
    DTensor = _dtensor_cls()

    def local(t: torch.Tensor) -> torch.Tensor:
        return t.to_local() if isinstance(t, DTensor) else t

    def nbytes(ts: Iterable[torch.Tensor]) -> int:
        return sum(local(t).numel() * local(t).element_size() for t in ts)

    params = [p for p in model.parameters() if p.requires_grad]
    out = {"weights": nbytes(model.parameters()),
           "grads": nbytes(p.grad for p in params if p.grad is not None)}
    if opt is not None:
        out["optimizer"] = nbytes(v for s in opt.state.values() for v in s.values()
                                  if isinstance(v, torch.Tensor) and v.dim() > 0)
    return out
