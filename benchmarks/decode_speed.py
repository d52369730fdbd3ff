"""fvar's VQ-VAE decode and whole sampling against the official VAR code, side by side (as JSON).

    git clone https://github.com/FoundationVision/VAR /path/to/VAR
    python benchmarks/decode_speed.py --official /path/to/VAR [--ch 64] [--batch 8] [--depth 4] [--rounds 5]

Same weights in both (fvar's random init loaded into the official modules), the official VQ-VAE
layout at width --ch on 256 px (16×16 latent), fp32 on the CPU, rounds interleaved so that both
see the same machine state. Decode: f̂ (batch, 32, 16, 16) → image. Sampling: a depth --depth
transformer (width 64·depth, VAR's d16 schedule, 680 tokens, 4096 codes) with the README's settings
(cfg 1.5, top-k 900, top-p 0.96), decode included; official = `autoregressive_infer_cfg`.
Pixel differences are reported against the official output (which fvar's decode matched exactly
before the decode speed-ups): max |Δ| in [0, 1] before 8-bit rounding and the share of 8-bit PNG
values that change.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from fvar_core.models.tokenizer import Tokenizer
from fvar_core.models.transformer import VAR
from fvar_core.presets import load_preset
from fvar_core.sample.sampler import decode_images, sample_batch


def official_models(repo: str, tok: Tokenizer, var: VAR, ch: int, depth: int):
    """The official VQVAE and VAR classes, built directly (build_vae_var would patch torch.nn's
    initialisers for the whole process) and loaded with fvar's weights, strictly."""
    sys.path.insert(0, repo)
    from models.var import VAR as OfficialVAR
    from models.vqvae import VQVAE

    vae = VQVAE(vocab_size=4096, z_channels=32, ch=ch, test_mode=True, share_quant_resi=4).eval()
    vae.load_state_dict(tok.official_state_dict(), strict=True)
    ovar = OfficialVAR(vae_local=vae, num_classes=1000, depth=depth, embed_dim=64 * depth, num_heads=depth,
                       drop_path_rate=0.0, norm_eps=1e-6, shared_aln=False, cond_drop_rate=0.1, attn_l2_norm=True,
                       flash_if_available=False, fused_if_available=False).eval()
    ovar.load_state_dict(var.official_state_dict(), strict=True)
    return vae, ovar


def timed(fn, rounds_out: list) -> torch.Tensor:
    t = time.perf_counter()
    out = fn()
    rounds_out.append(time.perf_counter() - t)
    return out


def pixel_diff(a: torch.Tensor, b: torch.Tensor) -> dict:
    """a, b (B, 3, H, W) in [0, 1]."""
    q = lambda x: (x * 255).round().clamp(0, 255).to(torch.uint8)  # noqa: E731 — PNG's 8-bit rounding
    return {"max_abs": float((a - b).abs().max()), "png_values_changed": int((q(a) != q(b)).sum()),
            "png_values": a.numel()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--official", required=True, help="a checkout of FoundationVision/VAR")
    ap.add_argument("--ch", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--skip-sampling", action="store_true")
    a = ap.parse_args()
    d = a.depth
    p = load_preset("var-d16-256", [f"tokenizer.ch={a.ch}", f"model.depth={d}", f"model.width={64 * d}",
                                    f"model.num_heads={d}"])
    torch.manual_seed(0)
    tok = Tokenizer(p.tokenizer, p.patch_nums).eval()
    var = VAR(p.model, p.patch_nums, p.tokenizer.vocab_size, p.tokenizer.z_channels).eval()
    vae, ovar = official_models(a.official, tok, var, a.ch, d)
    f_hat = torch.randn(a.batch, 32, 16, 16, generator=torch.Generator().manual_seed(1))
    labels = torch.arange(a.batch) * 97 % 1000
    seeds = list(range(a.batch))
    settings = p.sample.model_copy(update={"cfg": 1.5, "top_k": 900, "top_p": 0.96, "rng": "official"})

    variants = {
        "official": lambda: (vae.fhat_to_img(f_hat) * 0.5 + 0.5).clamp(0, 1),
        "fvar": lambda: decode_images(tok, f_hat, "fp32"),
        "fvar_bf16": lambda: decode_images(tok, f_hat, "bf16"),
    }
    times = {k: [] for k in variants}
    outs = {}
    with torch.no_grad():
        for r in range(a.rounds + 1):  # round 0 warms up
            for k, fn in variants.items():
                outs[k] = timed(fn, times[k])
    report = {"batch": a.batch, "ch": a.ch, "rounds": a.rounds, "threads": torch.get_num_threads(),
              "decode": {k: {"median_s": statistics.median(v[1:]), "img_per_s": a.batch / statistics.median(v[1:])}
                         for k, v in times.items()}}
    for k in ("fvar", "fvar_bf16"):
        report["decode"][k].update(pixel_diff(outs[k], outs["official"]))
        report["decode"][k]["speed_vs_official"] = report["decode"][k]["img_per_s"] / report["decode"]["official"]["img_per_s"]
        if k == "fvar_bf16":
            mse = float(((outs[k] - outs["fvar"]) ** 2).mean())
            report["decode"][k]["psnr_vs_fp32_db"] = 10 * torch.log10(torch.tensor(1.0 / max(mse, 1e-20))).item()

    if not a.skip_sampling:
        samplers = {
            "official": lambda: ovar.autoregressive_infer_cfg(a.batch, labels, g_seed=seeds[0], cfg=1.5, top_k=900,
                                                              top_p=0.96),
            "fvar": lambda: sample_batch(var, tok, labels, seeds, settings).images,
        }
        st = {k: [] for k in samplers}
        souts = {}
        with torch.no_grad():
            for r in range(a.rounds + 1):
                for k, fn in samplers.items():
                    souts[k] = timed(fn, st[k])
        report["sample"] = {k: {"median_s": statistics.median(v[1:]), "img_per_s": a.batch / statistics.median(v[1:])}
                            for k, v in st.items()}
        report["sample"]["fvar"]["speed_vs_official"] = report["sample"]["fvar"]["img_per_s"] / report["sample"]["official"]["img_per_s"]
        report["sample"]["fvar"].update(pixel_diff(souts["fvar"], souts["official"]))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
