"""Zero-shot in-/out-painting: the input's tokens are kept at every scale, f̂ equals the tokenizer's
reconstruction outside the reach of the generated tokens, VAR's per-scale mask rule, the geometry of
masks / boxes / canvases, and `fvar inpaint` end to end with its one-line errors."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from fvar_core.config import SampleConfig
from fvar_core.errors import UserError
from fvar_core.sample.inpaint import (box_mask, edit, keep_masks, load_mask, parse_box, prepare_inpaint, prepare_outpaint,
                               token_mask)
from tests.test_sample_cli import _err_line, tiny_checkpoint
from tests.test_sampler import build_keyed_model, keyed_tokenizer, load_manifest, load_ref


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory)


@pytest.fixture(scope="module")
def ref():
    return load_ref()


@pytest.fixture(scope="module")
def ref_var():
    return build_keyed_model(load_manifest())


@pytest.fixture(scope="module")
def ref_tok(ref):
    return keyed_tokenizer(ref)


# ------------------------------------------------------------------------------------------------
# On the official fixture's models (256 px, 16 × 16 tokens)
# ------------------------------------------------------------------------------------------------


def _reach(keep, patch_nums, P: int) -> torch.Tensor:
    """(P, P) bool: latent cells whose f̂ the generated tokens can touch — VAR's bicubic up-sampling
    of scale k (support ±2 source cells) plus φ's 3 × 3 convolution."""
    reach = torch.zeros(P, P, dtype=torch.bool)
    for k, pn in zip(keep, patch_nums):
        gen = (~k).view(1, 1, pn, pn).float()
        if not gen.any():
            continue
        if pn != P:  # a cell's bicubic footprint: nonzero weights within 2 source cells
            src = (torch.arange(P) + 0.5) * pn / P - 0.5  # align_corners=False source coordinate
            near = (src[:, None] - torch.arange(pn)[None, :]).abs() < 2  # (P, pn)
            gen = ((near.float() @ gen[0, 0] @ near.float().T) > 0).float()[None, None]
        reach |= F.max_pool2d(gen, 3, stride=1, padding=1)[0, 0] > 0
    return reach


def test_inpainting_keeps_the_input_tokens_and_its_reconstruction_outside_the_edit(ref, ref_var, ref_tok):
    img = ref["inputs"]["images"][0] * 0.5 + 0.5  # (3, 256, 256) in [0, 1]
    inp = prepare_inpaint(img, box_mask((0, 0, 32, 32), 256, 256), 256, 16)  # top-left 2 × 2 tokens
    assert int(inp.tokens.sum()) == 4
    res = edit(ref_var, ref_tok, inp, 207, 0, SampleConfig(cfg=1.5, top_k=900, top_p=0.96))
    # the image is coded as the official VQ-VAE codes it
    for k, (g, want) in enumerate(zip(res.given, ref["vqvae"]["idx_per_scale"])):
        assert torch.equal(g[0], want[0]), f"scale {k}"
    # every scale: the known positions hold the input's tokens; something was generated
    for k, (t, g, m) in enumerate(zip(res.tokens, res.given, res.keep)):
        assert torch.equal(t[m], g[m]), f"scale {k}"
    assert not torch.equal(res.tokens[-1], res.given[-1])
    # latent f̂: outside the generated tokens' reach it IS the reconstruction's (bitwise here; 1e-6)
    q = ref_tok.quantize
    d = (q.idx_to_fhat(res.tokens) - q.idx_to_fhat(res.given)).abs().amax(dim=1)[0]  # (16, 16)
    reach = _reach(res.keep, ref_var.patch_nums, 16)
    assert 0 < int(reach.sum()) < 256 * 0.5
    assert d[~reach].max() <= 1e-6
    assert d[reach].max() > 1e-2
    # pixels: the VQ-VAE decoder has a global self-attention block (and a receptive field of many
    # cells), so no zero-shot edit reproduces the reconstruction exactly anywhere. What holds: the
    # change is concentrated where f̂ changed (measured with these keyed weights: mean |Δ| ≈ 0.4
    # inside the edit, ≈ 0.05 away from it; with trained weights the far change is smaller still).
    recon = ref_tok.idx_to_img(res.given)[0] * 0.5 + 0.5
    diff = (res.image - recon).abs().mean(0).view(16, 16, 16, 16).mean(dim=(1, 3))  # per token cell
    assert diff[~reach].mean() < 0.25 * diff[inp.tokens].mean()


