"""`fvar bench train`: the real loop timed on random tokens, and the FLOP count behind its MFU."""
from __future__ import annotations

import json

import pytest
import torch

from fvar_core.pipelines.bench import count_flops
from fvar_core.presets import load_preset
from fvar_core.models.transformer import VAR


def var_flops_closed_form(p, backward: bool) -> int:
    """FLOPs of VAR's teacher-forced forward (+ backward) for one image, counted by hand:
    word_embed on L − 1 tokens, per block qkv/proj/fc1/fc2 (24·C²·L), attention QKᵀ and AV
    (4·L²·C, dense) and the AdaLN projection of the condition (12·C²), then head_nm's AdaLN
    (4·C²) and the head (2·C·V·L). Backward: twice the forward, except that word_embed's input
    needs no gradient (1×) and the fused attention backward also recomputes QKᵀ (2.5×)."""
    L, C, V, Cz, D = p.seq_len, p.model.width, p.tokenizer.vocab_size, p.tokenizer.z_channels, p.model.depth
    embed, attn = 2 * Cz * C * (L - 1), 4 * L * L * C
    fwd = embed + D * (24 * C * C * L + attn + 12 * C * C) + 4 * C * C + 2 * C * V * L
    return fwd if not backward else 3 * fwd - embed + D * attn // 2


@pytest.mark.parametrize("backward", [False, True])
def test_var_flop_count_matches_the_closed_form(backward):
    p = load_preset("tiny-64")
    torch.manual_seed(0)
    var = VAR(p.model, p.patch_nums, p.tokenizer.vocab_size, p.tokenizer.z_channels).train()
    x = torch.randn(1, p.seq_len - 1, p.tokenizer.z_channels)
    lab = torch.zeros(1, dtype=torch.long)
    got = count_flops((lambda: var(lab, x).sum().backward()) if backward else (lambda: var(lab, x)))
    assert got == var_flops_closed_form(p, backward)


def test_bench_train_writes_json_with_mfu(cli, tmp_path):
    out = tmp_path / "t.json"
    r = cli("bench", "train", "--preset", "tiny-64", "--batch", "4", "--steps", "2", "--warmup", "1",
            "--peak-tflops", "0.5", "--device", "cpu", "--json", str(out))
    assert r.code == 0, r.err
    assert "img/s" in r.out and "MFU" in r.out
    doc = json.loads(out.read_text())
    assert doc["benchmark"] == "train" and doc["machine"]["device_type"] == "cpu" and doc["machine"]["device"]
    assert doc["settings"] == {"batch": 4, "steps": 2, "warmup": 1, "precision": "fp32", "compile": False,
                               "activation_checkpointing": "pointwise"}  # the CPU's auto
    res = doc["results"]
    assert res["step_seconds"]["runs"] == 2 and res["img_per_s"] > 0
    assert res["step_ms"] == pytest.approx(1e3 * 4 / res["img_per_s"])
    assert res["peak_memory"]["peak_bytes"] > 0 and res["peak"] == {"tflops": 0.5, "source": "--peak-tflops"}
    assert res["mfu"] == pytest.approx(res["achieved_tflop_per_s"] / 0.5)
    assert res["achieved_tflop_per_s"] == pytest.approx(res["tflop_per_img"] * res["img_per_s"])
    # the model's forward + backward, plus the tokenizer's φ convs that build the teacher-forcing input
    model = var_flops_closed_form(load_preset("tiny-64"), backward=True)
    assert model <= res["tflop_per_img"] * 1e12 <= 1.02 * model


def test_bench_train_distill_counts_the_teacher_too(cli, tmp_path):
    docs = {}
    for mode in ("train", "distill"):
        out = tmp_path / f"{mode}.json"
        args = ["--distill"] if mode == "distill" else []
        r = cli("bench", "train", "--preset", "tiny-64", *args, "--batch", "2", "--steps", "1", "--warmup", "1",
                "--device", "cpu", "--json", str(out))
        assert r.code == 0, r.err
        docs[mode] = json.loads(out.read_text())
    assert docs["distill"]["model"]["mode"] == "distill"
    assert docs["distill"]["results"]["tflop_per_img"] > 1.5 * docs["train"]["results"]["tflop_per_img"]
    assert docs["train"]["results"]["mfu"] is None  # CPU: no peak known unless given


@pytest.mark.parametrize("args,message", [
    (["--preset", "nope"], "unknown preset 'nope'"),
    (["--preset", "tiny-64", "--distill", "--set", "teacher.enabled=false"], "teacher.enabled false"),
])
def test_bench_train_bad_input_is_one_line(cli, args, message):
    r = cli("bench", "train", *args, "--batch", "2", "--steps", "1", "--device", "cpu")
    assert r.code == 2 and message in r.err and r.err.strip().count("\n") == 0, r.err
