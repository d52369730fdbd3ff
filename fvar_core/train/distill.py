"""Online distillation losses (paper §3.6, docs/design.md §6):

    L = CE_stu + CE_tea + λ_feat Σ_ℓ ‖F_stu^ℓ − sg(F_tea^ℓ)‖² + λ_logit · T² · KL(p_tea^T ‖ p_stu^T)

CE terms are VAR's: plain mean cross-entropy over all B·L tokens (every token weight 1/L, docs/var-compat.md
§3.2), computed from fp32 log-softmax. Features are the hidden states after the last N blocks
(`feat_blocks`), the squared error averaged over tokens and channels and summed over blocks. The KL
uses temperature T on both distributions and the customary T² factor (the gradient scale then does
not depend on T; at the paper's T = 1 it is plain KL). The teacher enters the distillation terms
only through detached tensors: they send no gradient to the teacher. The teacher's own CE (absent
from the paper's Eq. 12, without which the teacher never learns) is on by default (`teacher_ce`).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from fvar_core.config import TeacherConfig


def at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """t in float32, or float64 if it is already (so a float64 check stays float64)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def token_ce(logits_BLV: torch.Tensor, target_BL: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy over all tokens, fp32: logits (B, L, V), target (B, L) -> scalar."""
    V = logits_BLV.shape[-1]
    return F.cross_entropy(at_least_fp32(logits_BLV).reshape(-1, V), target_BL.reshape(-1), label_smoothing=label_smoothing)


def feature_alignment(student_feats: Sequence[torch.Tensor], teacher_feats: Sequence[torch.Tensor]) -> torch.Tensor:
    """Σ_ℓ mean((F_stu − sg(F_tea))²) over blocks ℓ; features (B, L, C) each."""
    if len(student_feats) != len(teacher_feats) or not student_feats:
        raise ValueError(f"need the same non-zero number of student and teacher feature maps, got "
                         f"{len(student_feats)} and {len(teacher_feats)}")
    return sum(F.mse_loss(s.float(), t.detach().float()) for s, t in zip(student_feats, teacher_feats))


def logit_kd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """T² · KL(p_tea ‖ p_stu) at temperature T, mean over tokens; logits (B, L, V), teacher detached."""
    V = student_logits.shape[-1]
    log_p_stu = F.log_softmax(at_least_fp32(student_logits).reshape(-1, V) / temperature, dim=-1)
    log_p_tea = F.log_softmax(at_least_fp32(teacher_logits.detach()).reshape(-1, V) / temperature, dim=-1)
    kl = F.kl_div(log_p_stu, log_p_tea, reduction="batchmean", log_target=True)  # Σ_v p_tea (log p_tea − log p_stu)
    return kl * temperature ** 2


def distill_loss(student_logits: torch.Tensor, target_BL: torch.Tensor, cfg: TeacherConfig, *,
                 teacher_logits: Optional[torch.Tensor] = None,
                 student_feats: Sequence[torch.Tensor] = (), teacher_feats: Sequence[torch.Tensor] = (),
                 label_smoothing: float = 0.0):
    """Total loss and its parts {student_ce, teacher_ce, feat, kd} (detached, for logging).

    Without teacher outputs (cfg.enabled false: the 'w/o teacher' ablation, or plain VAR training)
    the total is the student's CE alone."""
    ce_stu = token_ce(student_logits, target_BL, label_smoothing)
    parts = {"student_ce": ce_stu}
    total = ce_stu
    if cfg.enabled and teacher_logits is not None:
        if cfg.teacher_ce:
            ce_tea = token_ce(teacher_logits, target_BL, label_smoothing)
            parts["teacher_ce"] = ce_tea
            total = total + ce_tea
        if cfg.lambda_feat > 0:
            feat = feature_alignment(student_feats, teacher_feats)
            parts["feat"] = feat
            total = total + cfg.lambda_feat * feat
        if cfg.lambda_logit > 0:
            kd = logit_kd(student_logits, teacher_logits, cfg.kd_temperature)
            parts["kd"] = kd
            total = total + cfg.lambda_logit * kd
    return total, {k: v.detach() for k, v in parts.items()}
