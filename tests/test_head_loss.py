"""The chunked head losses (`train.head_loss`) against the full-logits definition (`train.distill`)."""
import pytest
import torch
from torch.utils.data import default_collate
import torch.nn as nn

from fvar_core.config import TeacherConfig
from fvar_core.presets import load_preset
from fvar_core.models.tokenizer import Tokenizer
from fvar_core.train.distill import distill_loss
from fvar_core.train.head_loss import head_losses, loss_parts
from fvar_core.train.transformer import VARTask
from fvar_core.pipelines.bench import RandomTokens


def _heads(dtype, V=37, C=16, B=3, L=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(B, L, C, generator=g, dtype=dtype, requires_grad=True)
    ht = torch.randn(B, L, C, generator=g, dtype=dtype, requires_grad=True)
    head_s, head_t = nn.Linear(C, V).to(dtype), nn.Linear(C, V).to(dtype)
    for m in (head_s, head_t):
        with torch.no_grad():
            m.weight.copy_(torch.randn(V, C, generator=g, dtype=dtype) * 0.5)
            m.bias.copy_(torch.randn(V, generator=g, dtype=dtype))
    y = torch.randint(V, (B, L), generator=g)
    return hs, ht, head_s, head_t, y


def _grads(total, tensors):
    return torch.autograd.grad(total, tensors, allow_unused=True)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
@pytest.mark.parametrize("eps,T,rows", [(0.0, 1.0, 5), (0.1, 1.0, 7), (0.0, 2.0, 4), (0.2, 0.5, 1000)])
def test_distillation_losses_and_gradients_equal_the_full_logit_definition(dtype, tol, eps, T, rows):
    hs, ht, head_s, head_t, y = _heads(dtype)
    cfg = TeacherConfig(lambda_feat=0.0, lambda_logit=0.7, kd_temperature=T)
    params = [hs, ht, head_s.weight, head_s.bias, head_t.weight, head_t.bias]
    ref_total, ref = distill_loss(head_s(hs), y, cfg, teacher_logits=head_t(ht), label_smoothing=eps)
    ref_g = _grads(ref_total, params)
    out = head_losses(hs, head_s, y, h_t=ht, head_t=head_t, label_smoothing=eps, kd_temperature=T, rows=rows)
    total, parts = loss_parts(out, None, cfg, tail=4)
    for k in ("student_ce", "teacher_ce", "kd"):
        assert abs(parts[k].item() - ref[k].item()) <= tol * max(1.0, abs(ref[k].item())), k
    assert abs(total.item() - ref_total.item()) <= tol * max(1.0, abs(ref_total.item()))
    for a, b in zip(_grads(total, params), ref_g):
        torch.testing.assert_close(a, b, rtol=tol * 10, atol=tol * 10)
    # the hits are the argmax of the same logits
    with torch.no_grad():
        assert torch.equal(out.student_hits, head_s(hs).argmax(-1) == y)
        assert torch.equal(out.teacher_hits, head_t(ht).argmax(-1) == y)
        assert parts["tail_acc"].item() == pytest.approx((head_s(hs).argmax(-1) == y)[:, -4:].float().mean().item())


def test_student_alone_gets_no_teacher_terms_and_unused_parts_send_no_gradient():
    hs, ht, head_s, head_t, y = _heads(torch.float64)
    out = head_losses(hs, head_s, y, rows=3)
    assert out.teacher_ce is None and out.kd is None and out.teacher_hits is None
    ref = nn.functional.cross_entropy(head_s(hs).reshape(-1, 37), y.reshape(-1))
    assert out.student_ce.item() == pytest.approx(ref.item(), rel=1e-12)
    # teacher CE off (the teacher_ce ablation): the teacher's head gets no gradient from its CE
    cfg = TeacherConfig(teacher_ce=False, lambda_feat=0.0, lambda_logit=1.0)
    both = head_losses(hs, head_s, y, h_t=ht, head_t=head_t, kd_temperature=1.0, teacher_ce=False)
    total, parts = loss_parts(both, None, cfg, tail=1)
    assert "teacher_ce" not in parts
    g = _grads(total, [ht, head_t.weight])
    assert g[0] is None and g[1] is None


def _task(distill: bool):
    p = load_preset("tiny-32", ["model.drop_path=0.0"])
    torch.manual_seed(0)
    tok = Tokenizer(p.tokenizer, p.patch_nums)
    task = VARTask(p, tok, distill=distill, source="tokens")
    model = task.build()
    task.attach(model)
    model.train()
    data = RandomTokens(4, p.seq_len, p.tokenizer.vocab_size, p.tokenizer.alias_tokens if distill else 0,
                        p.model.num_classes)
    batch = default_collate([data[i] for i in range(4)])
    return task, model, batch


@pytest.mark.parametrize("distill", [False, True])
def test_training_step_loss_equals_the_full_logits_loss(distill):
    """VARTask.step (chunked heads) against the same networks' logits through distill_loss."""
    task, model, batch = _task(distill)
    torch.manual_seed(1)
    loss, parts = task.step(batch, 0)
    structure, alias, label = task.tokens(batch)
    sizes = [p * p for p in task.preset.patch_nums]
    x_in = task.tok.quantize.idx_to_var_input(list(torch.split(structure, sizes, dim=1)))
    torch.manual_seed(1)  # the same label dropout
    if distill:
        s, sf, t, tf = model(label, x_in, alias)
        ref, ref_parts = distill_loss(s, structure, task.preset.teacher, teacher_logits=t, student_feats=sf,
                                      teacher_feats=tf)
    else:
        s = model(label, x_in)
        ref, ref_parts = distill_loss(s, structure, task.preset.teacher)
    assert abs(loss.item() - ref.item()) <= 1e-6
    for k, v in ref_parts.items():
        assert abs(parts[k].item() - v.item()) <= 1e-6, k
    hit = s.argmax(-1) == structure
    assert parts["acc"].item() == pytest.approx(hit.float().mean().item())
    assert parts["tail_acc"].item() == pytest.approx(hit[:, -sizes[-1]:].float().mean().item())


@pytest.mark.parametrize("distill", [False, True], ids=["train", "distill"])
def test_pointwise_checkpointing_gives_the_same_step_and_keeps_less(distill):
    """'pointwise' recomputes only elementwise ops: the loss and every gradient are bitwise those of
    no checkpointing, while the step's peak tensor memory is lower (TensorMemory's exact account)."""
    from fvar_core.pipelines.bench import TensorMemory

    task, model, batch = _task(distill)
    results = {}
    for mode in ("off", "pointwise", "full"):
        for net in (task.student, task.teacher.net if task.teacher is not None else None):
            if net is not None:
                net.activation_checkpointing = mode
        model.zero_grad(set_to_none=True)
        torch.manual_seed(3)
        with TensorMemory() as mem:
            loss, _ = task.step(batch, 0)
            loss.backward()
        results[mode] = (loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None], mem.peak)
    off, pw, full = results["off"], results["pointwise"], results["full"]
    assert torch.equal(off[0], pw[0]) and len(off[1]) == len(pw[1])
    assert all(torch.equal(a, b) for a, b in zip(off[1], pw[1]))
    assert full[2] < pw[2] < off[2], (off[2], pw[2], full[2])
