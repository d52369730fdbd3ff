"""The ablation runner (`fvar experiment ablation`) and the alias audit's pieces."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fvar_core.focus.alias import image_leakage
from fvar_core.pipelines.alias_audit import code_usage, derangement, shuffle_alias
from fvar_core.pipelines.experiment import ROWS
from fvar_core.focus.testimages import draw_image_folder

# Two rows × one seed on drawn images, a handful of steps: seconds, not a model.
TINY = ["--rows", "var,fvar", "--seeds", "1", "--tokenizer-steps", "4", "--steps", "4", "--train-per-class", "8",
        "--test-per-class", "4", "--samples-per-class", "4", "--classifier-epochs", "0.5",
        "--set", "model.num_classes=2", "--device", "cpu"]


def _fvar(*args: str) -> list:
    return [sys.executable, "-c", "from fvar_cli.app import main; main()", *args]


@pytest.fixture(scope="module")
def drawn(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("drawn")
    draw_image_folder(root / "train", per_class=12, seed=0)
    draw_image_folder(root / "test", per_class=8, seed=1)
    return root


@pytest.fixture(scope="module")
def finished(drawn, tmp_path_factory) -> Path:
    """An uninterrupted tiny ablation."""
    out = tmp_path_factory.mktemp("ablation") / "out"
    r = subprocess.run(_fvar("experiment", "ablation", "--out", str(out), "--data", str(drawn), *TINY),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return out


def _metrics(cell: dict) -> dict:
    return {k: v for k, v in cell.items() if k not in ("seconds",)}


def test_tiny_ablation_table_has_the_rows(finished):
    summary = json.loads((finished / "results.json").read_text())
    assert [r["row"] for r in summary["rows"]] == ["var", "fvar"]
    table = (finished / "table.md").read_text()
    assert ROWS["var"].label in table and ROWS["fvar"].label in table
    assert ROWS["fvar-shared"].label not in table
    var, fvar = summary["cells"]
    assert var["teacher_ce"] is None and fvar["teacher_ce"] is not None  # only the distilled row has a teacher
    assert len(var["student_ce_per_scale"]) == 6
    assert 0.0 <= var["accuracy"] <= 1.0 and var["samples"] == 8
    assert (finished / "ablation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from fvar_core.data.images import load_image

    sheet = load_image(finished / "samples-seed0.png")  # 2 bands of 4 samples × 2 classes, 32 px, zoom 2
    assert sheet.shape == (3, 2 * (2 * (4 * 33 + 1)) + 2 * 4, 2 * (2 * 33 + 1))
    # The two rows share the preset's budget but not the tokenizer: VAR's has no alias codebook.
    assert (finished / "tokenizers" / "area" / "seed-0" / "run").is_dir()
    assert (finished / "tokenizers" / "disk" / "seed-0" / "run").is_dir()


def test_killed_ablation_resumes_to_the_same_results(drawn, finished, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen(_fvar("experiment", "ablation", "--out", str(out), "--data", str(drawn), *TINY),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    first = out / "cells" / "var" / "seed-0" / "result.json"
    deadline = time.time() + 300
    while not first.is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # in the middle of the second cell
    assert proc.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    assert first.is_file() and not (out / "results.json").exists()
    kept = first.read_bytes()

    r = subprocess.run(_fvar("experiment", "ablation", "--out", str(out), "--data", str(drawn), *TINY),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "[1/2] var seed 0 (done)" in r.stdout
    assert first.read_bytes() == kept  # a finished cell is not recomputed
    mine = json.loads((out / "results.json").read_text())["cells"]
    ref = json.loads((finished / "results.json").read_text())["cells"]
    for a, b in zip(mine, ref):  # deterministic on CPU: bitwise the same numbers as the uninterrupted run
        assert _metrics(a)["budget"] == _metrics(b)["budget"]
        for k in ("accuracy", "fid", "precision", "recall", "student_ce", "teacher_ce", "alias_db"):
            assert a[k] == b[k], k


def test_other_budget_in_the_same_folder_is_refused(drawn, finished, cli):
    args = [a if a != "4" else "5" for a in TINY]  # other step counts
    r = cli("experiment", "ablation", "--out", str(finished), "--data", str(drawn), *args)
    assert r.code == 2 and "another budget" in r.err and "Traceback" not in r.err


def test_unknown_row_is_one_line(tmp_path, cli):
    r = cli("experiment", "ablation", "--out", str(tmp_path / "o"), "--rows", "var,nope", "--data", str(tmp_path))
    assert r.code == 2 and "unknown ablation row 'nope'" in r.err
    assert len(r.err.strip().splitlines()) == 1


def test_shuffled_alias_changes_the_teachers_alias_input_and_nothing_else(finished, monkeypatch):
    """cross_entropy_report runs the teacher twice per batch: the second call must get the same
    labels and structure input, and alias tokens that are another image's, row for row."""
    from fvar_core.pipelines.alias_audit import cross_entropy_report
    from fvar_core.models.teacher import Teacher

    calls = []
    real = Teacher.forward

    def spy(self, label_B, x_in, alias_BL, **kw):
        calls.append((label_B.clone(), x_in.clone(), alias_BL.clone()))
        return real(self, label_B, x_in, alias_BL, **kw)

    monkeypatch.setattr(Teacher, "forward", spy)
    run = finished / "cells" / "fvar" / "seed-0" / "run"
    shards = finished / "tokenizers" / "disk" / "seed-0" / "shards-test"
    rep = cross_entropy_report(run, shards, batch_size=8)
    assert len(calls) == 2
    (l1, x1, a1), (l2, x2, a2) = calls
    assert torch.equal(l1, l2) and torch.equal(x1, x2)
    assert not torch.equal(a1, a2)
    # Every image got some other image's whole alias sequence.
    match = [[bool(torch.equal(a2[i], a1[j])) for j in range(len(a1))] for i in range(len(a1))]
    assert all(any(row) for row in match)
    distinct = len({tuple(r.tolist()) for r in a1}) == len(a1)
    if distinct:
        assert not any(match[i][i] for i in range(len(a1)))
    assert rep["teacher"]["mean"] != rep["teacher_shuffled"]["mean"]


