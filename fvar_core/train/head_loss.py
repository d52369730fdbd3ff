"""The training losses straight from the head's input: head + cross-entropy (+ the distillation KL)
in chunks of token rows, so the batch's (B, L, V) logits never exist.

`train.distill.distill_loss` defines the losses on full logits (the reference, and what the tests
compare against within 1e-6); this computes the same numbers with O(chunk · V) memory. At d16-256
B=64 the logits of one network are 64·680·4096 fp32 values (0.7 GB), and the eager path kept three
such tensors per network alive into the backward (logits, log-softmax, their gradient) — twice
more in distillation, whose KL took its own log-softmax of both.

Each chunk's logits are made once and used for everything: the CE of the student and of the
teacher, the KL at temperature T (from the same log-probabilities when T = 1), the argmax hits the
step logs as accuracy. The gradients are computed right there (the loss is linear in its parts, so
the backward only scales what the forward stored: per part, dh (N, C) and dW (V, C) — the
"fused linear cross-entropy" of Liger-Kernel), instead of keeping the logits for later.
Matmuls run in the autocast dtype when autocast is on (as `nn.Linear` would), softmax and the
losses in fp32.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from fvar_core.train.distill import at_least_fp32

# Rows per chunk: chunk_rows · V ≈ 2²¹ logits (8 MiB of fp32 per temporary at any vocabulary).
CHUNK_ELEMENTS = 1 << 21


def chunk_rows(vocab: int, elements: int = CHUNK_ELEMENTS) -> int:
    return max(1, elements // max(vocab, 1))


@dataclass
class HeadLosses:
    """Scalars (differentiable where they train something) and per-token argmax hits (N,) bool."""

    student_ce: torch.Tensor
    student_hits: torch.Tensor
    teacher_ce: Optional[torch.Tensor] = None
    teacher_hits: Optional[torch.Tensor] = None
    kd: Optional[torch.Tensor] = None


def _compute_dtype(h: torch.Tensor) -> torch.dtype:
    dev = h.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else h.dtype


def _ce_grad(logp: torch.Tensor, y: torch.Tensor, eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Summed label-smoothed CE of a chunk (as F.cross_entropy's label_smoothing) and its gradient
    w.r.t. the logits: softmax − ((1 − ε)·onehot + ε/V)."""
    nll = -logp.gather(1, y[:, None]).squeeze(1)
    loss = (1 - eps) * nll.sum() + (eps * -logp.mean(1).sum() if eps else 0.0)
    g = logp.exp()
    g.scatter_add_(1, y[:, None], torch.full_like(g[:, :1], -(1 - eps)))
    if eps:
        g.sub_(eps / logp.shape[1])
    return loss, g


