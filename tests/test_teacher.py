"""Teacher (VAR + alias tokens via AG-XAttn) and the online distillation losses."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fvar_core.config import ModelConfig, TeacherConfig
from fvar_core.train.distill import distill_loss, feature_alignment, logit_kd, token_ce
from fvar_core.errors import UserError
from fvar_core.models.teacher import Teacher
from fvar_core.models.transformer import HAS_FLEX, VAR

PN = (1, 2, 3, 4)  # L = 30
ALIAS_V = 16


def _student(depth=3, **kw) -> VAR:
    torch.manual_seed(0)
    cfg = ModelConfig(depth=depth, width=64, num_heads=2, num_classes=10, drop_path=0.0,
                      init_adaln_gamma=0.5, **kw)  # large γ: every block visibly shapes the logits
    return VAR(cfg, PN, 32, 8)


def _inputs(B=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 10, (B,), generator=g), torch.randn(B, 29, 8, generator=g),
            torch.randint(0, ALIAS_V, (B, 30), generator=g), torch.randint(0, 32, (B, 30), generator=g))


def _open_gates(teacher: Teacher, value: float = 1.0) -> Teacher:
    with torch.no_grad():
        for xa in teacher.xattn:
            xa.gate.fill_(value)
    return teacher


def test_gate_closed_teacher_equals_student():
    student = _student().eval()
    teacher = Teacher.from_student(student, TeacherConfig(xattn_blocks=2), ALIAS_V).eval()
    lab, x, alias, _ = _inputs()
    with torch.no_grad():
        s_lg, s_f = student(lab, x, return_features=2)
        t_lg, t_f = teacher(lab, x, alias, return_features=2)
    assert torch.equal(t_lg, s_lg)
    assert all(torch.equal(a, b) for a, b in zip(t_f, s_f))
    assert list(teacher.net.state_dict()) == list(student.state_dict())


def test_open_gate_uses_alias_tokens():
    student = _student().eval()
    teacher = _open_gates(Teacher.from_student(student, TeacherConfig(xattn_blocks=2), ALIAS_V)).eval()
    lab, x, alias, _ = _inputs()
    with torch.no_grad():
        a, b = teacher(lab, x, alias), teacher(lab, x, (alias + 1) % ALIAS_V)
    assert (a - b).abs().max() > 1e-3


@pytest.mark.parametrize("rule", ["causal", "same"])
def test_later_alias_tokens_do_not_change_earlier_scales(rule):
    student = _student().eval()
    teacher = _open_gates(Teacher.from_student(student, TeacherConfig(xattn_blocks=2, alias_visibility=rule),
                                               ALIAS_V)).eval()
    lab, x, alias, _ = _inputs()
    bg, ed = teacher.net.begin_ends[2]  # change the alias tokens of scale 2 only
    changed = alias.clone()
    changed[:, bg:ed] = (changed[:, bg:ed] + 5) % ALIAS_V
    with torch.no_grad():
        a, b = teacher(lab, x, alias), teacher(lab, x, changed)
    assert torch.equal(a[:, :bg], b[:, :bg])  # scales 0, 1 never see scale-2 alias tokens
    assert (a[:, bg:ed] - b[:, bg:ed]).abs().max() > 1e-4  # scale 2 does


def test_all_visibility_lets_earlier_scales_see_later_alias_tokens():
    student = _student().eval()
    teacher = _open_gates(Teacher.from_student(student, TeacherConfig(xattn_blocks=1, alias_visibility="all"),
                                               ALIAS_V)).eval()
    lab, x, alias, _ = _inputs()
    changed = alias.clone()
    changed[:, -16:] = (changed[:, -16:] + 5) % ALIAS_V
    with torch.no_grad():
        assert (teacher(lab, x, alias)[:, 0] - teacher(lab, x, changed)[:, 0]).abs().max() > 1e-5


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_teacher_flex_and_sdpa_backends_agree():
    if not HAS_FLEX:
        pytest.fail("this torch has no FlexAttention")
    student = _student().eval()
    teacher = _open_gates(Teacher.from_student(student, TeacherConfig(xattn_blocks=2), ALIAS_V)).eval()
    lab, x, alias, _ = _inputs()
    with torch.no_grad():
        sdpa = teacher(lab, x, alias)
        teacher.net.attn_backend = "flex"
        flex = teacher(lab, x, alias)
    assert (sdpa - flex).abs().max() < 1e-4


def test_teacher_rejects_bad_configuration():
    student = _student()
    with pytest.raises(UserError, match="xattn_blocks"):
        Teacher.from_student(student, TeacherConfig(xattn_blocks=4), ALIAS_V)
    with pytest.raises(UserError, match="alias"):
        Teacher.from_student(student, TeacherConfig(), 0)


def _distill_setup(**cfg_kw):
    student = _student().train()
    teacher = _open_gates(Teacher.from_student(student, TeacherConfig(xattn_blocks=2), ALIAS_V), 0.3).train()
    with torch.no_grad():  # make the two networks differ so every term is non-zero
        for p in teacher.net.blocks[-1].ffn.parameters():
            p.add_(0.05 * torch.randn_like(p))
    lab, x, alias, target = _inputs()
    lab = student.drop_labels(lab, torch.Generator().manual_seed(0))  # once, shared by both networks
    s_lg, s_f = student(lab, x, return_features=2, label_dropout=False)
    t_lg, t_f = teacher(lab, x, alias, return_features=2, label_dropout=False)
    return student, teacher, (s_lg, s_f, t_lg, t_f, target), TeacherConfig(**cfg_kw)


def _grads(module):
    return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in module.named_parameters()}


def test_distillation_terms_send_no_gradient_to_teacher():
    student, teacher, (s_lg, s_f, t_lg, t_f, target), cfg = _distill_setup()
    loss = cfg.lambda_feat * feature_alignment(s_f, t_f) + cfg.lambda_logit * logit_kd(s_lg, t_lg, 2.0)
    assert loss > 0
    loss.backward()
    assert all(p.grad is None or torch.count_nonzero(p.grad) == 0 for p in teacher.parameters())
    assert student.head.weight.grad is not None and student.head.weight.grad.abs().sum() > 0
    assert student.blocks[-1].attn.mat_qkv.weight.grad.abs().sum() > 0  # the feature term reaches the blocks


def test_teacher_learns_only_from_its_own_ce():
    student, teacher, (s_lg, s_f, t_lg, t_f, target), cfg = _distill_setup()
    total, parts = distill_loss(s_lg, target, cfg, teacher_logits=t_lg, student_feats=s_f, teacher_feats=t_f)
    assert set(parts) == {"student_ce", "teacher_ce", "feat", "kd"}
    assert all(not v.requires_grad for v in parts.values())
    want = parts["student_ce"] + parts["teacher_ce"] + cfg.lambda_feat * parts["feat"] + cfg.lambda_logit * parts["kd"]
    assert torch.allclose(total.detach(), want)
    total.backward(retain_graph=True)
    from_total = _grads(teacher)
    teacher.zero_grad(set_to_none=True)
    token_ce(t_lg, target).backward()
    from_ce = _grads(teacher)
    for n in from_total:
        assert torch.allclose(from_total[n], from_ce[n], atol=1e-7), n
    assert any(g.abs().sum() > 0 for g in from_ce.values())


def test_kl_is_zero_when_logits_equal():
    lg = torch.randn(2, 30, 32) * 3
    assert logit_kd(lg, lg.clone()).abs().item() < 1e-6
    assert logit_kd(lg, lg.clone(), temperature=2.0).abs().item() < 1e-6
    assert logit_kd(lg, torch.randn(2, 30, 32)).item() > 0.1
    f = [torch.randn(2, 30, 64)]
    assert feature_alignment(f, [f[0].clone()]).item() == 0.0


def test_kl_matches_definition():
    s, t = torch.randn(3, 5, 7), torch.randn(3, 5, 7)
    p_t = F.softmax(t / 2, -1)
    want = (p_t * (F.log_softmax(t / 2, -1) - F.log_softmax(s / 2, -1))).sum(-1).mean() * 4
    assert torch.allclose(logit_kd(s, t, 2.0), want, atol=1e-6)


def test_ce_is_fp32_token_mean():
    lg, target = torch.randn(2, 30, 32, dtype=torch.bfloat16), torch.randint(0, 32, (2, 30))
    ce = token_ce(lg, target)
    assert ce.dtype == torch.float32
    assert torch.allclose(ce, F.cross_entropy(lg.float().transpose(1, 2), target))


def test_distill_loss_without_teacher_is_student_ce():
    lg, target = torch.randn(2, 30, 32), torch.randint(0, 32, (2, 30))
    total, parts = distill_loss(lg, target, TeacherConfig(enabled=False), teacher_logits=torch.randn(2, 30, 32))
    assert set(parts) == {"student_ce"} and torch.equal(total, token_ce(lg, target))


def test_teacher_compiles_without_graph_breaks():
    student = _student().train()
    teacher = Teacher.from_student(student, TeacherConfig(xattn_blocks=2), ALIAS_V).train()
    lab, x, alias, target = _inputs()
    lg, feats = torch.compile(teacher, backend="eager", fullgraph=True)(lab, x, alias, return_features=2)
    token_ce(lg, target).backward()
    assert teacher.xattn[0].gate.grad is not None
