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
