"""Shared test helpers: run the CLI in-process and capture its one-line errors."""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

import pytest

from fvar_cli.app import build_app, run

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / "data"


class CliResult:
    def __init__(self, code: int, out: str, err: str):
        self.code, self.out, self.err = code, out, err


@pytest.fixture
def cli(capsys):
    """cli('presets', 'list') → CliResult(exit code, stdout, stderr), run in this process."""
    def _run(*argv: str) -> CliResult:
        code = run(build_app(), list(argv))
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)
    return _run


def png_claiming_size(path: Path, width: int, height: int) -> Path:
    """A tiny PNG file whose header claims width × height (a decompression bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="session", autouse=True)
def every_checkpoint_has_a_model_card(tmp_path_factory):
    """After the session: every fvar checkpoint the suite wrote carries a README.md whose Hub YAML
    header parses (library_name fvar). A failure here is reported as an error of the last test."""
    yield
    import json

    from fvar_core.modelcard import read_card_header

    base = tmp_path_factory.getbasetemp()
    bad, seen = [], 0
    for cfg in base.rglob("config.json"):
        try:
            fmt = json.loads(cfg.read_text()).get("format")
        except (OSError, ValueError, AttributeError):
            continue
        if fmt != "fvar-checkpoint" or cfg.parent.name.startswith("."):
            continue
        seen += 1
        card = cfg.parent / "README.md"
        try:
            if read_card_header(card).get("library_name") != "fvar":
                bad.append(f"{card}: library_name is not fvar")
        except (OSError, ValueError) as e:
            bad.append(str(e))
    assert not bad, f"{len(bad)} of {seen} checkpoints without a parseable model card:\n" + "\n".join(bad[:10])
