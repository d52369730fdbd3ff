"""Checkpoints written before the restructuring of issue #15 load and give the same numbers.

tests/data/pre-restructure holds a tokenizer and a var checkpoint written by fvar at commit 37c1cf3
and golden.pt, that commit's outputs for them (make_golden.py there records how). Tokens must match
exactly; floats within 1e-5 (float32, to allow another CPU's kernels).
"""
from pathlib import Path

import torch

from fvar_core.checkpoints import load_checkpoint
from fvar_core.models.loading import build_tokenizer, build_var
from fvar_core.sample.loading import load_models
from fvar_core.sample.sampler import sample_batch, settings_from

HERE = Path(__file__).parent / "data" / "pre-restructure"
GOLDEN = torch.load(HERE / "golden.pt")


def _equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_old_tokenizer_gives_the_same_tokens_and_reconstruction():
    tk = load_checkpoint(HERE / "tokenizer", expect_kind="tokenizer")
    tok = build_tokenizer(tk).eval()
    x = GOLDEN["x"]
    with torch.no_grad():
        _equal(tok.img_to_idx(x), GOLDEN["plain"])
        focus = tok.encode_with_pyramid(x, tk.preset.pyramid, tk.preset.resolution,
                                        generator=torch.Generator().manual_seed(0))
        _equal(focus.structure, GOLDEN["structure"])
        _equal(focus.alias, GOLDEN["alias"])
        torch.testing.assert_close(tok.img_to_recon(x), GOLDEN["recon"], rtol=0, atol=1e-5)


def test_old_var_gives_the_same_logits_and_samples():
    models = load_models(HERE / "var", HERE / "tokenizer", device="cpu")
    with torch.no_grad():
        x_in = models.tokenizer.quantize.idx_to_var_input(GOLDEN["structure"])
        logits = models.var(GOLDEN["labels"], x_in, label_dropout=False)
        torch.testing.assert_close(logits, GOLDEN["logits"], rtol=0, atol=1e-5)
        s = settings_from(models.var_ckpt.preset.sample, **GOLDEN["settings"])
        res = sample_batch(models.var, models.tokenizer, GOLDEN["labels"], [3, 4], s)
    _equal(res.tokens, GOLDEN["sample_tokens"])
    torch.testing.assert_close(res.images, GOLDEN["sample_images"], rtol=0, atol=1e-5)
    assert build_var(load_checkpoint(HERE / "var")).num_classes == models.var.num_classes
