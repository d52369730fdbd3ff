"""`fvar train-tokenizer` end to end on generated images (tiny-64, CPU)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fvar_core.presets import load_preset
from fvar_core.focus.schedules import radii
from fvar_core.train.tokenizer import TokenizerTask, train_tokenizer
from fvar_core.runs import complete_checkpoints

from .helpers import kill_at_step, make_folder

# A raised lr and frequent dead-code restarts so 150 CPU steps show real learning.
FAST = ["tokenizer_train.lr=3e-3", "tokenizer_train.batch_size=4", "tokenizer_train.dead_code_every=25", "tokenizer_train.log_every=10",
        "tokenizer_train.ckpt_every=50", "tokenizer_train.sample_every=50", "tokenizer_train.precision=fp32"]


def _metrics(run: Path):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One 120-step run of batch 4, shared by the assertions below (about 30 s on 2 CPU cores)."""
    root = tmp_path_factory.mktemp("tok")
    data = make_folder(root / "data", corrupt=2)
    preset = load_preset("tiny-64", [*FAST, "tokenizer_train.steps=120", "tokenizer_train.log_every=1"])
    torch.set_num_threads(min(8, torch.get_num_threads()))
    res = train_tokenizer(preset, data, root / "run", device="cpu")
    return preset, root / "run", res


def test_reconstruction_loss_falls_by_half_and_psnr_is_reported(trained):
    _, run, res = trained
    m = _metrics(run)
    first = m[0]["recon"]
    last = sum(x["recon"] for x in m[-10:]) / 10
    assert last <= 0.5 * first, (first, last)
    assert m[-1]["psnr"] > m[0]["psnr"] + 3
    assert res.step == 120 and res.checkpoint.name == "step-0000120"


def test_every_scale_of_both_codebooks_uses_more_than_one_code(trained):
    preset, run, _ = trained
    m = _metrics(run)
    # Per-step windows of 4 images (1 token each at scale 1): the most codes a window used after
    # the first dead-code restart (step 25).
    after = [x for x in m if x["step"] > 25]
    codes_s = [max(x["codes_structure"][k] for x in after) for k in range(preset.num_scales)]
    assert all(c > 1 for c in codes_s), codes_s
    # The alias residual of a scale with ρ_k < ½ px is E(x) − E(x) = 0 by construction (one code);
    # every focused scale must use more than one alias code.
    rhos = radii(preset.pyramid.schedule, preset.pyramid.rho_max, preset.patch_nums, preset.resolution)
    codes_a = [max(x["codes_alias"][k] for x in after) for k in range(preset.num_scales)]
    assert all(c > 1 for c, r in zip(codes_a, rhos) if r >= 0.5), (codes_a, rhos)
    assert sum(x["dead_restarted_structure"] for x in m) > 0  # restarts happened


def test_run_dir_holds_config_checkpoints_samples_and_a_log_of_the_skipped_files(trained):
    _, run, _ = trained
    assert (run / "config.yaml").is_file() and (run / "classes.json").is_file()
    assert [s for s, _ in complete_checkpoints(run)] == [50, 100, 120]
    assert sorted(p.name for p in (run / "samples").iterdir()) == [
        "step-0000050.png", "step-0000100.png"]
    log = (run / "log.txt").read_text()
    assert "skipping 2 of 18 image files" in log and "broken0.png" in log
    assert "perceptual loss: off" in log and "adversarial loss: off" in log


def test_cli_resumes_an_interrupted_run_from_its_last_checkpoint(tmp_path, cli, monkeypatch):
    data = make_folder(tmp_path / "data", per_class=4)
    run = tmp_path / "run"
    args = ["train-tokenizer", "--preset", "tiny-64", "--data", str(data), "--out", str(run), "--batch", "2",
            *[a for s in [*FAST, "tokenizer_train.ckpt_every=10"] for a in ("--set", s)]]
    r = cli(*args, "--steps", "20")
    assert r.code == 0, r.err
    assert f"run directory: {run}" in r.out and "step-0000020" in r.out
    # Stop mid-way: a run of 30 steps that dies at step 25 (after the checkpoint of step 20).
    revive = kill_at_step(monkeypatch, TokenizerTask, 25)
    assert cli(*args, "--steps", "30").code == 130
    assert [s for s, _ in complete_checkpoints(run)] == [10, 20]
    revive()
    r = cli(*args, "--steps", "30")
    assert r.code == 0, r.err
    assert "resuming" in r.err and "from step 20" in r.err
    assert [m["step"] for m in _metrics(run)] == [10, 20, 30]
    # Another preset into the same run directory: one line, exit 2, nothing written.
    before = sorted(p for p in run.rglob("*"))
    r = cli(*args[:2], "tiny-32", *args[3:], "--steps", "30")
    assert r.code == 2 and "another preset" in r.err and r.err.count("\n") == 1
    assert sorted(p for p in run.rglob("*")) == before


