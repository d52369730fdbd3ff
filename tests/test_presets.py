"""Presets: every file validates, inheritance and overrides work, broken ones fail in one line."""
from __future__ import annotations

import pytest
import yaml

from fvar_core.config import Preset
from fvar_core.errors import UserError
from fvar_core.presets import list_presets, load_preset, parse_override, preset_to_yaml, resolve_raw

DEPTHS = (12, 16, 20, 24, 30, 36)
RESOLUTIONS = (256, 512, 1024)
VAR_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
VAR_512 = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)


def test_all_eighteen_paper_presets_and_tiny_ones_are_listed():
    names = set(list_presets())
    expected = {f"d{d}-{r}" for d in DEPTHS for r in RESOLUTIONS}
    assert expected <= names
    assert {"tiny-32", "tiny-64"} <= names
    assert not any(n.startswith("_") for n in names), "bases must not be listed"


@pytest.mark.parametrize("name", list_presets())
def test_every_preset_file_validates(name):
    p = load_preset(name)
    assert isinstance(p, Preset) and p.name == name
    assert p.resolution == p.tokenizer.downsample * p.patch_nums[-1]
    assert p.model.width % p.model.num_heads == 0


@pytest.mark.parametrize("depth", DEPTHS)
@pytest.mark.parametrize("res", RESOLUTIONS)
def test_var_width_heads_droppath_mapping(depth, res):
    m = load_preset(f"d{depth}-{res}").model
    assert (m.width, m.num_heads) == (64 * depth, depth)
    assert m.drop_path == pytest.approx(0.1 * depth / 24, abs=1e-6)


def test_paper_values_at_256():
    p = load_preset("d16-256")
    assert p.patch_nums == VAR_256 and p.seq_len == 680
    assert (p.pyramid.kernel, p.pyramid.schedule, p.pyramid.rho_max) == ("disk", "cosine", 12.0)
    assert (p.pyramid.beta_start, p.pyramid.beta_end) == (1e-3, 1e-2)
    assert (p.tokenizer.vocab_size, p.tokenizer.alias_vocab_size) == (8192, 512)
    assert (p.teacher.xattn_blocks, p.teacher.lambda_feat, p.teacher.lambda_logit) == (2, 1.0, 0.5)
    assert (p.train.lr, p.train.batch_size, p.train.steps, p.tokenizer_train.steps) == (1e-4, 256, 400_000, 100_000)


def test_resolution_specific_schedules_and_radius_scaling():
    p512, p1024 = load_preset("d16-512"), load_preset("d16-1024")
    assert p512.patch_nums == VAR_512 and p512.seq_len == 2240
    assert p1024.patch_nums[-1] == 64 and p1024.resolution == 1024
    assert (p512.pyramid.rho_max, p1024.pyramid.rho_max) == (24.0, 48.0)


def test_vanilla_var_presets_match_the_official_release():
    p = load_preset("var-d16-256")
    assert (p.pyramid.kernel, p.tokenizer.vocab_size, p.tokenizer.alias_vocab_size) == ("area", 4096, 0)
    assert not p.teacher.enabled and p.train.batch_size == 768
    assert load_preset("var-d36-512").model.shared_aln


def test_extends_merges_sections_key_by_key():
    raw = resolve_raw("tiny-32")  # tiny-32 → tiny-64 → _fvar-256
    assert raw["name"] == "tiny-32"
    assert raw["tokenizer"]["ch_mult"] == [1, 2, 2]          # from tiny-32
    assert raw["tokenizer"]["vocab_size"] == 64               # from tiny-64
    assert raw["tokenizer"]["quant_resi"] == 0.5              # from the base


def test_set_overrides_are_validated_like_the_file():
    p = load_preset("d16-256", ["train.lr=2e-4", "pyramid.kernel=gaussian", "patch_nums=[1,2,4,8,16]"])
    assert p.train.lr == 2e-4 and p.pyramid.kernel == "gaussian" and p.patch_nums == (1, 2, 4, 8, 16)


def test_resolved_yaml_round_trips():
    p = load_preset("d20-512", ["teacher.xattn_blocks=1"])
    again = Preset.model_validate(yaml.safe_load(preset_to_yaml(p)))
    assert again == p


@pytest.mark.parametrize("overrides, field", [
    (["model.dropout_rate=0.1"], "model.dropout_rate: unknown key"),
    (["model.num_heads=7"], "num_heads (7) must divide width (1024)"),
    (["resolution=300"], "resolution (300) must equal"),
    (["train.lr=-1"], "train.lr:"),
    (["pyramid.kernel=airy"], "pyramid.kernel:"),
    (["patch_nums=[1,3,2,16]"], "patch_nums:"),
    (["tokenizer.ch=48"], "multiples of 32"),
    (["teacher.xattn_blocks=17"], "exceeds model.depth"),
])
def test_broken_preset_fails_with_one_line_naming_the_field(overrides, field):
    with pytest.raises(UserError) as e:
        load_preset("d16-256", overrides)
    msg = str(e.value)
    assert field in msg and "\n" not in msg


def test_broken_preset_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("extends: d16-256\nmodel:\n  depth: 16\n  widht: 1024\n")
    with pytest.raises(UserError, match=r"model\.widht: unknown key"):
        load_preset(str(bad))
    bad.write_text("extends: d16-256\nresolution: 512\n")
    with pytest.raises(UserError, match=r"resolution \(512\) must equal"):
        load_preset(str(bad))
    bad.write_text("model: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_preset(str(bad))


def test_extends_cycle_is_reported(tmp_path):
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(UserError, match="cycle"):
        load_preset(str(tmp_path / "a.yaml"))


def test_unknown_preset_lists_valid_names_and_suggests():
    with pytest.raises(UserError) as e:
        load_preset("d16-265")
    assert "did you mean d16-256" in str(e.value) and "tiny-64" in str(e.value)


@pytest.mark.parametrize("text", ["train.lr", "=3", "train..lr=1", "train.lr=[1,"])
def test_malformed_set_is_a_user_error(text):
    with pytest.raises(UserError, match="malformed --set"):
        parse_override(text)
