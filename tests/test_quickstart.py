"""`fvar quickstart`: every step's output is there, and a rerun resumes instead of starting over."""
from __future__ import annotations

import json

from fvar_core.checkpoints import load_checkpoint
from fvar_core.training import complete_checkpoints


def test_quickstart_runs_the_whole_pipeline_and_resumes(cli, tmp_path):
    out = tmp_path / "qs"
    args = ["quickstart", "--out", str(out), "--images-per-class", "2", "--tokenizer-steps", "2", "--steps", "2",
            "--samples-per-class", "1", "--device", "cpu"]
    r = cli(*args)
    assert r.code == 0, r.err
    assert [line[:3] for line in r.out.splitlines() if line[:1].isdigit()] == ["1/5", "2/5", "3/5", "4/5", "5/5"]
    assert sorted(p.parent.name for p in (out / "data").glob("*/*.png")) == ["shapes"] * 2 + ["strokes"] * 2
    assert [s for s, _ in complete_checkpoints(out / "tokenizer")] == [2]
    manifest = json.loads((out / "shards" / "manifest.json").read_text())
    assert manifest["alias_vocab_size"] == 16 and manifest["preset_config"]["pyramid"]["kernel"] == "disk"
    student = load_checkpoint(out / "distill" / "checkpoints" / "step-0000002", expect_kind="var")
    assert student.preset.model.num_classes == 2
    side = json.loads((out / "samples" / "samples.json").read_text())
    assert [e["class_name"] for e in side["images"]] == ["shapes", "strokes"] and (out / "samples" / "grid.png").is_file()

    r = cli(*args)  # finished steps are not redone
    assert r.code == 0, r.err
    assert "already has 2 of 2 steps" in (out / "tokenizer" / "log.txt").read_text()
    assert "already has 2 of 2 steps" in (out / "distill" / "log.txt").read_text()