# ------------------------------------------------------------------------------------------------
# Masks and geometry
# ------------------------------------------------------------------------------------------------

def test_keep_masks_follow_vars_notebook_rule():
    g = torch.Generator().manual_seed(0)
    generate = torch.rand(16, 16, generator=g) < 0.3
    pns = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
    masks = keep_masks(generate, pns)
    keep01 = (~generate).float()  # the notebook's edit mask: 1 = keep
    for pn, m in zip(pns, masks):
        want = F.interpolate(keep01[None, None], size=(pn, pn), mode="bilinear", align_corners=False) > 0.5
        if pn * pn <= 3:
            want = torch.ones_like(want)
        assert torch.equal(m.view(pn, pn), want.view(pn, pn)), pn
    assert torch.equal(masks[-1].view(16, 16), ~generate)  # last scale: the token mask itself
    assert masks[0].all()  # the 1 × 1 scale is always kept


def test_generated_tokens_cover_every_white_pixel_rounded_outwards():
    pix = torch.zeros(64, 64, dtype=torch.bool)
    pix[17, 40] = True  # one pixel
    assert token_mask(pix, 16).nonzero().tolist() == [[1, 2]]
    pix[31:33, 0] = True  # straddles two token rows
    assert token_mask(pix, 16).sum() == 3


def test_mask_follows_the_images_resize_and_centre_crop():
    img = torch.rand(3, 64, 128)  # landscape: resized to 64 × 128 (no-op), centre crop x ∈ [32, 96)
    inp = prepare_inpaint(img, box_mask((32, 0, 48, 16), 128, 64), 64, 16)  # input x 32..47 → crop x 0..15
    assert torch.equal(inp.image, img[:, :, 32:96])
    assert inp.tokens.nonzero().tolist() == [[0, 0]]
    # input x 40..55 → crop x 8..23: spans token columns 0 and 1, rounded outwards
    inp = prepare_inpaint(img, box_mask((40, 0, 56, 16), 128, 64), 64, 16)
    assert inp.tokens.nonzero().tolist() == [[0, 0], [0, 1]]
    with pytest.raises(UserError, match="vanishes"):
        prepare_inpaint(img, box_mask((0, 0, 16, 16), 128, 64), 64, 16)  # cropped away entirely


def test_box_in_pixels_or_fractions():
    assert parse_box("10,20,30,40", 100, 50) == (10, 20, 30, 40)
    assert parse_box("0.1,0.1,0.8,0.8", 100, 50) == (10, 5, 80, 40)
    for bad, msg in (("0,0,101,10", "outside the image"), ("5,5,5,9", "empty or outside"),
                     ("1,2,3", "expected x0,y0,x1,y1"), ("a,b,c,d", "expected x0,y0,x1,y1"),
                     ("-1,0,4,4", "outside the image")):
        with pytest.raises(UserError, match=msg):
            parse_box(bad, 100, 50)


