"""Versioned JSON documents that fvar writes (checkpoint configs, token-shard manifests, reference
descriptions), read with their format name, version checked; one-line errors."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Optional

from fvar_core.errors import UserError


def read_json_doc(path: Path, fmt: str, latest: int, *, what: str, name: str, version_key: str = "version",
                  subject: Optional[Path] = None, fix: str = "") -> Dict[str, Any]:
    """The mapping in `path`, whose "format" must be `fmt` and whose integer `version_key` must be
    1 … `latest`. `what` names the document ('a token-shard manifest'), `name` its format in the
    newer-version message, `subject` what was written (default: the file); `fix` is appended to
    the corrupt-file errors."""
    tail = f"; {fix}" if fix else ""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is corrupt: not valid JSON (line {e.lineno}: {e.msg}){tail}") from None
    except UnicodeDecodeError:
        raise UserError(f"{path} is corrupt: not UTF-8 text{tail}") from None
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None
    if not isinstance(data, dict) or data.get("format") != fmt:
        got = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise UserError(f"{path} is not {what} (format {got!r}, expected {fmt!r})")
    version = data.get(version_key)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise UserError(f"{path} is corrupt: {version_key} {version!r} is not a positive integer{tail}")
    if version > latest:
        raise UserError(f"{subject or path} was written by a newer fvar ({name} format {version}; this fvar reads "
                        f"up to {latest}): upgrade fvar")
    return data
