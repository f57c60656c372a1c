"""The llama.cpp library, process-wide: its start, its log, and the count of loaded engines."""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from collections import deque

import llama_cpp as lc

log = logging.getLogger("lmkernel.llamacpp")

_local = threading.local()  # the last error lines llama.cpp logged on this thread


@lc.llama_log_callback
def _log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    """llama.cpp's log, to the ``lmkernel.llamacpp`` logger (debug); errors also kept for the next exception."""
    line = text.decode("utf-8", "replace").rstrip()
    if level == 4 and line:  # ggml_log_level: 1 debug, 2 info, 3 warn, 4 error, 5 continued
        errors = getattr(_local, "errors", None)
        if errors is None:
            errors = _local.errors = deque(maxlen=3)
        errors.append(line)
    if line:
        log.debug("%s", line)


_started = False
_start_lock = threading.Lock()
_loaded = 0  # engines not yet closed, in this process


def note_load() -> None:
    """Count a loaded engine; warn when an OpenMP build of llama.cpp gets a second one (see docs/llamacpp.md)."""
    global _loaded
    with _start_lock:
        _loaded += 1
        if _loaded == 2 and b"OPENMP = 1" in lc.llama_print_system_info():
            log.warning(
                "llama.cpp was built with OpenMP: with two models loaded, each runs about 2.7x slower (libgomp "
                "throttles its threads once they outnumber the CPUs). Rebuild it without: CMAKE_ARGS=-DGGML_OPENMP=OFF "
                "pip install --force-reinstall --no-cache-dir llama-cpp-python (docs/llamacpp.md)"
            )


def note_close() -> None:
    global _loaded
    with _start_lock:
        _loaded -= 1


def start_llama() -> None:
    global _started
    with _start_lock:
        if not _started:
            lc.llama_log_set(_log, ctypes.c_void_p(0))
            lc.llama_backend_init()
            _started = True


def last_errors() -> str:
    errors = getattr(_local, "errors", None)
    if not errors:
        return ""
    text = "; ".join(errors)
    errors.clear()
    return f": {text}"


def usable_cpus() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
