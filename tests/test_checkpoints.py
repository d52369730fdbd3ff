"""The fvar checkpoint format (docs/design.md §10): round trips, atomic saves, official .pth reading, and the
one-line errors a user sees for every way a checkpoint can be wrong."""
from __future__ import annotations

import errno
import json
import os
import re
from pathlib import Path

import pytest
import torch

from fvar_core import checkpoints as ck
from fvar_core.checkpoints import Checkpoint, load_checkpoint, save_checkpoint
from fvar_core.models.loading import build_tokenizer
from fvar_core.errors import UserError
from fvar_core.models.official import (default_var_preset, detect_official_kind, official_tokenizer_overrides,
                                official_var_overrides, read_official_pth)
from fvar_core.presets import load_preset
from fvar_core.models.tokenizer import Tokenizer
from fvar_core.models.transformer import VAR


class Opaque:
    """A custom class: pickling an instance puts a GLOBAL into the file that weights_only refuses."""

    def __init__(self):
        self.payload = [1, 2, 3]


@pytest.fixture(scope="module")
def tiny():
    """tiny-32's tokenizer with random weights: (preset, state dict)."""
    preset = load_preset("tiny-32")
    torch.manual_seed(0)
    tok = Tokenizer(preset.tokenizer, preset.patch_nums)
    with torch.no_grad():
        for v in tok.state_dict().values():
            v.copy_(torch.randn_like(v))
    return preset, {k: v.clone() for k, v in tok.state_dict().items()}


def _assert_same(a: dict, b: dict, ordered: bool = False) -> None:
    """Same keys (in the same order if asked: safetensors stores keys sorted), dtypes, shapes, values."""
    assert list(a) == list(b) if ordered else sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k


