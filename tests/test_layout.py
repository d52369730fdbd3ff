"""The package layout is the pipeline: a stage imports only from the infrastructure at the top of
`fvar_core` and from earlier stages, never from a later one (docs/code-map.md)."""
from __future__ import annotations

import ast
from pathlib import Path

import fvar_core

ROOT = Path(fvar_core.__file__).parent
# Pipeline order; the top-level modules (config, presets, checkpoints, ...) are rank 0.
STAGES = ("focus", "models", "data", "sample", "train", "eval", "pipelines")


def _rank(module: str) -> int:
    """fvar_core.<stage>.<name> → 1 + the stage's index; a top-level module → 0."""
    parts = module.split(".")
    return STAGES.index(parts[1]) + 1 if len(parts) > 2 and parts[1] in STAGES else 0


def _imports(path: Path) -> set[str]:
    """Every fvar_core module `path` imports (at any depth: function-local imports count too)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fvar_core"):
            assert node.level == 0, f"{path}: relative import (write fvar_core.… so a move cannot change its meaning)"
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                out.add(full if (ROOT / Path(*full.split(".")[1:])).with_suffix(".py").exists() else node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("fvar_core"))
    return out


def _modules():
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        yield "fvar_core." + ".".join(p for p in rel.parts if p != "__init__"), path


def test_no_stage_imports_a_later_one():
    upward = [f"{mod} ({_rank(mod)}) imports {dep} ({_rank(dep)})"
              for mod, path in _modules() for dep in _imports(path) if _rank(dep) > _rank(mod)]
    assert not upward, "\n".join(upward)


def test_every_module_lives_in_a_stage_or_is_infrastructure():
    top = sorted(p.stem for p in ROOT.glob("*.py") if p.stem != "__init__")
    stages = sorted(p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").exists())
    assert stages == sorted(STAGES)
    assert top == sorted(["atomic", "checkpoints", "checks", "config", "devices", "environment", "envvars", "errors", "hashing",
                          "interrupt", "jsondocs", "modelcard", "presets", "runlock", "runs", "bundle", "classnames",
                          "cpualloc"])
