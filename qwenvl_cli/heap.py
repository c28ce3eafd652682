"""Large CPU tensors from a reused heap: a process setting the CLI makes before it loads a model.

glibc serves every allocation above 32 MiB (the most its mmap threshold can be) with a fresh mmap and
gives it back with munmap on free, so each such tensor is page-faulted in again, 4 KiB at a time, and the
kernel zeroes every page. The vision tower of a 1600x1146 photo makes dozens of 30-60 MiB temporaries a
block: a bfloat16 -> float32 copy of 61 MiB took 16 ms that way and 4.7 ms from a warm heap, and a
rotary embedding 73 ms against 30 (2 Xeon cores, benchmarks/RESULTS.md). With mmap off and the heap's top
kept, freed blocks are reused. Weights are not affected: safetensors maps the checkpoint itself.

Costs: memory freed after the peak stays with the process (a CLI run ends soon after), and the peak may
grow by fragmentation (measured in benchmarks/RESULTS.md). QWENVL_HEAP=0 leaves malloc as it was.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)
KEEP_BYTES = 1 << 30  # free memory at the heap's top beyond this goes back to the system


def reuse_large_blocks() -> str:
    """Turn glibc's mmap of large blocks off and keep up to KEEP_BYTES free at the heap's top. Returns a
    phrase for --verbose saying what was done (nothing off glibc, or with QWENVL_HEAP=0)."""
    if os.environ.get("QWENVL_HEAP", "1") == "0":
        return "malloc as configured (QWENVL_HEAP=0)"
    if not sys.platform.startswith("linux"):
        return "malloc as configured (not Linux)"
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return "malloc as configured (no glibc mallopt)"
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if mallopt(M_MMAP_MAX, 0) != 1 or mallopt(M_TRIM_THRESHOLD, KEEP_BYTES) != 1:
        return "malloc as configured (mallopt refused)"
    return "large tensors from a reused heap (mmap off)"
