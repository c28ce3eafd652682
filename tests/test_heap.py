"""qwenvl_cli.heap: the CLI's malloc setting, each case in a fresh process (it changes the process)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# The bytes glibc holds in mmapped blocks (mallinfo2().hblkhd) across a 64 MiB tensor's life, printed after
# the setting's phrase.
PROBE = """
import ctypes, torch
from qwenvl_cli.heap import reuse_large_blocks

class Info(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
print(reuse_large_blocks())
before = libc.mallinfo2().hblkhd
big = torch.ones(16 << 20)  # 64 MiB, twice glibc's largest mmap threshold
print(libc.mallinfo2().hblkhd - before)
"""


def _probe(**env) -> list[str]:
    run = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120,
                         env={**os.environ, **env})
    assert run.returncode == 0, run.stderr
    return run.stdout.split("\n")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt is Linux's")
def test_large_tensors_come_from_the_heap_once_set_and_the_switch_leaves_malloc_alone():
    phrase, mapped, _ = _probe()
    assert phrase == "large tensors from a reused heap (mmap off)"
    assert int(mapped) == 0  # the 64 MiB block is in the heap, not a fresh mmap
    phrase, mapped, _ = _probe(QWENVL_HEAP="0")
    assert phrase == "malloc as configured (QWENVL_HEAP=0)"
    assert int(mapped) >= 64 << 20  # glibc's default: a block this large is mmapped