def test_derangement_has_no_fixed_point():
    g = torch.Generator().manual_seed(0)
    for n in (2, 3, 7, 64):
        for _ in range(20):
            p = derangement(n, g)
            assert sorted(p.tolist()) == list(range(n))
            assert not bool((p == torch.arange(n)).any())
    a = torch.arange(12).view(4, 3)
    s = shuffle_alias(a, torch.Generator().manual_seed(1))
    assert sorted(map(tuple, s.tolist())) == sorted(map(tuple, a.tolist()))


def test_code_usage_golden():
    u = code_usage(np.array([5, 5, 0, 0]))
    assert u == {"perplexity": pytest.approx(2.0), "used": 2, "dead": 2, "size": 4}
    assert code_usage(np.ones(8))["perplexity"] == pytest.approx(8.0)
    assert code_usage(np.zeros(3))["dead"] == 3


def _quantizer_and_focus_latents():
    """tiny-32's quantizer (eval, seed 0), a random latent f (2, Cz, 8, 8) and focus latents z_k:
    f plus noise at every scale but the last, where z_K = f."""
    from fvar_core.presets import load_preset
    from fvar_core.models.quantizer import MultiScaleQuantizer

    p = load_preset("tiny-32")
    torch.manual_seed(0)
    q = MultiScaleQuantizer(p.tokenizer, p.patch_nums).eval()
    H = p.patch_nums[-1]
    f = torch.randn(2, p.tokenizer.z_channels, H, H)
    return p, q, f, [f + 0.3 * torch.randn_like(f) for _ in p.patch_nums[:-1]] + [f]


