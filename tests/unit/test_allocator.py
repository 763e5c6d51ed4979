"""The allocator warm-up of zbus.sockets (see ALLOCATOR_WARMUP): after a process starts its zbus
context, glibc no longer hands freed heap back to the kernel at 128 KiB, so messages of tens of KiB
allocated and freed one after another stop faulting their pages in again every time.

Each case runs in a fresh interpreter (the allocator's state is per process): it frees ~1 MiB at
the top of the heap and reports whether the program break moved down (a trim). Without the
warm-up it does, and with glibc's own setting in the environment: those control cases are what
show the check can fail."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                       reason="the warm-up acts on glibc's allocator only"),
]

_PROBE = """
import ctypes, sys
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
libc.sbrk.restype = ctypes.c_void_p
libc.sbrk.argtypes = [ctypes.c_ssize_t]
if sys.argv[1] == "zbus":
    import zbus.sockets
    zbus.sockets.context()
trims = 0
for _ in range(20):
    # Under 128 KiB each: from the heap. The first may fill holes the imports left; the later ones
    # extend the heap at its top, and freed (last first) they give back far more than 128 KiB there.
    blocks = [libc.malloc(120_000) for _ in range(8)]
    top = libc.sbrk(0)
    for block in reversed(blocks):
        libc.free(block)
    trims += libc.sbrk(0) < top
print(trims)
"""


def _trims(mode: str, env: dict[str, str] | None = None) -> int:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, timeout=30,
                         env={**{k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}, **(env or {})})
    assert out.returncode == 0, out.stderr
    return int(out.stdout.strip())


def test_plain_process_trims_its_heap() -> None:
    assert _trims("plain") > 0  # glibc's default: 200 KiB freed at the top goes back to the kernel


def test_zbus_context_keeps_freed_heap() -> None:
    assert _trims("zbus") == 0


def test_glibc_settings_in_the_environment_win() -> None:
    # docs/operations.md: glibc's own variable switches the adjustment off (here: back to the default)
    assert _trims("zbus", {"MALLOC_TRIM_THRESHOLD_": "131072"}) > 0
