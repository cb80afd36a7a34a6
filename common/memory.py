"""Giving memory back to the system after work that held much of it for a short while."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)


def _trim() -> object:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        return None


_MALLOC_TRIM = _trim()


def give_back() -> None:
    """Return to the system the free memory the C allocator keeps after a burst of many small
    objects (reading a whole fleet): freed, they stay in the process's heap, which glibc
    shrinks only from its top. A no-op where the C library has no ``malloc_trim``."""
    if callable(_MALLOC_TRIM):
        _MALLOC_TRIM(0)