def test_perceptual_weights_take_a_torchscript_feature_net(tmp_path):
    net = torch.jit.script(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU()))
    net.save(str(tmp_path / "feat.pt"))
    preset = load_preset("tiny-64")
    task = TokenizerTask(preset, perceptual_weights=tmp_path / "feat.pt")
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    assert task.perceptual(x, x).item() == pytest.approx(0.0, abs=1e-6)
    assert task.perceptual(x, -x).item() > 0
    (tmp_path / "bad.pt").write_bytes(b"junk")
    from fvar_core.errors import UserError
    with pytest.raises(UserError, match="not a TorchScript feature network"):
        TokenizerTask(preset, perceptual_weights=tmp_path / "bad.pt")


def test_init_from_a_tokenizer_checkpoint_trains_only_the_alias_codebook(tmp_path):
    from fvar_core.checkpoints import save_checkpoint
    from fvar_core.models.tokenizer import Tokenizer

    preset = load_preset("tiny-64")
    src = Tokenizer(preset.tokenizer, preset.patch_nums)
    save_checkpoint(tmp_path / "vae", kind="tokenizer", preset=preset, state_dict=src.official_state_dict())
    task = TokenizerTask(preset, init_from=tmp_path / "vae")
    tok = task.build()
    trainable = [n for n, p in tok.named_parameters() if p.requires_grad]
    assert trainable == ["quantize.alias_embedding.weight"]
    assert torch.equal(tok.encoder.conv_in.weight, src.encoder.conv_in.weight)
    task.attach(tok)
    loss, _ = task.step((torch.rand(2, 3, 64, 64) * 2 - 1, torch.zeros(2)), 0)
    loss.backward()
    assert tok.quantize.alias_embedding.weight.grad.abs().sum() > 0


def test_alias_codebook_codes_part_of_the_alias_residual(trained):
    _, run, _ = trained
    m = _metrics(run)
    rel = sum(x["alias_vq"] / x["alias_energy"] for x in m[-10:]) / 10
    assert rel < 0.9, rel  # the 16-code alias codebook removes more than 10% of the residual's energy


def test_alias_loss_trains_the_alias_codebook_and_nothing_else():
    """The alias codebook codes the encoder's alias residual; it must not shape the encoder (a
    commitment gradient into both encodes would let the encoder cancel the residual and turn the
    focus path into VAR's). Its loss reaches the alias codebook and no other parameter."""
    preset = load_preset("tiny-64")
    torch.manual_seed(0)
    task = TokenizerTask(preset)
    tok = task.build()
    img = torch.rand(2, 3, 64, 64) * 2 - 1
    _, vq = tok(img, task.focus_images(img))
    assert vq.alias_loss > 0
    vq.alias_loss.backward()
    grads = {n: p.grad for n, p in tok.named_parameters()}
    assert grads.pop("quantize.alias_embedding.weight").abs().sum() > 0
    assert all(g is None or not g.any() for g in grads.values()), [n for n, g in grads.items() if g is not None and g.any()]


def test_dead_code_restarts_encode_each_distinct_view_once():
    """The restart pool is built from E(x) and the blurred views' latents, one encoder row per
    distinct view: a sharp scale's view is x itself, so its latent is E(x) exactly, not a second
    encode of x (which the code before v0.2 did, because the step kept a detached copy of x)."""
    preset = load_preset("tiny-64", ["tokenizer_train.dead_code_every=1", "pyramid.noise=false"])
    torch.manual_seed(0)
    task = TokenizerTask(preset)
    task.attach(task.build())
    img = torch.rand(2, 3, 64, 64) * 2 - 1
    focus = task.focus_images(img)
    distinct = {id(v) for v in focus if v is not img}
    assert 0 < len(distinct) < len(focus)  # the preset has blurred and sharp scales
    rows = []
    hook = task.tok.encoder.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[0]))
    task.step((img, torch.zeros(2, dtype=torch.long)), 1)
    task.after_step(1)
    hook.remove()
    assert rows == [2 * (1 + len(distinct))] * 2  # the training step's encode, then the restart's: the same rows
