"""How long the kernel waits on plugin code before it gives up on it (wall-clock seconds).

Each limit comes from an environment variable, read when it is needed (a model's limits
when it is loaded), so a program or a test can set it before the work it bounds.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger("lmkernel.kernel")

DEFAULT_ENGINE_TIMEOUT = 300.0
DEFAULT_LOAD_TIMEOUT = 1800.0


def _env_seconds(name: str, default: float) -> float:
    raw = os.environ.get(name, "")
    try:
        value = float(raw) if raw else default
    except ValueError:
        log.warning("ignoring %s=%r: not a number of seconds", name, raw)
        return default
    return value if value > 0 else default


def engine_timeout() -> float:
    """Seconds one engine call (a step, a tokenize ...) may take: ``LMKERNEL_ENGINE_TIMEOUT``, default 300."""
    return _env_seconds("LMKERNEL_ENGINE_TIMEOUT", DEFAULT_ENGINE_TIMEOUT)


def load_timeout() -> float:
    """Seconds a backend's ``load`` may take: ``LMKERNEL_LOAD_TIMEOUT``, default 1800."""
    return _env_seconds("LMKERNEL_LOAD_TIMEOUT", DEFAULT_LOAD_TIMEOUT)



def catalog_timeout() -> float:
    """Seconds a scan of the model folders may take (it calls every plugin's ``describe``):
    ``LMKERNEL_CATALOG_TIMEOUT``, default 60."""
    return _env_seconds("LMKERNEL_CATALOG_TIMEOUT", 60.0)
