"""qvlm.allocator: glibc's malloc keeps freed memory for the next step; the CLI's QVLM_MALLOC switch."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import CONFIGS

from qvlm import allocator
from qvlm.cli import main

TINY = str(CONFIGS / "tiny.yaml")
GLIBC = allocator.libc() is not None and hasattr(allocator.libc(), "mallinfo2")

# In a fresh process: the bytes glibc holds in mmap'd blocks and free in its heap, before, while and
# after a 64 MiB tensor lives (mallinfo2's hblkhd and fordblks), with or without keep_freed_memory.
PROBE = """
import ctypes, json, sys
import torch
from qvlm import allocator

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]

lib = ctypes.CDLL(None)
lib.mallinfo2.restype = MallInfo2
kept = allocator.keep_freed_memory() if sys.argv[1] == "keep" else False
before = lib.mallinfo2()
x = torch.empty(16 * 2**20, dtype=torch.float32)  # 64 MiB
x.fill_(1.0)
alive = lib.mallinfo2()
del x
after = lib.mallinfo2()
print(json.dumps({"kept": kept, "mapped": alive.hblkhd - before.hblkhd, "free_after": after.fordblks,
                  "effect": allocator.in_effect()}))
"""


def probe(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not GLIBC, reason="glibc's mallopt/mallinfo2 only")
def test_kept_memory_comes_from_the_heap_and_stays_there_after_free():
    system, keep = probe("system"), probe("keep")
    mib = 2**20
    assert not system["kept"] and system["mapped"] >= 64 * mib  # glibc's default: a block of its own, unmapped on free
    assert system["effect"] == "system default"
    assert keep["kept"] and keep["effect"] == "keeps freed memory"
    assert keep["mapped"] < mib  # from the heap
    assert keep["free_after"] >= 64 * mib  # freed, but kept for the next allocation


def test_mode_from_env_defaults_to_keep_and_refuses_other_values():
    assert allocator.mode_from_env({}) == "keep"
    assert allocator.mode_from_env({"QVLM_MALLOC": " System "}) == "system"
    assert allocator.mode_from_env({"QVLM_MALLOC": ""}) == "keep"
    with pytest.raises(ValueError, match="QVLM_MALLOC must be one of keep, system, got 'jemalloc'"):
        allocator.mode_from_env({"QVLM_MALLOC": "jemalloc"})
    assert allocator.apply_from_env({"QVLM_MALLOC": "system"}) == "system"


def test_cli_applies_it_to_commands_but_serve_and_rejects_a_bad_setting(monkeypatch, capsys, tmp_path):
    calls = []
    monkeypatch.setattr(allocator, "keep_freed_memory", lambda: calls.append(1) or True)
    assert main(["config", TINY]) == 0
    assert calls == [1]
    assert main(["serve", "--model", str(tmp_path)]) == 2  # not a saved model; never reached the allocator
    assert calls == [1]
    monkeypatch.setenv("QVLM_MALLOC", "system")
    assert main(["config", TINY]) == 0
    assert calls == [1]
    monkeypatch.setenv("QVLM_MALLOC", "tcmalloc")
    capsys.readouterr()
    assert main(["config", TINY]) == 2
    assert "QVLM_MALLOC must be one of keep, system" in capsys.readouterr().err