def _entries(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


# ---------------------------------------------------------------------------------- round trip
def test_save_load_round_trip_is_bit_identical(tmp_path, tiny):
    preset, sd = tiny
    out = save_checkpoint(tmp_path / "tok", kind="tokenizer", preset=preset, state_dict=sd,
                          provenance={"step": 7, "source": {"file": "x.pth", "sha256": "0" * 64}})
    assert out == tmp_path / "tok" and _entries(out) == ["README.md", "config.json", "model.safetensors"]
    c = load_checkpoint(out, expect_kind="tokenizer")
    assert isinstance(c, Checkpoint) and c.kind == "tokenizer" and c.path == out
    assert c.preset == preset
    _assert_same(sd, c.state_dict)
    assert c.provenance["step"] == 7 and c.provenance["source"]["file"] == "x.pth"
    assert c.provenance["fvar_version"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", c.provenance["created"])
    config = json.loads((out / "config.json").read_text())
    assert config["format"] == "fvar-checkpoint" and config["format_version"] == 1
    assert config["preset"] == preset.model_dump(mode="json")


def test_load_accepts_the_directory_or_either_file(tmp_path, tiny):
    preset, sd = tiny
    out = save_checkpoint(tmp_path / "tok", kind="tokenizer", preset=preset, state_dict=sd)
    for p in (out, out / "config.json", out / "model.safetensors", str(out)):
        assert load_checkpoint(p).path == out


def test_dtypes_views_and_shared_storage_survive(tmp_path, tiny):
    preset, _ = tiny
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    sd = {"a": base, "a_t": base.t(), "same": base, "row": base[1], "bf16": torch.randn(5).bfloat16(),
          "i64": torch.arange(4), "flag": torch.tensor([True, False]), "empty": torch.zeros(0, 3)}
    c = load_checkpoint(save_checkpoint(tmp_path / "c", kind="var", preset=preset, state_dict=sd))
    _assert_same({k: v.contiguous() for k, v in sd.items()}, c.state_dict)


def test_training_state_is_saved_with_the_weights(tmp_path, tiny):
    preset, sd = tiny
    state = {"step": 12, "optimizer": {"state": {0: {"exp_avg": torch.ones(3)}}, "param_groups": [{"lr": 1e-4}]},
             "rng": torch.random.get_rng_state()}
    out = save_checkpoint(tmp_path / "c", kind="tokenizer", preset=preset, state_dict=sd, training_state=state)
    back = ck.load_training_state(out)
    assert back["step"] == 12 and torch.equal(back["optimizer"]["state"][0]["exp_avg"], torch.ones(3))
    assert torch.equal(back["rng"], state["rng"])
    # a later save without training state replaces the whole directory: no stale resume state
    save_checkpoint(out, kind="tokenizer", preset=preset, state_dict=sd)
    assert ck.load_training_state(out) is None


# ---------------------------------------------------------------------------------- atomicity
def test_save_replaces_an_existing_checkpoint_and_leaves_nothing_beside_it(tmp_path, tiny):
    preset, sd = tiny
    save_checkpoint(tmp_path / "c", kind="tokenizer", preset=preset, state_dict=sd)
    sd2 = {k: v + 1 if v.is_floating_point() else v for k, v in sd.items()}
    save_checkpoint(tmp_path / "c", kind="tokenizer", preset=preset, state_dict=sd2)
    _assert_same(sd2, load_checkpoint(tmp_path / "c").state_dict)
    assert _entries(tmp_path) == ["c"]


@pytest.mark.parametrize("failure", ["enospc", "bug"])
def test_a_failed_save_leaves_the_old_checkpoint_intact_and_no_temp_dirs(tmp_path, tiny, monkeypatch, failure):
    preset, sd = tiny
    target = save_checkpoint(tmp_path / "c", kind="tokenizer", preset=preset, state_dict=sd,
                             provenance={"step": 1})
    real_save = ck.save_file

    def half_write(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\x00" * 100)  # half a file, then the disk fills up
        if failure == "enospc":
            raise OSError(errno.ENOSPC, "No space left on device", filename)
        raise RuntimeError("bug in the writer")

    monkeypatch.setattr(ck, "save_file", half_write)
    new = {k: torch.zeros_like(v) for k, v in sd.items()}
    if failure == "enospc":
        with pytest.raises(UserError, match="no space left on device; nothing was overwritten"):
            save_checkpoint(target, kind="tokenizer", preset=preset, state_dict=new, provenance={"step": 2})
    else:
        with pytest.raises(RuntimeError, match="bug in the writer"):
            save_checkpoint(target, kind="tokenizer", preset=preset, state_dict=new, provenance={"step": 2})
    monkeypatch.setattr(ck, "save_file", real_save)
    c = load_checkpoint(target)
    _assert_same(sd, c.state_dict)
    assert c.provenance["step"] == 1
    assert _entries(tmp_path) == ["c"]


def test_a_failed_final_rename_puts_the_old_checkpoint_back(tmp_path, tiny, monkeypatch):
    preset, sd = tiny
    target = save_checkpoint(tmp_path / "c", kind="tokenizer", preset=preset, state_dict=sd)
    real_replace = os.replace

    def replace(src, dst):
        if Path(src).name.startswith(".c.tmp-"):
            raise OSError(errno.EIO, "I/O error")
        return real_replace(src, dst)

    monkeypatch.setattr(ck.os, "replace", replace)
    with pytest.raises(UserError, match=r"cannot write checkpoint .*: I/O error; nothing was overwritten"):
        save_checkpoint(target, kind="tokenizer", preset=preset, state_dict={k: v * 0 for k, v in sd.items()})
    monkeypatch.undo()
    _assert_same(sd, load_checkpoint(target).state_dict)
    assert _entries(tmp_path) == ["c"]


def test_save_refuses_to_replace_what_is_not_a_checkpoint(tmp_path, tiny):
    preset, sd = tiny
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="is not an fvar checkpoint; refusing"):
        save_checkpoint(run, kind="tokenizer", preset=preset, state_dict=sd)
    f = tmp_path / "file"
    f.write_text("keep me")
    with pytest.raises(UserError, match="is not a checkpoint directory"):
        save_checkpoint(f, kind="tokenizer", preset=preset, state_dict=sd)
    assert (run / "notes.txt").read_text() == "keep me" and f.read_text() == "keep me"
    assert _entries(tmp_path) == ["file", "run"]
    empty = tmp_path / "empty"
    empty.mkdir()
    save_checkpoint(empty, kind="tokenizer", preset=preset, state_dict=sd)  # an empty folder is fine
    assert load_checkpoint(empty).kind == "tokenizer"


# -------------------------------------------------------------------------------- load errors
@pytest.fixture
def saved(tmp_path, tiny) -> Path:
    preset, sd = tiny
    return save_checkpoint(tmp_path / "ckpt", kind="var", preset=preset, state_dict={"w": torch.ones(2)})


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def _edit_config(path: Path, **changes) -> None:
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def test_missing_path(tmp_path):
    with pytest.raises(UserError) as e:
        load_checkpoint(tmp_path / "nope")
    assert _one_line(e) == f"no checkpoint at {tmp_path / 'nope'}"


def test_interrupted_save_is_pointed_at(tmp_path, saved):
    os.replace(saved, tmp_path / ".ckpt.old-abc123")
    with pytest.raises(UserError, match=r"interrupted save left the previous checkpoint at .*\.ckpt\.old-abc123"):
        load_checkpoint(saved)


def test_config_without_weights(saved):
    (saved / "model.safetensors").unlink()
    with pytest.raises(UserError) as e:
        load_checkpoint(saved)
    assert _one_line(e) == f"{saved} has config.json but no model.safetensors"


def test_directory_without_config(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(UserError, match="has no config.json: not an fvar checkpoint"):
        load_checkpoint(tmp_path / "d")


def test_a_pth_file_is_not_a_checkpoint(tmp_path):
    f = tmp_path / "vae.pth"
    torch.save({"w": torch.ones(1)}, f)
    with pytest.raises(UserError, match="not an fvar checkpoint.*fvar convert import"):
        load_checkpoint(f)


def test_corrupt_json(saved):
    (saved / "config.json").write_text('{"format": "fvar-checkpoint", ')
    with pytest.raises(UserError) as e:
        load_checkpoint(saved)
    assert "config.json is corrupt: not valid JSON (line 1" in _one_line(e)


def test_corrupt_safetensors(saved):
    (saved / "model.safetensors").write_bytes(os.urandom(300))
    with pytest.raises(UserError) as e:
        load_checkpoint(saved)
    assert "model.safetensors is unreadable or corrupt" in _one_line(e)


def test_truncated_safetensors(saved):
    data = (saved / "model.safetensors").read_bytes()
    (saved / "model.safetensors").write_bytes(data[: len(data) - 3])
    with pytest.raises(UserError, match="unreadable or corrupt"):
        load_checkpoint(saved)


def test_wrong_format(saved):
    _edit_config(saved, format="diffusers")
    with pytest.raises(UserError, match="is not an fvar checkpoint config \\(format 'diffusers'"):
        load_checkpoint(saved)


def test_newer_format_version(saved):
    _edit_config(saved, format_version=2)
    with pytest.raises(UserError) as e:
        load_checkpoint(saved)
    assert _one_line(e) == (f"{saved} was written by a newer fvar (checkpoint format 2; this fvar reads up to 1): "
                            "upgrade fvar")


def test_kind_mismatch(saved):
    with pytest.raises(UserError) as e:
        load_checkpoint(saved, expect_kind="tokenizer")
    assert _one_line(e) == f"{saved} is a var checkpoint, expected a tokenizer"


def test_unknown_kind(saved):
    _edit_config(saved, kind="lora")
    with pytest.raises(UserError, match="unknown checkpoint kind 'lora'"):
        load_checkpoint(saved)


def test_invalid_preset(saved):
    cfg = json.loads((saved / "config.json").read_text())
    cfg["preset"]["resolution"] = 100
    (saved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError) as e:
        load_checkpoint(saved)
    assert re.match(rf"checkpoint {re.escape(str(saved))} preset: resolution \(100\) must equal", _one_line(e))
    cfg["preset"]["tokenizer"]["colour"] = "red"
    (saved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="tokenizer.colour: unknown key"):
        load_checkpoint(saved)


# ------------------------------------------------------------------------------ build_tokenizer
def test_build_tokenizer_loads_the_weights(tmp_path, tiny):
    preset, sd = tiny
    tok = build_tokenizer(load_checkpoint(save_checkpoint(tmp_path / "c", kind="tokenizer", preset=preset,
                                                          state_dict=sd)))
    _assert_same(sd, tok.state_dict())


def test_build_tokenizer_names_the_first_mismatched_key_and_both_shapes(tmp_path, tiny):
    preset, sd = tiny
    other = load_preset("tiny-32", ["tokenizer.z_channels=16"])
    c = load_checkpoint(save_checkpoint(tmp_path / "c", kind="tokenizer", preset=other, state_dict=sd))
    with pytest.raises(UserError) as e:
        build_tokenizer(c)
    msg = _one_line(e)
    m = re.search(r"does not fit its model: (\S+) has shape \(([\d, ]+)\) in the checkpoint, \(([\d, ]+)\) in the model",
                  msg)
    assert m, msg
    key = m.group(1)
    assert key == "encoder.conv_out.weight"  # the first z-sized tensor in registration order
    assert m.group(2) == ", ".join(map(str, sd[key].shape))
    assert m.group(3).startswith("16, ")


def test_build_tokenizer_reports_missing_and_unexpected_keys(tmp_path, tiny):
    preset, sd = tiny
    sd_missing = {k: v for k, v in sd.items() if k != "quant_conv.bias"}
    c = load_checkpoint(save_checkpoint(tmp_path / "a", kind="tokenizer", preset=preset, state_dict=sd_missing))
    with pytest.raises(UserError, match="missing key quant_conv.bias"):
        build_tokenizer(c)
    c = load_checkpoint(save_checkpoint(tmp_path / "b", kind="tokenizer", preset=preset,
                                        state_dict={**sd, "extra.w": torch.ones(2)}))
    with pytest.raises(UserError, match=r"unexpected key extra.w \(shape \(2,\)\)"):
        build_tokenizer(c)


def test_build_tokenizer_refuses_another_kind(tmp_path, tiny):
    preset, sd = tiny
    c = load_checkpoint(save_checkpoint(tmp_path / "v", kind="var", preset=preset, state_dict=sd))
    with pytest.raises(UserError, match="is a var checkpoint, expected a tokenizer"):
        build_tokenizer(c)


# ------------------------------------------------------------------------------ official .pth
def test_read_official_pth_plain_legacy_and_wrapped(tmp_path):
    sd = {"encoder.conv_in.weight": torch.randn(4, 3, 3, 3), "head.bias": torch.randn(3)}
    torch.save(sd, tmp_path / "plain.pth")
    torch.save(sd, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    torch.save({"model": sd, "epoch": 3, "note": "x"}, tmp_path / "wrapped.pth")
    torch.save({"module." + k: v for k, v in sd.items()}, tmp_path / "ddp.pth")
    for name in ("plain", "legacy", "wrapped", "ddp"):
        _assert_same(sd, read_official_pth(tmp_path / f"{name}.pth"), ordered=True)


def test_read_official_pth_refuses_ambiguous_or_non_state_dicts(tmp_path):
    sd = {"w": torch.ones(2)}
    torch.save({"model": sd, "ema": sd}, tmp_path / "two.pth")
    with pytest.raises(UserError, match="holds several state dicts \\(model, ema\\)"):
        read_official_pth(tmp_path / "two.pth")
    torch.save(torch.ones(3), tmp_path / "tensor.pth")
    with pytest.raises(UserError, match="holds a Tensor, not a state dict"):
        read_official_pth(tmp_path / "tensor.pth")
    torch.save({"epoch": 1}, tmp_path / "meta.pth")
    with pytest.raises(UserError, match="holds no state dict"):
        read_official_pth(tmp_path / "meta.pth")


def test_read_official_pth_refuses_pickled_objects(tmp_path):
    f = tmp_path / "evil.pth"
    torch.save({"w": torch.ones(2), "extra": Opaque()}, f)
    with pytest.raises(UserError) as e:
        read_official_pth(f)
    msg = _one_line(e)
    assert msg.startswith(f"refused: {f} contains pickled Python objects")
    assert "Opaque" in msg and msg.endswith("not only tensors; fvar loads .pth files with weights_only=True")


@pytest.mark.parametrize("content", [os.urandom(2000), b"", b"PK\x03\x04" + os.urandom(100)],
                         ids=["garbage", "empty", "broken-zip"])
def test_read_official_pth_refuses_garbage(tmp_path, content):
    f = tmp_path / "x.pth"
    f.write_bytes(content)
    with pytest.raises(UserError) as e:
        read_official_pth(f)
    assert "is not a readable PyTorch checkpoint" in _one_line(e)


def test_read_official_pth_missing_file(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        read_official_pth(tmp_path / "nope.pth")


def test_detect_official_kind():
    assert detect_official_kind({"encoder.conv_in.weight": torch.ones(1), "quantize.embedding.weight": torch.ones(1)}) \
        == "tokenizer"
    assert detect_official_kind({"blocks.0.attn.q_bias": torch.ones(1), "head.weight": torch.ones(1)}) == "var"
    with pytest.raises(UserError, match="not an official VAR or VQ-VAE state dict.*first keys: fc.weight"):
        detect_official_kind({"fc.weight": torch.ones(1)})
    with pytest.raises(UserError, match="mixes VQ-VAE keys"):
        detect_official_kind({"encoder.x": torch.ones(1), "blocks.0.x": torch.ones(1)})


def test_official_tokenizer_overrides_read_the_released_vae_architecture():
    # vae_ch160v4096z32.pth's shapes, on the meta device (no memory)
    p = load_preset("var-d16-256")
    with torch.device("meta"):
        sd = Tokenizer(p.tokenizer, p.patch_nums).official_state_dict()
    assert len(sd) == 324
    assert official_tokenizer_overrides(sd) == [
        "tokenizer.ch=160", "tokenizer.vocab_size=4096", "tokenizer.z_channels=32", "tokenizer.alias_vocab_size=0",
        "tokenizer.ch_mult=[1, 1, 2, 2, 4]", "tokenizer.num_res_blocks=2", "tokenizer.share_quant_resi=4"]
    # applied to another preset they give back the released architecture
    assert load_preset("tiny-64", [*official_tokenizer_overrides(sd), "teacher.enabled=false",
                                   "resolution=256", "patch_nums=[1, 2, 4, 16]"]).tokenizer == p.tokenizer


def test_official_tokenizer_overrides_name_what_is_missing_or_inconsistent():
    with pytest.raises(UserError, match="not an official VQ-VAE state dict: missing encoder.conv_in.weight"):
        official_tokenizer_overrides({"quantize.embedding.weight": torch.ones(8, 4)})
    with pytest.raises(UserError, match="quant_conv.weight \\(8, 8, 3, 3\\) does not match the codebook's 4 channels"):
        official_tokenizer_overrides({"encoder.conv_in.weight": torch.ones(32, 3, 3, 3),
                                      "quantize.embedding.weight": torch.ones(16, 4),
                                      "quant_conv.weight": torch.ones(8, 8, 3, 3)})


@pytest.mark.parametrize("name,shared", [("var-d16-256", False), ("var-d36-512", True)])
def test_official_var_overrides_read_the_released_architectures(name, shared):
    p = load_preset(name)
    with torch.device("meta"):
        sd = VAR(p.model, p.patch_nums, p.tokenizer.vocab_size, p.tokenizer.z_channels).official_state_dict()
    got = load_preset(name, official_var_overrides(sd))
    assert got.model == p.model and got.model.shared_aln is shared
    assert default_var_preset(sd) == name


def test_every_checkpoint_carries_a_model_card_that_names_what_it_is(tmp_path):
    from fvar_core.modelcard import read_card_header

    preset = load_preset("tiny-64")
    prov = {"step": 12, "data_identity": {"source": "images", "path": "/data/fm", "fingerprint": "ab" * 32},
            "metrics": {"loss": 3.25, "acc": 0.5, "step": 12, "img_per_s": 9.0, "usage": [1, 2]}}
    d = save_checkpoint(tmp_path / "v", kind="var", preset=preset, state_dict={"w": torch.ones(2)},
                        provenance=prov, classes=[f"c{i}" for i in range(30)])
    head = read_card_header(d / "README.md")
    assert head["library_name"] == "fvar" and head["license"] == "mit" and "image-generation" in head["tags"]
    text = (d / "README.md").read_text()
    assert "# tiny-64 (var)" in text and "| step | 12 |" in text and "/data/fm" in text
    assert "c0, c1" in text and "(30 in all)" in text and "| loss | 3.25 |" in text
    assert f"top-k {preset.sample.top_k}," in text and "tian2024var" in text and "li2025fvar" in text
    (d / "README.md").write_text("my own notes\n")  # documentation: editing it breaks nothing
    assert load_checkpoint(d).provenance["step"] == 12
    with pytest.raises(ValueError, match="no YAML header"):
        read_card_header(d / "README.md")
    (d / "README.md").write_text(text)  # the suite checks every checkpoint's card at the end
    t = save_checkpoint(tmp_path / "t", kind="tokenizer", preset=preset, state_dict={"w": torch.ones(2)})
    assert "vq-vae" in read_card_header(t / "README.md")["tags"]
