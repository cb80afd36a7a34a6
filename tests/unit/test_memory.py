"""Services map their large blocks on their own (common/memory.py): a large block freed goes
back to the system at once, where glibc's own threshold, raised by the first large block
freed, left the next ones in the heap between blocks still in use."""

from __future__ import annotations

import subprocess
import sys

# A large block freed (glibc then raises its threshold to that size), then a large block
# (a page of cells as JSON) with a small one made after it and kept (a record, a buffer);
# then how much the process's resident memory grew, in MB, once the large block is freed.
PROGRAM = """
import ctypes, sys
from common.memory import map_large_blocks
if sys.argv[1] == "mapped":
    assert map_large_blocks()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]

def resident():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024

libc.free(libc.malloc(16 << 20))
before = resident()
large = libc.malloc(12 << 20)
ctypes.memset(large, 1, 12 << 20)
kept = libc.malloc(1000)
libc.free(large)
print(resident() - before)
"""


def _growth(mode: str) -> float:
    out = subprocess.run(
        [sys.executable, "-c", PROGRAM, mode], capture_output=True, text=True, check=True
    )
    return float(out.stdout)


def test_a_large_block_freed_goes_back_to_the_system() -> None:
    # glibc's default: the freed 12 MB stay the process's, below the block kept.
    assert _growth("default") > 10
    assert _growth("mapped") < 2
