"""What the code and docs cite resolves inside the repository: `docs/<page>.md §N` points at a
section of that page, and `fvar_core/…py:name` at a function or class defined there."""
from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CITE = re.compile(r"docs/([\w-]+\.md) ?§ ?(\d+(?:\.\d+)?)")
SYMBOL = re.compile(r"(fvar_core/[\w/]+\.py):([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)?)")


def _sources() -> list[Path]:
    return sorted([*ROOT.glob("fvar_core/**/*.py"), *ROOT.glob("fvar_cli/**/*.py"), *ROOT.glob("tests/*.py"),
                   *ROOT.glob("docs/*.md"), ROOT / "README.md", *ROOT.glob("benchmarks/*.md")])


def _sections(page: Path) -> set[str]:
    """Section numbers of a page's headings: '## 4. The focus pyramid' → '4', '### 1.3 …' → '1.3'."""
    return {m.group(1) for m in re.finditer(r"^#+ (\d+(?:\.\d+)?)\.? ", page.read_text(), re.M)}


def _defined(path: Path) -> set[str]:
    """Top-level functions and classes of a module, and Class.method for their methods."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        if isinstance(node, ast.ClassDef):
            names |= {f"{node.name}.{m.name}" for m in node.body if isinstance(m, ast.FunctionDef)}
    return names


def test_section_citations_resolve():
    cited = [(src, page, sec) for src in _sources() for page, sec in CITE.findall(src.read_text())]
    assert cited, "the code cites docs/design.md and docs/var-compat.md"
    bad = [f"{src.relative_to(ROOT)}: docs/{page} §{sec}" for src, page, sec in cited
           if not (ROOT / "docs" / page).is_file() or sec not in _sections(ROOT / "docs" / page)]
    assert not bad, "\n".join(bad)


def test_no_citation_points_outside_the_repository():
    outside = [f"{src.relative_to(ROOT)}: {m.group(0)}" for src in _sources()
               for m in re.finditer(r"\b(DESIGN|var-facts)(\.md)? ?§", src.read_text())]
    assert not outside, "\n".join(outside)


def test_code_map_symbols_exist():
    refs = [(src, f, name) for src in [*ROOT.glob("docs/*.md"), ROOT / "README.md"]
            for f, name in SYMBOL.findall(src.read_text())]
    assert len(refs) >= 20
    bad = [f"{src.name}: {f}:{name}" for src, f, name in refs
           if not (ROOT / f).is_file() or name not in _defined(ROOT / f)]
    assert not bad, "\n".join(bad)