class _FusedHeadLoss(torch.autograd.Function):
    """(h_s, W_s, b_s, h_t, W_t, b_t) -> (ce_s, ce_t, kd, hits_s, hits_t); teacher inputs may be
    None. ce_* are token means; kd = T²·KL(p_t^T ‖ p_s^T) per token (no gradient to the teacher)."""

    @staticmethod
    def forward(ctx, h_s, w_s, b_s, h_t, w_t, b_t, y, eps: float, temperature: float, want_kd: bool,
                teacher_ce: bool, rows: int):
        N = h_s.shape[0]
        ct = _compute_dtype(h_s)
        teach = h_t is not None
        need = ctx.needs_input_grad
        # the teacher's CE trains it only when it is in the loss (teacher_ce): otherwise no gradient work
        grads_s, grads_t = need[0] or need[1] or need[2], teach and teacher_ce and (need[3] or need[4] or need[5])
        T = float(temperature)
        acc = {k: torch.zeros((), dtype=at_least_fp32(h_s).dtype, device=h_s.device) for k in ("ce_s", "ce_t", "kd")}
        # per part: gradient of the part w.r.t. (h, W, b), each for one token-mean of the part
        parts = {"ce_s": [], "kd": [], "ce_t": []}
        gw = {k: None for k in parts}
        hits_s = torch.empty(N, dtype=torch.bool, device=h_s.device)
        hits_t = torch.empty(N, dtype=torch.bool, device=h_s.device) if teach else None
        with torch.autocast(h_s.device.type, enabled=False):
            ws, bs = w_s.to(ct), b_s.to(ct)
            wt, bt = (w_t.to(ct), b_t.to(ct)) if teach else (None, None)

            def add_grad(part: str, g: torch.Tensor, h: torch.Tensor, w: torch.Tensor) -> None:
                g = g.div_(N).to(ct)
                parts[part].append(g @ w)
                dw, db = g.t() @ h, g.sum(0)
                if gw[part] is None:
                    gw[part] = [at_least_fp32(dw), at_least_fp32(db)]
                else:
                    gw[part][0] += dw
                    gw[part][1] += db

            def head_ce(part: str, h, w, b, hits, want_grad: bool, s: int, e: int):
                """One network's chunk: its logits' CE (summed into acc), hits and gradient."""
                hc = h[s:e].to(ct)
                logits = at_least_fp32(F.linear(hc, w, b))  # (n, V)
                hits[s:e] = logits.argmax(1) == y[s:e]
                logp = F.log_softmax(logits, dim=1)
                loss, g = _ce_grad(logp, y[s:e], eps)
                acc[part] += loss
                if want_grad:
                    add_grad(part, g, hc, w)
                return hc, logits, logp

            for s in range(0, N, rows):
                e = min(N, s + rows)
                hs, ls, lp_s = head_ce("ce_s", h_s, ws, bs, hits_s, grads_s, s, e)
                if not teach:
                    continue
                _, lt, lp_t = head_ce("ce_t", h_t, wt, bt, hits_t, grads_t, s, e)
                if want_kd:
                    lq_s, lq_t = (lp_s, lp_t) if T == 1.0 else (F.log_softmax(ls / T, 1), F.log_softmax(lt / T, 1))
                    q_t = lq_t.exp()
                    acc["kd"] += (q_t * (lq_t - lq_s)).sum() * (T * T)
                    if grads_s:  # d(T²·KL)/d logits_s = T·(q_s − q_t)
                        add_grad("kd", lq_s.exp().sub_(q_t).mul_(T), hs, ws)
        saved, layout = [], {}
        for part, chunks in parts.items():
            if chunks:
                layout[part] = len(saved)
                saved += [torch.cat(chunks).to(h_s.dtype if part != "ce_t" else h_t.dtype), *gw[part]]
        ctx.layout = layout
        ctx.set_materialize_grads(False)  # an unused part gets None, not a zero tensor to multiply
        ctx.save_for_backward(*saved)
        ctx.mark_non_differentiable(hits_s, *( [hits_t] if teach else []))
        out = [acc["ce_s"] / N, acc["ce_t"] / N if teach else None, acc["kd"] / N if teach and want_kd else None]
        return (*out, hits_s, hits_t)

    @staticmethod
    def backward(ctx, g_ce_s, g_ce_t, g_kd, _hs, _ht):
        saved, lay = ctx.saved_tensors, ctx.layout
        grads = [None] * 6  # h_s, W_s, b_s, h_t, W_t, b_t

        def add(slot: int, part: str, g_out) -> None:
            if part not in lay or g_out is None:
                return
            i = lay[part]
            for j in range(3):
                v = saved[i + j] * g_out.to(saved[i + j].dtype)
                grads[slot + j] = v if grads[slot + j] is None else grads[slot + j] + v

        add(0, "ce_s", g_ce_s)
        add(0, "kd", g_kd)
        add(3, "ce_t", g_ce_t)
        return (*grads, None, None, None, None, None, None)


def head_losses(h_s: torch.Tensor, head_s: torch.nn.Linear, target: torch.Tensor, *,
                h_t: Optional[torch.Tensor] = None, head_t: Optional[torch.nn.Linear] = None,
                label_smoothing: float = 0.0, kd_temperature: Optional[float] = None,
                teacher_ce: bool = True, rows: Optional[int] = None) -> HeadLosses:
    """h_s (B, L, C) the student's head input, target (B, L); with h_t/head_t the teacher's too;
    kd_temperature: also T²·KL(p_t^T ‖ p_s^T) (None: no KL); teacher_ce False: the teacher's CE is
    reported but sends no gradient (and none is computed). Token means, as `distill.distill_loss`."""
    C = h_s.shape[-1]
    y = target.reshape(-1)
    rows = rows or chunk_rows(head_s.out_features)
    teach = h_t is not None
    ce_s, ce_t, kd, hits_s, hits_t = _FusedHeadLoss.apply(
        h_s.reshape(-1, C), head_s.weight, head_s.bias,
        h_t.reshape(-1, C) if teach else None, head_t.weight if teach else None, head_t.bias if teach else None,
        y, float(label_smoothing), float(kd_temperature or 1.0), kd_temperature is not None, teacher_ce, rows)
    shape = target.shape
    return HeadLosses(ce_s, hits_s.view(shape), ce_t, hits_t.view(shape) if teach else None, kd)


def loss_parts(out: HeadLosses, feat: Optional[torch.Tensor], cfg, tail: int) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Total loss (as `distill.distill_loss` sums it) and the parts logged: the losses, acc, tail_acc
    (last `tail` positions: the final scale) and teacher_acc."""
    total = out.student_ce
    parts: Dict[str, torch.Tensor] = {"student_ce": out.student_ce}
    if out.teacher_ce is not None and cfg.teacher_ce:
        total = total + out.teacher_ce
        parts["teacher_ce"] = out.teacher_ce
    if feat is not None:
        total = total + cfg.lambda_feat * feat
        parts["feat"] = feat
    if out.kd is not None:
        total = total + cfg.lambda_logit * out.kd
        parts["kd"] = out.kd
    parts = {k: v.detach() for k, v in parts.items()}
    if out.teacher_hits is not None:
        parts["teacher_acc"] = out.teacher_hits.float().mean()
    parts["acc"] = out.student_hits.float().mean()
    parts["tail_acc"] = out.student_hits[:, -tail:].float().mean()
    return total, parts