def test_outpaint_places_the_image_at_the_canvas_centre():
    img = torch.rand(3, 40, 36)
    inp = prepare_outpaint(img, (64, 64), 64, 16)
    top, left = 12, 14
    assert torch.equal(inp.image[:, top:top + 40, left:left + 36], img)
    assert torch.equal(inp.image[:, 0, left:left + 36], img[:, 0])  # edge pixels repeated outwards
    assert (~inp.pixels).sum() == 40 * 36
    assert (~inp.tokens).nonzero().tolist() == [[1, 1], [1, 2], [2, 1], [2, 2]]  # only whole tokens kept
    with pytest.raises(UserError, match="--canvas 128x128 is not supported: .*64x64"):
        prepare_outpaint(img, (128, 128), 64, 16, "tiny-64")
    with pytest.raises(UserError, match="does not fit the 64x64 canvas"):
        prepare_outpaint(torch.rand(3, 80, 20), (64, 64), 64, 16)
    with pytest.raises(UserError, match="nothing to outpaint"):
        prepare_outpaint(torch.rand(3, 64, 64), (64, 64), 64, 16)
    with pytest.raises(UserError, match="covers no whole 16x16 token"):
        prepare_outpaint(torch.rand(3, 20, 20), (64, 64), 64, 16)


def test_outpaint_fit_shrinks_a_full_size_image_into_the_canvas():
    img = torch.rand(3, 64, 96)  # wider than the 64x64 canvas
    inp = prepare_outpaint(img, (64, 64), 64, 16, fit=0.75)  # longer side → 48 px: 48 × 32
    kept = (~inp.pixels).nonzero()
    assert kept.min(0).values.tolist() == [16, 8] and kept.max(0).values.tolist() == [47, 55]
    want = torch.nn.functional.interpolate(img[None], size=(32, 48), mode="bicubic", antialias=True)[0].clamp(0, 1)
    assert torch.allclose(inp.image[:, 16:48, 8:56], want)
    with pytest.raises(UserError, match="strictly between 0 and 1"):
        prepare_outpaint(img, (64, 64), 64, 16, fit=1.0)


def _png(path, arr) -> str:
    Image.fromarray(np.asarray(arr, dtype=np.uint8)).save(path)
    return str(path)


def test_mask_file_must_be_binary_and_the_images_size(tmp_path):
    m = np.zeros((48, 64), np.uint8)
    m[:10, :10] = 255
    assert load_mask(_png(tmp_path / "ok.png", m), 64, 48).sum() == 100
    with pytest.raises(UserError, match="is 64x48, the image is 48x64"):
        load_mask(tmp_path / "ok.png", 48, 64)
    m[20, 20] = 128
    with pytest.raises(UserError, match="not binary: 1 pixel"):
        load_mask(_png(tmp_path / "grey.png", m), 64, 48)
    with pytest.raises(UserError, match="no white pixel"):
        load_mask(_png(tmp_path / "black.png", np.zeros((48, 64))), 64, 48)


# ------------------------------------------------------------------------------------------------
# fvar inpaint
# ------------------------------------------------------------------------------------------------

@pytest.fixture
def photo(tmp_path):
    g = np.random.default_rng(0)
    return _png(tmp_path / "photo.png", g.integers(0, 256, (48, 80, 3)))


def test_inpaint_cli_writes_compare_result_and_sidecar(cli, tiny_ckpt, photo, tmp_path):
    out = tmp_path / "e"
    r = cli("inpaint", "--ckpt", str(tiny_ckpt), "--image", photo, "--box", "30,10,50,30", "--class", "3",
            "--out", str(out), "--device", "cpu", "--seed", "4")
    assert r.code == 0, r.err
    assert "inpaint: generated" in r.out
    assert Image.open(out / "result.png").size == (64, 64)
    assert Image.open(out / "compare.png").size == (3 * 64 + 2 * 4, 64)  # input | mask | result
    doc = json.loads((out / "edit.json").read_text())
    assert doc["mode"] == "inpaint" and doc["box"] == [30, 10, 50, 30] and doc["class"] == 3 and doc["seed"] == 4
    assert doc["mask_convention"] == "white = generate, black = keep"
    assert doc["input_size"] == [80, 48] and doc["checkpoint"]["preset"] == "tiny-64"
    assert 0 < doc["generated_tokens_last_scale"] < 16
    # the mask panel shows the generated tokens in white
    cmp = np.asarray(Image.open(out / "compare.png"))
    panel = cmp[:, 68:132]
    assert panel.max() == 255 and panel.min() == 0


