"""Keep Python's cyclic garbage collector away from what a service loaded at startup.

Importing torch, onnxruntime and FastAPI and loading a model leaves hundreds of thousands of
objects that live as long as the process. Each full collection walks all of them, tens of
milliseconds at a time and about once a second under load, with the event loop stopped
meanwhile: every request in flight waits for it, which shows as a p99 several times the p50.

:func:`freeze_startup_heap` moves the objects alive now into the permanent generation
(:func:`gc.freeze`), which collections never scan; objects made later are collected as
before. Call it once the service is loaded and warm, just before it starts serving: the
predictor's and the gateway's lifespans and the TorchServe handler's ``initialize`` do; the
Triton python models, which run apart from this package, make the same two calls themselves.
A hot-reloaded model's objects are not frozen; they are few next to the libraries'.

:func:`release_free_memory` is the other end of a process's heap: request bodies of megabytes
come from the C allocator, and once freed glibc keeps most of their pages for later instead of
returning them, so a burst of large uploads would leave the process that much larger for good.
It asks glibc to return every free page (``malloc_trim``); elsewhere it does nothing.
"""

from __future__ import annotations

import ctypes
import functools
import gc
import logging
import time
from collections.abc import Callable

logger = logging.getLogger(__name__)


def freeze_startup_heap() -> None:
    """Collect the startup garbage, then exempt every surviving object from future scans."""
    start = time.perf_counter()
    gc.collect()
    gc.freeze()
    logger.debug(
        "froze %d startup objects in %.0f ms",
        gc.get_freeze_count(),
        (time.perf_counter() - start) * 1000,
    )


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError):  # not glibc (musl, macOS): nothing to ask
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


def release_free_memory() -> None:
    """Return the C heap's free pages to the system (glibc's ``malloc_trim(0)``)."""
    trim = _malloc_trim()
    if trim is None:
        return
    start = time.perf_counter()
    trim(0)
    logger.debug("malloc_trim took %.1f ms", (time.perf_counter() - start) * 1000)
