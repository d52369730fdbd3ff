"""Named presets: YAML files in `presets/` (installed as `fvar_presets`) → validated `Preset`.

A preset file may `extends:` another (by name, or by a path relative to the file); mappings merge
recursively, everything else replaces. `--set key.path=value` overrides apply after the merge and
before validation, so they are checked like the file itself. Files whose name starts with `_` are
bases: loadable, but not listed.
"""
from __future__ import annotations

import copy
import difflib
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Optional

import yaml
from pydantic import ValidationError

from fvar_core.config import Preset
from fvar_core.errors import UserError

_MAX_EXTENDS_DEPTH = 16


def preset_dir() -> Path:
    """The folder holding the built-in preset files."""
    return Path(str(resources.files("fvar_presets")))


def list_presets(include_bases: bool = False) -> list[str]:
    """Names of the built-in presets, sorted (bases starting with `_` only if asked)."""
    names = [p.stem for p in preset_dir().glob("*.yaml")]
    return sorted(n for n in names if include_bases or not n.startswith("_"))


def _locate(name_or_path: str, relative_to: Optional[Path] = None) -> Path:
    """A preset name or a YAML path → the file; unknown names list the valid ones."""
    candidates = []
    if relative_to is not None:
        candidates.append(relative_to / name_or_path)
    candidates.append(Path(name_or_path))
    for c in candidates:
        if c.suffix in (".yaml", ".yml") and c.is_file():
            return c
    builtin = preset_dir() / f"{name_or_path}.yaml"
    if builtin.is_file():
        return builtin
    known = list_presets()
    close = difflib.get_close_matches(name_or_path, known, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    raise UserError(f"unknown preset '{name_or_path}'{hint}; valid presets: {', '.join(known)}")


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise UserError(f"preset file {path}{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    except OSError as e:
        raise UserError(f"cannot read preset file {path}: {e.strerror or e}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"preset file {path}: the top level must be a mapping of fields")
    return data


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Mappings merge key by key; any other value in `over` replaces the one in `base`."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def resolve_raw(name_or_path: str) -> dict[str, Any]:
    """The merged (not yet validated) mapping of a preset, `extends:` chains followed."""
    chain: list[Path] = []
    path = _locate(name_or_path)
    layers = []
    while True:
        if path.resolve() in chain:
            raise UserError(f"preset '{name_or_path}': extends: cycle through {path.name}")
        if len(chain) >= _MAX_EXTENDS_DEPTH:
            raise UserError(f"preset '{name_or_path}': extends: chain deeper than {_MAX_EXTENDS_DEPTH}")
        chain.append(path.resolve())
        data = _read_yaml(path)
        parent = data.pop("extends", None)
        layers.append(data)
        if parent is None:
            break
        if not isinstance(parent, str):
            raise UserError(f"preset file {path}: extends: must be one preset name or path")
        path = _locate(parent, relative_to=path.parent)
    merged: dict[str, Any] = {}
    for layer in reversed(layers):
        merged = deep_merge(merged, layer)
    # A preset is named by its own file, never by the base it extends.
    merged["name"] = _locate(name_or_path).stem
    return merged


def parse_override(text: str) -> tuple[list[str], Any]:
    """'train.lr=2e-4' → (['train', 'lr'], 2e-4); the value is read as YAML (numbers, lists, bools)."""
    key, sep, value = text.partition("=")
    parts = key.strip().split(".")
    if not sep or not key.strip() or any(not p.strip() for p in parts):
        raise UserError(f"malformed --set '{text}': expected key.path=value, e.g. --set train.lr=2e-4")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        raise UserError(f"malformed --set '{text}': the value is not valid YAML") from None
    return [p.strip() for p in parts], parsed


def apply_overrides(raw: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply `--set` overrides to a raw preset mapping (a copy is returned)."""
    out = copy.deepcopy(raw)
    for text in overrides:
        path, value = parse_override(text)
        node = out
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise UserError(f"--set {text}: '{part}' is a value, not a section")
            node = child
        node[path[-1]] = value
    return out


def format_validation_error(where: str, err: ValidationError) -> str:
    """A pydantic error as one line that names the field."""
    errors = err.errors()
    first = errors[0]
    loc = ".".join(str(p) for p in first["loc"])
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    elif first["type"] == "missing":
        msg = "required field missing"
    elif "input" in first and first["type"] not in ("value_error", "assertion_error"):
        msg = f"{msg} (got {first['input']!r})"
    msg = msg.removeprefix("Value error, ")
    more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{where}: {loc + ': ' if loc else ''}{msg}{more}"


def validate(raw: dict[str, Any], where: str) -> Preset:
    try:
        return Preset.model_validate(raw)
    except ValidationError as e:
        raise UserError(format_validation_error(where, e)) from None


def override_preset(preset: Preset, overrides: Iterable[str], where: str) -> Preset:
    """An already-resolved preset (e.g. a checkpoint's) with `--set` overrides, validated again."""
    overrides = list(overrides)
    if not overrides:
        return preset
    return validate(apply_overrides(preset.model_dump(mode="json"), overrides), f"{where} with --set overrides")


def load_preset(name_or_path: str, overrides: Iterable[str] = ()) -> Preset:
    """Resolve, override and validate a preset; every failure is a one-line UserError."""
    overrides = list(overrides)
    raw = apply_overrides(resolve_raw(name_or_path), overrides)
    where = f"preset '{name_or_path}'" + (" with --set overrides" if overrides else "")
    return validate(raw, where)


class _Dumper(yaml.SafeDumper):
    """Sections as blocks, lists (patch numbers, betas) on one line: reads like the preset files."""


_Dumper.add_representer(
    list, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=True))


def preset_to_yaml(preset: Preset) -> str:
    """The fully resolved preset as YAML (what every run directory records)."""
    data = preset.model_dump(mode="json")
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=100)
