"""fvar's VQ-VAE decode and whole sampling against the official VAR code, side by side (as JSON).

    git clone https://github.com/FoundationVision/VAR /path/to/VAR
    python benchmarks/decode_speed.py --official /path/to/VAR [--ch 64] [--batch 8] [--depth 4] [--rounds 5]

Same weights in both (fvar's random init loaded into the official modules), the official VQ-VAE
layout at width --ch on 256 px (16×16 latent), fp32 on the CPU, rounds interleaved so that all
see the same machine state. Every variant runs in its own process: fvar tunes glibc's malloc for
the process it samples in (fvar_core/cpualloc.py), and the official code is measured both as it
ships and with that same setting, so the table shows what comes from the allocator. Decode: f̂ (batch, 32, 16, 16) → image. Sampling: a depth --depth
transformer (width 64·depth, VAR's d16 schedule, 680 tokens, 4096 codes) with the README's settings
(cfg 1.5, top-k 900, top-p 0.96), decode included; official = `autoregressive_infer_cfg`.
Pixel differences are reported against the official output (which fvar's decode matched exactly
before the decode speed-ups): max |Δ| in [0, 1] before 8-bit rounding and the share of 8-bit PNG
values that change.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from fvar_core.models.tokenizer import Tokenizer
from fvar_core.pipelines.bench import machine
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


VARIANTS = {  # name -> (what runs, tune the allocator first)
    "decode/official": ("decode-official", False),
    "decode/official+fvar-malloc": ("decode-official", True),
    "decode/fvar": ("decode-fvar-fp32", True),
    "decode/fvar-bf16": ("decode-fvar-bf16", True),
    "sample/official": ("sample-official", False),
    "sample/official+fvar-malloc": ("sample-official", True),
    "sample/fvar": ("sample-fvar", True),  # fvar's defaults: per-image random streams
    "sample/fvar-rng-official": ("sample-fvar-rng-official", True),  # the official stream: same pixels
}


def worker(a) -> None:
    """One variant in this process: a warm-up call, then --calls timed ones; prints JSON and saves
    the last output for the pixel comparison."""
    job, tune = VARIANTS[a.worker]
    if tune:
        from fvar_core.cpualloc import keep_freed_memory
        assert keep_freed_memory(), "the allocator setting is not available here"
    d = a.depth
    p = load_preset("var-d16-256", [f"tokenizer.ch={a.ch}", f"model.depth={d}", f"model.width={64 * d}",
                                    f"model.num_heads={d}"])
    torch.manual_seed(0)
    tok = Tokenizer(p.tokenizer, p.patch_nums).eval()
    var = VAR(p.model, p.patch_nums, p.tokenizer.vocab_size, p.tokenizer.z_channels).eval()
    f_hat = torch.randn(a.batch, 32, 16, 16, generator=torch.Generator().manual_seed(1))
    labels = torch.arange(a.batch) * 97 % 1000
    seeds = list(range(a.batch))
    settings = p.sample.model_copy(update={"cfg": 1.5, "top_k": 900, "top_p": 0.96})
    if "official" in job:
        vae, ovar = official_models(a.official, tok, var, a.ch, d)
    fn = {
        "decode-official": lambda: (vae.fhat_to_img(f_hat) * 0.5 + 0.5).clamp(0, 1),
        "decode-fvar-fp32": lambda: decode_images(tok, f_hat, "fp32"),
        "decode-fvar-bf16": lambda: decode_images(tok, f_hat, "bf16"),
        "sample-official": lambda: ovar.autoregressive_infer_cfg(a.batch, labels, g_seed=seeds[0], cfg=1.5, top_k=900,
                                                                 top_p=0.96),
        "sample-fvar": lambda: sample_batch(var, tok, labels, seeds, settings).images,
        "sample-fvar-rng-official": lambda: sample_batch(var, tok, labels, seeds,
                                                         settings.model_copy(update={"rng": "official"})).images,
    }[job]
    times = []
    with torch.no_grad():
        for i in range(a.calls + 1):
            out = timed(fn, times)
    torch.save(out, a.save)
    print(json.dumps({"times": times[1:]}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--official", required=True, help="a checkout of FoundationVision/VAR")
    ap.add_argument("--ch", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3, help="each variant runs once per round, in a fresh process")
    ap.add_argument("--calls", type=int, default=2, help="timed calls per process, after one warm-up")
    ap.add_argument("--only", default="", help="comma-separated variant names (default: all)")
    ap.add_argument("--worker", default="", help=argparse.SUPPRESS)
    ap.add_argument("--save", default="", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return worker(a)
    names = [n for n in VARIANTS if not a.only or n in a.only.split(",")]
    times = {n: [] for n in names}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.rounds):
            for n in names:  # interleaved: every variant once per round
                cmd = [sys.executable, __file__, *sys.argv[1:], "--worker", n, "--save", f"{tmp}/{n.replace('/', '_')}.pt"]
                res = subprocess.run(cmd, capture_output=True, text=True, check=True)
                times[n] += json.loads(res.stdout.strip().splitlines()[-1])["times"]
        outs = {n: torch.load(f"{tmp}/{n.replace('/', '_')}.pt") for n in names}
    report = {"batch": a.batch, "ch": a.ch, "depth": a.depth, "rounds": a.rounds, "calls": a.calls,
              "machine": machine(torch.device("cpu"))}
    for n in names:
        med = statistics.median(times[n])
        report[n] = {"median_s": med, "img_per_s": a.batch / med, "spread_s": [min(times[n]), max(times[n])]}
        base = n.split("/")[0] + "/official"
        if base in report and n != base:
            report[n]["speed_vs_official"] = report[n]["img_per_s"] / report[base]["img_per_s"]
            if n != "sample/fvar":  # per-image streams draw other (equally valid) samples
                report[n].update(pixel_diff(outs[n], outs[base]))
    if "decode/fvar" in outs and "decode/fvar-bf16" in outs:
        mse = float(((outs["decode/fvar-bf16"] - outs["decode/fvar"]) ** 2).mean())
        report["decode/fvar-bf16"]["psnr_vs_fp32_db"] = 10 * math.log10(1.0 / max(mse, 1e-20))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