def test_encode_focus_energy_matches_its_definition():
    """with_energy: structure = ms(area_down(z_k − f̂_{k−1})), alias = ms(area_down(f − z_k)); the
    tokens are the same as without it."""
    import torch.nn.functional as F

    p, q, f, zs = _quantizer_and_focus_latents()
    a = q.encode_focus(f, zs, with_energy=True)
    b = q.encode_focus(f, zs)
    assert all(torch.equal(x, y) for x, y in zip(a.structure, b.structure))
    assert all(torch.equal(x, y) for x, y in zip(a.alias, b.alias))
    pn0 = p.patch_nums[0]
    want_s = F.adaptive_avg_pool2d(zs[0], pn0).square().mean(dim=(1, 2, 3))  # f̂_{−1} = 0
    want_a = F.adaptive_avg_pool2d(f - zs[1], p.patch_nums[1]).square().mean(dim=(1, 2, 3))
    torch.testing.assert_close(a.energy[0]["structure"], want_s, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(a.energy[1]["alias"], want_a, rtol=1e-5, atol=1e-7)
    assert float(a.energy[-1]["alias"].abs().max()) == 0.0  # z_K = E(x): nothing to alias
    assert all(float(e["alias_error"].min()) >= 0.0 for e in a.energy)


def test_image_leakage_orders_smooth_below_jagged():
    R, patch_nums = 32, (1, 2, 3, 4, 6, 8)
    y, x = torch.meshgrid(torch.arange(R, dtype=torch.float64), torch.arange(R, dtype=torch.float64), indexing="ij")
    smooth = torch.sin(2 * torch.pi * x / R).expand(3, R, R)[None]          # one cycle: nothing above any band
    edge = (x > 12).double().expand(3, R, R)[None]                          # a hard edge off the cell grid
    noise = torch.rand(1, 3, R, R, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    lk = image_leakage(torch.cat([smooth, edge, noise]), patch_nums, R)
    assert lk.shape == (3, len(patch_nums) - 1)
    assert float(lk[0].max()) < 1e-20
    assert float(lk[1].mean()) > 1e-4 and float(lk[2].mean()) > 1e-4
    assert bool((lk >= 0).all())


def test_alias_audit_command(finished, drawn, tmp_path, cli):
    tok = finished / "tokenizers" / "disk" / "seed-0" / "run"
    run = finished / "cells" / "fvar" / "seed-0" / "run"
    shards = finished / "tokenizers" / "disk" / "seed-0" / "shards-test"
    out = tmp_path / "audit.json"
    r = cli("experiment", "alias-audit", "--tokenizer", str(tok), "--data", str(drawn / "test"), "--max-images", "8",
            "--run", str(run), "--tokens", str(shards), "--json", str(out))
    assert r.code == 0, r.err
    assert "alias codebook: perplexity" in r.out and "teacher_shuffled" in r.out
    doc = json.loads(out.read_text())
    scales = doc["tokenizer"]["scales"]
    assert len(scales) == 6 and doc["tokenizer"]["images"] == 8
    # The last scale is the sharp image itself: no residual between the views, in latent or image space.
    assert scales[-1]["alias_ms"] == 0.0 and scales[-1]["image_alias_to_view"] == 0.0
    assert scales[0]["alias_ms"] > 0.0
    assert doc["tokenizer"]["alias_codes"]["size"] == 32
    assert len(doc["cross_entropy"]["teacher_shuffled"]["per_scale"]) == 6


def test_alias_audit_needs_pairs(cli, tmp_path):
    r = cli("experiment", "alias-audit", "--tokenizer", str(tmp_path))
    assert r.code == 2 and "--tokenizer and --data go together" in r.err
    r = cli("experiment", "alias-audit")
    assert r.code == 2 and "nothing to audit" in r.err


def test_training_forward_logs_the_alias_ratio_the_audit_measures():
    """VQOutput.alias_ratio (what train-tokenizer logs) = Σ_k ms(a_k) / Σ_k ms(r_k), the audit's
    per-scale energies summed."""
    _, q, f, zs = _quantizer_and_focus_latents()
    out = q(f, zs)
    e = q.encode_focus(f, zs, with_energy=True).energy
    want = sum(float(k["alias"].mean()) for k in e) / sum(float(k["structure"].mean()) for k in e)
    assert float(out.alias_ratio) == pytest.approx(want, rel=1e-5)
    assert float(out.alias_energy) == pytest.approx(sum(float(k["alias"].mean()) for k in e) / len(e), rel=1e-5)
