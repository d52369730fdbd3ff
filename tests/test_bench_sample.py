"""`fvar bench sample` and the shared measuring helpers (timer, peak memory, FLOP count, machine)."""
from __future__ import annotations

import json
import time

import pytest
import torch

from fvar_core.pipelines.bench import PeakMemory, Timer, count_flops, device_name, machine
from tests.test_sample_cli import _err_line, tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory)


def _check_result(doc: dict, batch: int) -> None:
    assert doc["benchmark"] == "sample"
    m = doc["machine"]
    assert m["device"] and m["torch"] == torch.__version__ and m["cpu_cores"] >= 1
    assert doc["settings"]["batch"] == batch and "cfg" in doc["settings"] and "top_k" in doc["settings"]
    r = doc["results"]
    assert r["img_per_s"] > 0 and r["img_per_s_no_decode"] >= r["img_per_s"]
    assert 0 < r["decode_share"] < 1
    assert r["batch_seconds"]["sample"]["median_s"] > 0 and r["batch_seconds"]["decode"]["runs"] >= 1
    assert r["peak_memory"]["peak_bytes"] > 0 and r["peak_memory"]["kind"] in ("rss", "maxrss", "cuda_allocated")


def test_bench_sample_preset_writes_json(cli, tmp_path):
    out = tmp_path / "b.json"
    r = cli("bench", "sample", "--preset", "tiny-64", "--batch", "4", "--steps", "2", "--device", "cpu",
            "--json", str(out))
    assert r.code == 0, r.err
    assert "img/s with decode" in r.out
    doc = json.loads(out.read_text())
    _check_result(doc, 4)
    assert doc["model"]["preset"] == "tiny-64" and doc["model"]["params"] > 0
    g = doc["results"]["gflop_per_img"]
    assert g["transformer"] > 0 and g["decode"] > 0 and doc["results"]["achieved_tflop_per_s"] > 0


def test_bench_sample_checkpoint(cli, tiny_ckpt, tmp_path):
    out = tmp_path / "b.json"
    r = cli("bench", "sample", "--ckpt", str(tiny_ckpt), "--batch", "2", "--steps", "1", "--cfg", "0",
            "--no-flops", "--device", "cpu", "--json", str(out))
    assert r.code == 0, r.err
    doc = json.loads(out.read_text())
    _check_result(doc, 2)
    assert doc["model"]["checkpoint"]["step"] == 7 and doc["settings"]["cfg"] == 0.0
    assert "gflop_per_img" not in doc["results"]


@pytest.mark.parametrize("args, message", [
    ([], "give exactly one of --preset"),
    (["--preset", "tiny-64", "--ckpt", "x"], "give exactly one of --preset"),
    (["--preset", "nope"], "unknown preset 'nope'"),
])
def test_bench_sample_bad_arguments(cli, args, message):
    r = cli("bench", "sample", *args, "--device", "cpu")
    assert r.code == 2
    assert message in _err_line(r)


def test_cfg_zero_counts_half_the_transformer_flops():
    from fvar_core.pipelines.bench import bench_sample
    from fvar_core.config import SampleConfig
    from fvar_core.presets import load_preset
    from fvar_core.models.tokenizer import Tokenizer
    from fvar_core.models.transformer import VAR

    p = load_preset("tiny-32")
    var = VAR(p.model, p.patch_nums, p.tokenizer.vocab_size, p.tokenizer.z_channels).eval()
    tok = Tokenizer(p.tokenizer, p.patch_nums).eval()
    kw = dict(batch=1, steps=1, warmup=0)
    on = bench_sample(var, tok, SampleConfig(cfg=1.5), **kw)["gflop_per_img"]
    off = bench_sample(var, tok, SampleConfig(cfg=0.0), **kw)["gflop_per_img"]
    # no null-class half: half the work, except word_embed of the next-scale input, which runs once
    # on B rows in both cases (repeated for the null half after it, as VAR does)
    assert 0.5 < off["transformer"] / on["transformer"] < 0.52
    assert off["decode"] == on["decode"]


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------

def test_timer_measures_wall_time():
    with Timer("cpu") as t:
        time.sleep(0.05)
    assert 0.045 < t.seconds < 1.0


PEAK_CHECK = """
import time, torch
from fvar_core.pipelines.bench import PeakMemory
with PeakMemory("cpu", interval=0.001) as mem:
    x = torch.ones(64 * 2 ** 20 // 4 * 4)  # 256 MiB, touched
    time.sleep(0.02)
    del x
print(mem.kind, mem.delta_bytes, mem.peak_bytes)
"""


def test_peak_memory_sees_a_cpu_allocation():
    # a fresh process: once fvar has decoded on the CPU, glibc keeps freed memory (fvar_core/cpualloc.py),
    # so in this test process a new tensor may reuse pages the RSS already counts
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", PEAK_CHECK], capture_output=True, text=True, check=True).stdout
    kind, delta, peak = out.split()
    if kind == "rss":
        assert int(delta) > 200 * 2 ** 20
    assert int(peak) > 256 * 2 ** 20


def test_count_flops_counts_a_matmul():
    a, b = torch.randn(8, 16), torch.randn(16, 4)
    assert count_flops(lambda: a @ b) == 2 * 8 * 16 * 4


def test_device_helpers():
    assert "CPU" in device_name(torch.device("cpu"))
    assert machine(torch.device("cpu"))["device_type"] == "cpu"


def test_bench_sample_reports_each_speedup(cli, tmp_path):
    """The options reach the benchmark: fewer FLOPs with guidance dropped early and with pruning, a
    smaller KV cache under a budget, a random-init refiner at the preset's width."""
    docs = {}
    for name, args in (("default", []), ("cfg", ["--cfg-scales", "2"]), ("prune", ["--prune", "4:0.75"]),
                       ("kv", ["--kv-budget", "1,0"]), ("refine", ["--refiner-depth", "1", "--refine-from", "2"])):
        out = tmp_path / f"{name}.json"
        r = cli("bench", "sample", "--preset", "tiny-32", "--batch", "2", "--steps", "1", "--device", "cpu",
                *args, "--json", str(out))
        assert r.code == 0, r.err
        assert "KV cache" in r.out
        docs[name] = json.loads(out.read_text())
    gf = {k: d["results"]["gflop_per_img"]["transformer"] for k, d in docs.items()}
    assert gf["cfg"] < gf["default"] and gf["prune"] < gf["default"]
    kv = {k: d["results"]["kv_cache_mib"] for k, d in docs.items()}
    assert kv["kv"] < kv["default"] == kv["cfg"] and kv["refine"] > kv["default"]  # two caches
    assert docs["prune"]["settings"]["prune"] == {"4": 0.75}
    assert docs["refine"]["model"]["refiner"]["depth"] == 1
    r = cli("bench", "sample", "--preset", "tiny-32", "--refiner", "x", "--refine-from", "2", "--device", "cpu")
    assert r.code == 2 and "with --preset use --refiner-depth" in _err_line(r)
