"""The tokenizer's adversarial term: gradients reach the right player, VQGAN's adaptive weight,
and `fvar train-tokenizer --disc` end to end (resume, the weights file, bad input)."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

from fvar_core.models.discriminator import PatchDiscriminator, adaptive_weight, adversarial_terms
from fvar_core.checkpoints import load_checkpoint
from fvar_core.runs import complete_checkpoints

from .helpers import kill_at_step, make_folder

FAST = ["tokenizer_train.lr=3e-3", "tokenizer_train.batch_size=2", "tokenizer_train.log_every=1",
        "tokenizer_train.precision=fp32", "tokenizer_train.sample_every=0", "tokenizer_train.dead_code_every=0"]


def _sets(*items: str) -> list:
    return [a for s in items for a in ("--set", s)]


def _grads(loss: torch.Tensor, *modules: nn.Module):
    params = [p for m in modules for p in m.parameters()]
    gs = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    out, i = [], 0
    for m in modules:
        n = len(list(m.parameters()))
        out.append(sum(float(g.abs().sum()) for g in gs[i:i + n] if g is not None))
        i += n
    return out


def test_one_backward_trains_each_player_on_its_own_term():
    torch.manual_seed(0)
    gen, disc = nn.Conv2d(3, 3, 3, padding=1), PatchDiscriminator(ch=8, layers=2)
    img = torch.rand(2, 3, 32, 32) * 2 - 1
    recon = gen(img)
    g_loss, d_loss, _ = adversarial_terms(disc, img, recon)
    g_to_gen, g_to_disc = _grads(g_loss, gen, disc)
    d_to_gen, d_to_disc = _grads(d_loss, gen, disc)
    assert g_to_gen > 0 and g_to_disc == 0  # the generator term moves the generator only
    assert d_to_disc > 0 and d_to_gen == 0  # the discriminator term moves the discriminator only


def test_adaptive_weight_is_the_gradient_norm_ratio_at_the_last_layer():
    torch.manual_seed(0)
    last = nn.Linear(4, 4)
    y = last(torch.randn(8, 4))
    rec, adv = y.square().mean(), -(3 * y).mean()
    g_rec = torch.autograd.grad(rec, last.weight, retain_graph=True)[0]
    g_adv = torch.autograd.grad(adv, last.weight, retain_graph=True)[0]
    assert adaptive_weight(rec, adv, last.weight).item() == pytest.approx(
        (g_rec.norm() / (g_adv.norm() + 1e-4)).item(), rel=1e-6)


def test_train_tokenizer_with_disc_resumes_bitwise_and_writes_reusable_weights(tmp_path, cli, monkeypatch):
    data = make_folder(tmp_path / "data", per_class=2)
    common = ["train-tokenizer", "--preset", "tiny-64", "--data", str(data), "--disc",
              *_sets(*FAST, "tokenizer_train.ckpt_every=2", "tokenizer_train.disc_start=1")]
    r = cli(*common, "--out", str(tmp_path / "straight"), "--steps", "4")
    assert r.code == 0, r.err
    log = (tmp_path / "straight" / "log.txt").read_text()
    assert "adversarial loss: on, PatchGAN" in log and "from step 1" in log

    m = [json.loads(x) for x in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert {"g_loss", "d_loss", "disc_lambda", "d_real", "d_fake"} <= set(m[0])
    assert m[0]["disc_lambda"] == 1.0 and m[1]["disc_lambda"] != 1.0  # adaptive from disc_start

    from fvar_core.train.tokenizer import TokenizerTask

    revive = kill_at_step(monkeypatch, TokenizerTask, 3)
    assert cli(*common, "--out", str(tmp_path / "broken"), "--steps", "4").code == 130
    revive()
    r = cli(*common, "--out", str(tmp_path / "broken"), "--steps", "4")
    assert r.code == 0 and "from step 2" in r.err, r.err
    a = load_checkpoint(tmp_path / "straight" / "checkpoints" / "step-0000004").state_dict
    b = load_checkpoint(tmp_path / "broken" / "checkpoints" / "step-0000004").state_dict
    assert all(torch.equal(a[k], b[k]) for k in a)
    da = load_file(str(tmp_path / "straight" / "discriminator.safetensors"))
    db = load_file(str(tmp_path / "broken" / "discriminator.safetensors"))
    assert all(torch.equal(da[k], db[k]) for k in da)

    # The written discriminator starts another run.
    r = cli(*[a for a in common if a != "--disc"], "--disc-weights", str(tmp_path / "straight" / "discriminator.safetensors"),
            "--out", str(tmp_path / "again"), "--steps", "1")
    assert r.code == 0, r.err
    assert "from " + str(tmp_path / "straight" / "discriminator.safetensors") in (tmp_path / "again" / "log.txt").read_text()
    # Resuming a --disc run without it (or the reverse) is refused in one line.
    r = cli(*[a for a in common if a != "--disc"], "--out", str(tmp_path / "straight"), "--steps", "6")
    assert r.code == 2 and "resume it with --disc" in r.err and r.err.strip().count("\n") == 0, r.err
    assert [s for s, _ in complete_checkpoints(tmp_path / "straight")] == [2, 4]


@pytest.mark.parametrize("extra,message", [
    (["--disc-weights", "nope.safetensors"], "--disc-weights: no such file"),
    (["--disc", "--init-from", "x"], "an adversarial term has nothing to train"),
])
def test_bad_discriminator_input_is_one_line(tmp_path, cli, extra, message):
    data = make_folder(tmp_path / "data", per_class=1)
    r = cli("train-tokenizer", "--preset", "tiny-64", "--data", str(data), "--out", str(tmp_path / "r"), "--steps", "1",
            *extra)
    assert r.code == 2 and message in r.err and r.err.strip().count("\n") == 0, r.err