def test_inpaint_cli_mask_and_outpaint(cli, tiny_ckpt, photo, tmp_path):
    m = np.zeros((48, 80), np.uint8)
    m[20:30, 30:40] = 255
    mask = _png(tmp_path / "m.png", m)
    r = cli("inpaint", "--ckpt", str(tiny_ckpt), "--image", photo, "--mask", mask, "--out", str(tmp_path / "a"),
            "--device", "cpu")
    assert r.code == 0, r.err
    assert json.loads((tmp_path / "a" / "edit.json").read_text())["unconditional"] is True
    small = _png(tmp_path / "small.png", np.full((40, 40, 3), 200))
    r = cli("inpaint", "--ckpt", str(tiny_ckpt), "--image", small, "--outpaint", "--canvas", "64x64",
            "--out", str(tmp_path / "b"), "--device", "cpu")
    assert r.code == 0, r.err
    doc = json.loads((tmp_path / "b" / "edit.json").read_text())
    assert doc["mode"] == "outpaint" and doc["generated_tokens_last_scale"] == 12
    assert doc["placed_at"] == [12, 12] and doc["placed_size"] == [40, 40]
    r = cli("inpaint", "--ckpt", str(tiny_ckpt), "--image", photo, "--outpaint", "--fit", "0.9",
            "--out", str(tmp_path / "c"), "--device", "cpu")  # an 80x48 photo shrunk to 58x35 px
    assert r.code == 0, r.err
    assert json.loads((tmp_path / "c" / "edit.json").read_text())["placed_size"] == [58, 35]


@pytest.mark.parametrize("args, message", [
    (["--box", "0,0,100,10"], "box (0,0)-(100,10) is empty or outside the image (80x48"),
    (["--mask", "WRONGSIZE"], "the mask must have the input image's size"),
    (["--mask", "GREY"], "is not binary"),
    (["--box", "1,1,5,5", "--mask", "WRONGSIZE"], "give exactly one of --box"),
    ([], "give exactly one of --box"),
    (["--outpaint", "--canvas", "256x256"], "--canvas 256x256 is not supported: tiny-64 makes 64x64 images only"),
    (["--outpaint", "--box", "1,1,5,5"], "give no --box or --mask"),
    (["--box", "1,1,5,5", "--class", "10"], "class 10 out of range"),
    (["--box", "1,1,5,5", "--class", "1,2"], "inpainting takes one class"),
])
def test_bad_inpaint_arguments_are_one_line_errors(cli, tiny_ckpt, photo, tmp_path, args, message):
    wrong = _png(tmp_path / "wrong.png", np.zeros((10, 10)))
    grey = np.zeros((48, 80), np.uint8)
    grey[0, 0] = 255
    grey[1, 1] = 7
    grey = _png(tmp_path / "grey.png", grey)
    args = [{"WRONGSIZE": wrong, "GREY": grey}.get(a, a) for a in args]
    r = cli("inpaint", "--ckpt", str(tiny_ckpt), "--image", photo, "--out", str(tmp_path / "e"), "--device", "cpu",
            *args)
    assert r.code == 2, r.out
    assert message in _err_line(r)


def test_inpaint_without_tokenizer_is_a_one_line_error(cli, tiny_ckpt, photo, tmp_path):
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(tiny_ckpt, bare, ignore=shutil.ignore_patterns("tokenizer"))
    r = cli("inpaint", "--ckpt", str(bare), "--image", photo, "--box", "1,1,9,9", "--out", str(tmp_path / "e"))
    assert r.code == 2
    assert "has no tokenizer to decode with" in _err_line(r)
