"""Handing the memory of a swapped-out version back to the OS (glibc malloc).

Why (docs/results/service.md, "Memory over hot swaps"): a hot swap loads the new version
beside the old one, so when the old one is freed (ONNX Runtime's buffers, the FAISS index)
its memory sits in the middle of the C heap, where glibc keeps it: under traffic RSS grew
~25 MB a swap.  :func:`release_free_memory` (``malloc_trim(0)``) returns those free pages
once the old version is gone; :func:`limit_malloc_arenas` keeps glibc from spreading the
loads over one heap per worker thread, each keeping its own fragments.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
from typing import Any

log = logging.getLogger(__name__)


def _load_libc() -> Any:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


_LIBC = _load_libc()


#: glibc's mallopt parameter for the most malloc arenas (malloc.h: M_ARENA_MAX).
M_ARENA_MAX = -8
#: Arenas the service lets glibc create (bench/swap_memory.py: with glibc's default, up to
#: 8 per core, each worker thread's arena kept its own fragments of freed versions).
SERVICE_MALLOC_ARENAS = 2


def limit_malloc_arenas(arenas: int = SERVICE_MALLOC_ARENAS) -> bool:
    """``mallopt(M_ARENA_MAX, arenas)`` unless ``MALLOC_ARENA_MAX`` is set in the environment
    (the operator's choice wins); False where it does not apply (not glibc).  Call it before
    the worker threads start: arenas that exist already stay."""
    if _LIBC is None or "MALLOC_ARENA_MAX" in os.environ or not hasattr(_LIBC, "mallopt"):
        return False
    try:
        return bool(_LIBC.mallopt(M_ARENA_MAX, int(arenas)))
    except (OSError, AttributeError):
        return False


def release_free_memory() -> bool:
    """Return the C heap's free pages to the OS (glibc ``malloc_trim(0)``; a no-op returning
    False elsewhere).  Measured 8-17 ms with ~250 MB of heap; ctypes drops the GIL for it."""
    if _LIBC is None:
        return False
    try:
        _LIBC.malloc_trim(0)
    except (OSError, AttributeError) as exc:  # never fail a swap for this
        log.warning("malloc_trim failed: %s", exc)
        return False
    return True
