"""Handing the memory of a swapped-out version back to the OS (glibc malloc).

Why (docs/results/service.md, "Memory over hot swaps"): a hot swap loads the new version
beside the old one, so when the old one is freed (ONNX Runtime's buffers, the FAISS index)
its memory sits in the middle of the C heap, where glibc keeps it: under traffic RSS grew
~25 MB a swap.  :func:`release_free_memory` (``malloc_trim(0)``) returns those free pages
once the old version is gone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
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
