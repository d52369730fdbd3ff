"""Wrote golden.pt from the checkpoints beside it, with fvar at commit 37c1cf3 (before the
restructuring of issue #15). Kept as the record of how the fixture was made; it imports that
commit's module paths and is not run by the tests.

The checkpoints are `fvar train-tokenizer` / `fvar train` runs of tiny-32 (tokenizer.ch_mult
[1, 1, 1]; model.width 32, num_heads 1), 2 steps each, on `tests.helpers.make_folder` images;
only config.json and model.safetensors were kept (a weights-only copy).
"""
from pathlib import Path

import torch

from fvar_core.checkpoints import load_checkpoint
from fvar_core.models.loading import build_tokenizer, build_var
from fvar_core.sample.sampler import sample_batch, settings_from
from fvar_core.focus.testimages import zone_plate

here = Path(__file__).parent
tk, ck = load_checkpoint(here / "tokenizer"), load_checkpoint(here / "var")
tok, var = build_tokenizer(tk).eval(), build_var(ck).eval()
p = tk.preset
zp = zone_plate(32)
x = torch.stack([zp, zp.flip(-1)]) * 2 - 1  # (2, 3, 32, 32) in [-1, 1]
with torch.no_grad():
    plain = tok.img_to_idx(x)
    focus = tok.encode_with_pyramid(x, p.pyramid, p.resolution, generator=torch.Generator().manual_seed(0))
    recon = tok.img_to_recon(x)
    labels = torch.tensor([1, 0])
    logits = var(labels, tok.quantize.idx_to_var_input(focus.structure), label_dropout=False)
    s = settings_from(ck.preset.sample, cfg=1.5, top_k=10, top_p=0.9)
    res = sample_batch(var, tok, labels, [3, 4], s)
torch.save({"x": x, "plain": plain, "structure": focus.structure, "alias": focus.alias, "recon": recon,
            "labels": labels, "logits": logits, "sample_tokens": res.tokens, "sample_images": res.images,
            "settings": s.model_dump()}, here / "golden.pt")
