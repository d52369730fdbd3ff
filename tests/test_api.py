"""The Python front door, `fvar.Pipeline`: the README's Python section runs as written (on a tiny
256 px checkpoint built here), and the pipeline gives the same images as the functions the CLI uses."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from PIL import Image

import fvar
from fvar_core.checkpoints import save_checkpoint
from fvar_core.config import SampleConfig
from fvar_core.data.images import to_pil as image_to_pil
from fvar_core.errors import UserError
from fvar_core.models.tokenizer import Tokenizer
from fvar_core.models.transformer import VAR
from fvar_core.presets import load_preset
from fvar_core.sample.sampler import sample

README = Path(__file__).resolve().parent.parent / "README.md"
# d16-256's scales and resolution, with networks small enough for a CPU test
TINY_256 = ["model.depth=2", "model.width=64", "model.num_heads=2", "tokenizer.ch=32", "tokenizer.vocab_size=64",
            "tokenizer.alias_vocab_size=16", "tokenizer.num_res_blocks=1", "teacher.enabled=false"]


def _readme_python() -> str:
    section = README.read_text().split("\n## Python\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1, "the README's Python section holds one example"
    return blocks[0]


def _tiny_checkpoint(folder: Path) -> Path:
    preset = load_preset("d16-256", TINY_256)
    torch.manual_seed(0)
    var = VAR(preset.model, preset.patch_nums, preset.tokenizer.vocab_size, preset.tokenizer.z_channels)
    tok = Tokenizer(preset.tokenizer, preset.patch_nums)
    save_checkpoint(folder, kind="var", preset=preset, state_dict=var.state_dict(), provenance={"step": 1})
    save_checkpoint(folder / "tokenizer", kind="tokenizer", preset=preset, state_dict=tok.state_dict())
    return folder


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return _tiny_checkpoint(tmp_path_factory.mktemp("api") / "runs" / "d16")


def test_readme_python_section_runs_as_written(ckpt, monkeypatch):
    monkeypatch.chdir(ckpt.parent.parent)  # the example names runs/d16 relative to where it runs
    ns: dict = {}
    exec(compile(_readme_python(), "README.md (Python)", "exec"), ns)
    images, more, edited, tokens, again = (ns[k] for k in ("images", "more", "edited", "tokens", "again"))
    assert len(images) == 2 and all(isinstance(i, Image.Image) and i.size == (256, 256) for i in images)
    assert Path("goldfish.png").is_file() and len(more) == 4 and edited.size == (256, 256)
    assert [t.shape for t in tokens] == [(1, p * p) for p in (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)]
    assert again.size == (256, 256)


def test_pipeline_samples_what_the_sampler_samples(ckpt):
    pipe = fvar.Pipeline.from_pretrained(ckpt, device="cpu")
    got = pipe.sample([3, 5], n=2, seed=4, output="tensor", top_k=10)
    m = pipe.models
    settings = SampleConfig.model_validate({**pipe.preset.sample.model_dump(), "top_k": 10})
    want = sample(m.var, m.tokenizer, [3, 3, 5, 5], [4, 5, 6, 7], settings).images
    assert torch.equal(got, want)
    one = pipe.sample([3], seed=4, top_k=10, output="tensor")  # the same image at batch 1 (same tokens)
    pil = pipe([3], seed=4, top_k=10)[0]
    assert pil.tobytes() == image_to_pil(one[0]).tobytes()  # the pixels `fvar sample` would save


def test_decode_of_encode_is_the_tokenizers_reconstruction(ckpt):
    pipe = fvar.Pipeline.from_pretrained(ckpt, device="cpu")
    img = torch.rand(3, 256, 256)
    tokens = pipe.encode(img)
    again = pipe.decode(tokens, output="tensor")
    assert again.shape == (1, 3, 256, 256)
    assert all(torch.equal(a, b) for a, b in zip(pipe.encode(img), tokens))  # deterministic
    t = pipe.models.tokenizer
    f_hat = t.quantize.idx_to_fhat(tokens)
    assert torch.allclose(again, (t.fhat_to_img(f_hat) * 0.5 + 0.5).clamp(0, 1), atol=1e-6)


@pytest.mark.parametrize("call, message", [
    (lambda p: p.sample([1000 + 1]), "classes: class 1001 out of range"),
    (lambda p: p.sample([1], output="numpy"), "output must be 'pil' or 'tensor'"),
    (lambda p: p.sample([1], top_p=3.0), "top-p"),
    (lambda p: p.inpaint(torch.rand(3, 64, 64)), "exactly one of box"),
    (lambda p: p.inpaint(torch.rand(3, 64, 64), box=(0, 0, 8, 8), cls=-1), "cls: class -1 out of range"),
    (lambda p: p.encode(torch.rand(64, 64)), "must be (3, H, W)"),
])
def test_bad_input_is_a_one_line_user_error(ckpt, call, message):
    pipe = fvar.Pipeline.from_pretrained(ckpt, device="cpu")
    with pytest.raises(UserError, match=re.escape(message)) as e:
        call(pipe)
    assert "\n" not in str(e.value)


def test_from_pretrained_names_what_is_missing(tmp_path, ckpt):
    with pytest.raises(UserError, match="give the official VQ-VAE .pth as the tokenizer"):
        fvar.Pipeline.from_pretrained(tmp_path / "var_d16.pth")
    with pytest.raises(UserError, match="official .pth files only"):
        fvar.Pipeline.from_pretrained(ckpt, preset="var-d16-256")
    with pytest.raises(UserError):
        fvar.Pipeline.from_pretrained(tmp_path / "nothing-here")


def test_official_files_load_without_converting(tmp_path, ckpt):
    """An official-format pair (written from the tiny checkpoint) samples exactly as the checkpoint."""
    pipe = fvar.Pipeline.from_pretrained(ckpt, device="cpu")
    torch.save(pipe.models.var.official_state_dict(), tmp_path / "var_tiny.pth")
    torch.save(pipe.models.tokenizer.official_state_dict(), tmp_path / "vae_tiny.pth")
    official = fvar.Pipeline.from_pretrained(tmp_path / "var_tiny.pth", tokenizer=tmp_path / "vae_tiny.pth",
                                             device="cpu", preset="d16-256", overrides=TINY_256)
    a = pipe.sample([7], seed=3, output="tensor", top_k=5)
    b = official.sample([7], seed=3, output="tensor", top_k=5)
    assert torch.equal(a, b)
    assert official.models.identity["checkpoint"]["path"].endswith("var_tiny.pth")


def test_cli_samples_official_files_as_the_pipeline_does(cli, tmp_path, ckpt):
    """`fvar sample --ckpt var.pth --tokenizer vae.pth` and `Pipeline.from_pretrained(var.pth, ...)` go
    through the same loader (architecture read off the state dicts) and give the same pixels."""
    pipe = fvar.Pipeline.from_pretrained(ckpt, device="cpu")
    var_pth, vae_pth = tmp_path / "var_tiny.pth", tmp_path / "vae_tiny.pth"
    torch.save(pipe.models.var.official_state_dict(), var_pth)
    torch.save(pipe.models.tokenizer.official_state_dict(), vae_pth)
    r = cli("sample", "--ckpt", str(var_pth), "--tokenizer", str(vae_pth), "--class", "7", "--n", "1", "--seed", "3",
            "--top-k", "5", "--out", str(tmp_path / "s"), "--device", "cpu")
    assert r.code == 0, r.err
    png = Image.open(tmp_path / "s" / "0000-class0007.png").convert("RGB")
    official = fvar.Pipeline.from_pretrained(var_pth, tokenizer=vae_pth, device="cpu")
    assert png.tobytes() == official([7], seed=3, top_k=5)[0].tobytes()
    r = cli("sample", "--ckpt", str(var_pth), "--class", "7", "--out", str(tmp_path / "t"))
    assert r.code == 2 and "give the official VQ-VAE .pth as the tokenizer" in r.err


def test_an_official_refiner_reads_the_draft_models_vq_vae(tmp_path, ckpt):
    """Draft and refine with official files (as var_d30 + var_d16 would be): the refiner .pth needs no
    tokenizer of its own; the same model as its own refiner gives the plain samples."""
    pipe = fvar.Pipeline.from_pretrained(ckpt, device="cpu")
    var_pth, vae_pth = tmp_path / "var_tiny.pth", tmp_path / "vae_tiny.pth"
    torch.save(pipe.models.var.official_state_dict(), var_pth)
    torch.save(pipe.models.tokenizer.official_state_dict(), vae_pth)
    both = fvar.Pipeline.from_pretrained(var_pth, tokenizer=vae_pth, refiner=var_pth, device="cpu")
    assert both.models.identity["refiner"]["path"].endswith("var_tiny.pth")
    a = both.sample([7], n=2, seed=3, output="tensor", top_k=5, refine_from=2)
    b = pipe.sample([7], n=2, seed=3, output="tensor", top_k=5)
    assert torch.equal(a, b)
