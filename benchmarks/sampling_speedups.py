"""The training-free sampling speed-ups, measured: speed, memory and quality, as a Markdown table.

    python benchmarks/sampling_speedups.py --data release/data [--refiner RUN] [--seeds 3] \
        [--per-class 100] [--d16] [--results benchmarks/RESULTS.md]

Three parts, each optional:
- release (needs --data, the `fvar release train` export with train/ and test/): the bundled
  fmnist-32 and the bundled classifier `fmnist`. For every setting: img/s (decode included, batch
  100, median of the seeds' runs), peak memory of the KV caches, and — 100 samples per class, each
  of --seeds sampling seeds — class-conditional accuracy and feature FID against the test split,
  beside the default's own figures. --refiner adds the draft-and-refine rows (a smaller model
  trained on the same tokenizer's tokens).
- fixture: token agreement of (a) and (b) with the default sampler on the official-format fixture
  (tests/data/var-reference, the keyed depth-2 VAR at 256 px), greedy, per scale.
- --d16: speed of every option with d16-shaped random weights (width 1024, 680 tokens, VQ-VAE
  ch 160), batch 2, one timed run after a warm-up (slow on a CPU: minutes).
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fvar_core.config import SampleConfig  # noqa: E402
from fvar_core.eval.classifier import load_classifier  # noqa: E402
from fvar_core.eval.feature_metrics import ImageSet, evaluate_sets, folder_set  # noqa: E402
from fvar_core.models.transformer import VAR  # noqa: E402
from fvar_core.sample.loading import attach_refiner, open_models  # noqa: E402
from fvar_core.sample.sampler import sample, sample_batch  # noqa: E402

# (label, SampleConfig overrides, needs the refiner)
RELEASE_SETTINGS = [
    ("default", {}, False),
    ("(a) cfg on scales 0–3", {"cfg_scales": 4}, False),
    ("(a) cfg on scales 0–2", {"cfg_scales": 3}, False),
    ("(b) prune 8×8: 50 %", {"prune": {8: 0.5}}, False),
    ("(b) prune 6×6: 50 %, 8×8: 75 %", {"prune": {6: 0.5, 8: 0.75}}, False),
    ("(a)+(b) cfg 0–3, prune 8×8: 50 %", {"cfg_scales": 4, "prune": {8: 0.5}}, False),
    ("(a)+(b) cfg 0–2, prune 6×6: 50 %, 8×8: 75 %", {"cfg_scales": 3, "prune": {6: 0.5, 8: 0.75}}, False),
    ("(d) KV budget: first 1, recent 1", {"kv_budget": (1, 1)}, False),
    ("(c) refine from scale 4", {"refine_from": 4}, True),
    ("(c) refine from scale 3", {"refine_from": 3}, True),
    ("(c)+(a) refine from 4, cfg 0–3", {"refine_from": 4, "cfg_scales": 4}, True),
    ("(c)+(a) refine from 3, cfg 0–2", {"refine_from": 3, "cfg_scales": 3}, True),
    ("(c)+(a)+(b) refine from 4, cfg 0–3, prune 8×8: 50 %", {"refine_from": 4, "cfg_scales": 4, "prune": {8: 0.5}},
     True),
]


def run_setting(models, settings: SampleConfig, labels, seed: int, batch: int, refiner):
    """→ (images uint8 (N, 3, H, W), seconds, KV bytes per batch)."""
    seeds = [seed * 1_000_003 + i for i in range(len(labels))]
    t = time.perf_counter()
    out = sample(models.var, models.tokenizer, labels, seeds, settings, batch_size=batch, refiner=refiner)
    sec = time.perf_counter() - t
    return (out.images * 255).round().to(torch.uint8), sec, out.kv_bytes


def release_table(a) -> str:
    models = open_models("fmnist-32", device="cpu")
    refiner = attach_refiner(copy.copy(models), a.refiner).refiner if a.refiner else None
    clf = load_classifier("fmnist", device="cpu")
    ref = folder_set(Path(a.data) / "test", 32, "test split")
    base = models.preset.sample.model_copy(update={"batch_size": a.batch})
    labels = [c for c in range(10) for _ in range(a.per_class)]
    rows = []
    for label, over, needs in RELEASE_SETTINGS:
        if needs and refiner is None:
            continue
        s = base.model_copy(update=over)
        accs, fids, ips, kv = [], [], [], 0
        for seed in range(a.seeds):
            imgs, sec, kv = run_setting(models, s, labels, seed, a.batch, refiner if needs else None)
            ips.append(len(labels) / sec)
            rep = evaluate_sets(clf, ref, [ImageSet(label, imgs, [clf.classes[c] for c in labels], "samples")],
                                kid_subsets=1, kid_subset_size=min(100, len(labels)))
            accs.append(100 * rep["rows"][0]["accuracy"])
            fids.append(rep["rows"][0]["fid"])
        rows.append({"label": label, "settings": over, "img_s": statistics.median(ips), "kv_mb": kv / 1e6,
                     "acc": accs, "fid": fids})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    d = rows[0]
    lines = [f"Bundled `fmnist-32` (batch {a.batch}, decode included, CPU fp32), {a.per_class} samples per class × "
             f"{a.seeds} sampling seeds; accuracy by the bundled classifier, feature FID against the test split "
             "(mean ± half the spread over the seeds); speed = median img/s over the seeds' runs.", "",
             "| setting | img/s | × default | KV cache MB/batch | class acc. % | Δ acc. | feature FID | FID vs default |",
             "|---|---|---|---|---|---|---|---|"]
    m = lambda v: (float(np.mean(v)), (max(v) - min(v)) / 2)  # noqa: E731
    for r in rows:
        acc, acc_s = m(r["acc"])
        fid, fid_s = m(r["fid"])
        lines.append(f"| {r['label']} | {r['img_s']:.1f} | {r['img_s'] / d['img_s']:.2f}× | {r['kv_mb']:.2f} | "
                     f"{acc:.1f} ± {acc_s:.1f} | {acc - m(d['acc'])[0]:+.1f} | {fid:.2f} ± {fid_s:.2f} | "
                     f"{100 * (fid / m(d['fid'])[0] - 1):+.0f} % |")
    return "\n".join(lines)


def fixture_table() -> str:
    """Token agreement with the default sampler, greedy, on the official-format fixture."""
    from tests.test_sampler import keyed_tokenizer, load_manifest, load_ref
    from tests.test_transformer_compat import build_keyed_model

    var = build_keyed_model(load_manifest())
    tok = keyed_tokenizer(load_ref())
    labels = torch.tensor([207, 980, 1, 388, 92, 511, 33, 750])
    seeds = list(range(len(labels)))
    greedy = SampleConfig(cfg=1.5, top_k=1, top_p=0.0)
    base = sample_batch(var, tok, labels, seeds, greedy, decode=False).tokens
    pns = var.patch_nums
    lines = ["Greedy (top-k 1) on the fixture's keyed depth-2 VAR (256 px, 10 scales), 8 images: share of "
             "tokens equal to the default sampler's, per scale.", "",
             "| setting | " + " | ".join(f"{p}×{p}" for p in pns) + " |", "|---|" + "---|" * len(pns)]
    for label, over in (("(a) cfg on scales 0–6", {"cfg_scales": 7}), ("(a) cfg on scales 0–4", {"cfg_scales": 5}),
                        ("(b) prune 16×16: 50 %", {"prune": {16: 0.5}}),
                        ("(b) prune 13×13: 50 %, 16×16: 75 %", {"prune": {13: 0.5, 16: 0.75}})):
        got = sample_batch(var, tok, labels, seeds, greedy.model_copy(update=over), decode=False).tokens
        lines.append(f"| {label} | " + " | ".join(f"{100 * float((g == b).float().mean()):.0f} %"
                                                  for g, b in zip(got, base)) + " |")
    return "\n".join(lines)


def d16_table(a) -> str:
    from fvar_core.models.tokenizer import Tokenizer
    from fvar_core.presets import load_preset

    p = load_preset("var-d16-256")
    torch.manual_seed(0)
    var = VAR(p.model, p.patch_nums, p.tokenizer.vocab_size, p.tokenizer.z_channels).eval()
    tok = Tokenizer(p.tokenizer, p.patch_nums).eval()
    small = copy.deepcopy(var)
    small.blocks = small.blocks[:4]  # a d4-deep refiner of the same width (speed only)
    small.depth = 4
    labels = torch.arange(2) * 500
    rows = []
    for label, over, ref in (("default", {}, None), ("(a) cfg on scales 0–6", {"cfg_scales": 7}, None),
                             ("(b) prune 13×13: 50 %, 16×16: 75 %", {"prune": {13: 0.5, 16: 0.75}}, None),
                             ("(c) refine from 7 (4 of 16 blocks)", {"refine_from": 7}, small),
                             ("(d) KV budget 1, 1", {"kv_budget": (1, 1)}, None),
                             ("bf16 decode", {"decode_precision": "bf16"}, None),
                             ("(a)+(b)+(c) + bf16 decode", {"cfg_scales": 7, "prune": {13: 0.5, 16: 0.75},
                                                            "refine_from": 7, "decode_precision": "bf16"}, small)):
        s = p.sample.model_copy(update=over)
        sample_batch(var, tok, labels, [0, 1], s, refiner=ref)  # warm-up
        t = time.perf_counter()
        out = sample_batch(var, tok, labels, [0, 1], s, refiner=ref)
        sec = time.perf_counter() - t
        rows.append((label, 2 / sec, out.kv_bytes / 2 ** 20))
        print(rows[-1], file=sys.stderr, flush=True)
    lines = ["d16-shaped random weights (width 1024, 16 blocks, 680 tokens; VQ-VAE ch 160 at 256 px), batch 2, "
             "cfg 1.5, top-k 900, top-p 0.96, fp32 CPU.", "", "| setting | img/s | × default | KV cache MiB |",
             "|---|---|---|---|"]
    lines += [f"| {lb} | {ips:.3f} | {ips / rows[0][1]:.2f}× | {kv:.0f} |" for lb, ips, kv in rows]
    return "\n".join(lines)


def write_into(results: Path, tables: dict) -> None:
    """Replace each measured table between its markers in `results` (the prose around them stays)."""
    text = results.read_text()
    for name, table in tables.items():
        begin, end = f"<!-- sampling_speedups:{name} -->", f"<!-- /sampling_speedups:{name} -->"
        if begin not in text or end not in text:
            raise SystemExit(f"{results}: no {begin} … {end} block to replace")
        head, rest = text.split(begin, 1)
        text = head + begin + "\n" + table + "\n" + end + rest.split(end, 1)[1]
    results.write_text(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", help="the fvar release data export (train/, test/)")
    ap.add_argument("--refiner", help="a smaller var checkpoint on the release's tokenizer (draft and refine)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--per-class", type=int, default=100)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--d16", action="store_true")
    ap.add_argument("--no-fixture", action="store_true")
    ap.add_argument("--out", default="-", help="a Markdown file to write, or - for stdout")
    ap.add_argument("--results", help="also replace the measured tables in this file (benchmarks/RESULTS.md) "
                                      "between its <!-- sampling_speedups:PART --> markers")
    a = ap.parse_args()
    from fvar_core.pipelines.bench import machine

    m = machine(torch.device("cpu"))
    parts = [f"Machine: {m['cpu']}, {m['cpu_cores']} cores, {m['torch_threads']} threads, torch {m['torch']}."]
    tables = {}
    if not a.no_fixture:
        tables["fixture"] = fixture_table()
    if a.data:
        tables["release"] = release_table(a)
    if a.d16:
        tables["d16"] = d16_table(a)
    parts += tables.values()
    text = "\n\n".join(parts) + "\n"
    if a.results:
        write_into(Path(a.results), tables)
    if a.out == "-":
        print(text)
    else:
        Path(a.out).write_text(text)


if __name__ == "__main__":
    main()
