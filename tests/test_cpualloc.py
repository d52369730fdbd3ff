"""fvar_core.cpualloc: glibc is told to keep freed memory, once per process, unless FVAR_MALLOC=default."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

CODE = ("from fvar_core.cpualloc import keep_freed_memory as k; "
        "import torch; from fvar_core.sample.sampler import decode_images; print(k(), k())")


def _run(env_extra: dict) -> str:
    env = {**os.environ, **env_extra}
    return subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, env=env, check=True).stdout


@pytest.mark.skipif(not sys.platform.startswith("linux") or os.confstr("CS_GNU_LIBC_VERSION") is None,
                    reason="glibc only")
def test_glibc_keeps_freed_memory_unless_told_not_to():
    assert _run({"FVAR_MALLOC": ""}).split() == ["True", "True"]
    assert _run({"FVAR_MALLOC": "default"}).split() == ["False", "False"]
