"""Find backends through the entry-point group ``lmkernel.backends``.

Our own backends are registered the same way (in lmkernel's ``pyproject.toml``). The
environment variable ``LMKERNEL_BACKENDS`` (comma-separated names) limits which are loaded.
A plugin that fails to import, or whose entry point is not a :class:`Backend`, is reported
in :attr:`Discovery.broken` with the reason; it never stops the others.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points

from .contract import Availability, Backend

__all__ = ["ENTRY_POINT_GROUP", "BackendStatus", "Discovery", "check_availability", "discover"]

ENTRY_POINT_GROUP = "lmkernel.backends"
ENV_FILTER = "LMKERNEL_BACKENDS"
AVAILABILITY_TIMEOUT = 10.0

log = logging.getLogger("lmkernel.plugins")


@dataclass(frozen=True)
class BackendStatus:
    """One discovered backend: its object (``None`` if broken) and whether it can run here."""

    name: str
    source: str
    backend: Backend | None
    availability: Availability


@dataclass
class Discovery:
    """The result of scanning the entry points once."""

    statuses: list[BackendStatus] = field(default_factory=list)

    @property
    def available(self) -> list[Backend]:
        """Backends that can run here, highest priority first."""
        found = [s.backend for s in self.statuses if s.backend and s.availability.available]
        return sorted(found, key=lambda b: -b.priority)

    @property
    def broken(self) -> list[BackendStatus]:
        return [s for s in self.statuses if s.backend is None]

    def get(self, name: str) -> BackendStatus | None:
        return next((s for s in self.statuses if s.name == name), None)

    def recheck(self, name: str) -> BackendStatus | None:
        """Ask the backend ``name`` again whether it can run here (it was not when discovered: a
        configuration written since, such as ``LMKERNEL_REMOTE``), keeping the new answer."""
        status = self.get(name)
        if status is None or status.backend is None or status.availability.available:
            return status
        fresh = BackendStatus(status.name, status.source, status.backend, check_availability(status.backend))
        self.statuses[self.statuses.index(status)] = fresh
        return fresh


def _selected_names() -> set[str] | None:
    raw = os.environ.get(ENV_FILTER, "").strip()
    if not raw:
        return None
    return {name.strip() for name in raw.split(",") if name.strip()}


def _load(ep: EntryPoint) -> BackendStatus:
    source = f"{ep.value} ({ep.dist.name if ep.dist else 'unknown distribution'})"
    try:
        obj = ep.load()
    except Exception as exc:  # a plugin may fail in any way; report it, do not crash
        reason = f"plugin failed to import: {type(exc).__name__}: {exc}"
        log.warning("lmkernel backend %r: %s", ep.name, reason)
        return BackendStatus(ep.name, source, None, Availability(False, reason))
    if isinstance(obj, type) and issubclass(obj, Backend):
        obj = obj()
    if not isinstance(obj, Backend):
        reason = f"entry point {ep.value!r} is a {type(obj).__name__}, not an lmkernel Backend"
        return BackendStatus(ep.name, source, None, Availability(False, reason))
    return BackendStatus(obj.name, source, obj, check_availability(obj))


def check_availability(backend: Backend, timeout: float = AVAILABILITY_TIMEOUT) -> Availability:
    """Ask ``backend`` whether it can run here, bounded: a raising, hanging or malformed
    answer makes it unavailable, with the reason (it is that plugin's fault, not the kernel's)."""
    box: list = []

    def ask() -> None:
        try:
            box.append(backend.availability())
        except Exception as exc:
            box.append(exc)

    thread = threading.Thread(target=ask, name=f"lmkernel-availability-{backend.name}", daemon=True)
    thread.start()
    thread.join(timeout)
    if not box:
        return Availability(False, f"availability check did not return within {timeout:g} s")
    answer = box[0]
    if isinstance(answer, Exception):
        return Availability(False, f"availability check raised {type(answer).__name__}: {answer}")
    if not isinstance(answer, Availability):
        return Availability(False, f"availability() must return an Availability, got {answer!r:.80}")
    return answer


def discover(extra: list[Backend] | None = None) -> Discovery:
    """Load every registered backend (filtered by ``LMKERNEL_BACKENDS``), plus ``extra``."""
    selected = _selected_names()
    result = Discovery()
    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        if selected is not None and ep.name not in selected:
            continue
        if result.get(ep.name) is None:
            result.statuses.append(_load(ep))
    for backend in extra or []:
        if selected is None or backend.name in selected:
            result.statuses.append(
                BackendStatus(backend.name, "given in code", backend, check_availability(backend))
            )
    return result
