"""Which models a network caller may load or unload on ``lmkernel serve``.

The operator decides, the network asks. A caller may use the models the operator named with
``--model`` (whatever is loaded, too), and any model of the server's catalog only with
``--any-model``. A key that looks like a filesystem path is refused before anything touches the
filesystem, with the same text whether or not such a folder exists; only the names of the
operator's models pass (one loaded from a folder outside the models folders is named by its
absolute path). A model the kernel does not hold yet is loaded from a reference the server
trusts (the path the operator's ``--model`` resolved to, or the catalog's own key), never from
the caller's text. New instances count against ``--max-models``, like every load. Operator
models are not unloaded over the network unless ``--allow-unload``.
"""

from __future__ import annotations

import itertools
import re
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from .. import messages as m

if TYPE_CHECKING:
    from .._kernel import Kernel

__all__ = ["ModelPolicy", "PolicyError", "looks_like_path"]

MAX_KEY = 512  # characters in a model key from the network
_DEFAULT = "<default model>"
_DRIVE = re.compile(r"^[A-Za-z]:")


class PolicyError(Exception):
    """A request the policy refuses: ``kind`` is the protocol's error kind."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind, self.message = kind, message

    def failed(self, request_id: int, model: str | None = None) -> m.Failed:
        return m.Failed(id=request_id, error=m.ErrorInfo(kind=self.kind, message=self.message, model=model))


def looks_like_path(key: str) -> bool:
    """Tell whether ``key`` reads as a filesystem path rather than a model key (no I/O)."""
    return (
        key.startswith(("/", "~", "."))
        or "\\" in key
        or ".." in key
        or "//" in key
        or _DRIVE.match(key) is not None
    )


def _shown(key: str) -> str:
    return repr(key if len(key) <= 80 else key[:77] + "...")


def check_key(key: str) -> None:
    """Refuse a key from the network that is a path, too long, or has control characters."""
    if len(key) > MAX_KEY:
        raise PolicyError("value", f"Model key of {len(key)} characters is over the limit of {MAX_KEY}")
    if not key or any(ord(c) < 32 or ord(c) == 127 for c in key):
        raise PolicyError("value", f"Model key {_shown(key)} is empty or has control characters")
    if looks_like_path(key):
        raise PolicyError("value", f"Model key {_shown(key)} looks like a filesystem path: lmkernel serve never "
                                   "loads a model by path for a network caller; use a model key")


@dataclass
class Admission:
    """A load the policy let through: send ``model`` to the kernel, then :meth:`release`."""

    model: str | None
    pending: str | None
    policy: ModelPolicy | None = None

    def release(self) -> None:
        """End the load's place in the pending count (idempotent)."""
        if self.policy is not None and self.pending is not None:
            self.policy._pending[self.pending] -= 1
            if self.policy._pending[self.pending] <= 0:
                del self.policy._pending[self.pending]
        self.policy = None


class ModelPolicy:
    """The rules for one server; shared by every connection, used on the server's trio loop."""

    def __init__(self, kernel: Kernel, *, any_model: bool, allow_unload: bool, max_models: int) -> None:
        self._kernel = kernel
        self.any_model = any_model
        self.allow_unload = allow_unload
        self.max_models = max_models
        self._operator: dict[str, str] = {}  # name the operator's model answers to -> its path (LlmInfo.path)
        self._operator_keys: list[str] = []  # the --model values, in order
        self._operator_instances: set[str] = set()
        self._pending: Counter[str] = Counter()  # loads under way that may add a model
        self._instances = itertools.count(1)

    def add_operator_model(self, key: str, info: m.LlmInstanceInfo) -> None:
        """Record a model the operator loaded with ``--model key``."""
        for name in (key, info.identifier, info.model_key):
            self._operator.setdefault(name, info.path)
        self._operator_keys.append(key)
        self._operator_instances.update((key, info.identifier, info.model_key, info.path))

    def served(self) -> list[str]:
        """The keys a caller may ask for: loaded identifiers, then the operator's keys of models not loaded.

        A loaded operator's model is listed once, by its identifier (``tiny``), not also by the
        key the operator gave (``publisher/Tiny``).
        """
        names = list(self._loaded())
        held = {self._operator[name] for name in names if name in self._operator}
        names += [k for k in self._operator_keys if k not in names and self._operator[k] not in held]
        return names

    def _loaded(self) -> list[str]:
        return list(self._kernel.load_summary()["models"])

    def _not_served(self, key: str) -> PolicyError:
        served = ", ".join(map(repr, self.served())) or "none"
        return PolicyError("model_not_found", f"Model {_shown(key)} is not served here (served: {served}); "
                                              "the operator names the models with --model, or allows any model "
                                              "of the server's catalog with --any-model")

    async def admit(self, model: str | None, new_instance: bool = False) -> Admission:
        """Decide on a Load; raise :class:`PolicyError`, or return what to send the kernel."""
        loaded = self._loaded()
        if model is None:
            if loaded and not new_instance:
                return Admission(None, None)  # the kernel answers with a loaded model
            if self._operator_keys:
                model = self._operator_keys[0]
            elif not self.any_model:
                raise PolicyError("model_not_found", "No model is loaded on this server, and it loads no model "
                                                     "on request (the operator names models with --model)")
        else:
            if model not in self._operator:  # an operator's model from a folder is named by its path
                check_key(model)
            if model in loaded and not new_instance:
                return Admission(model, None)  # an instance the kernel holds: no new load
        reference = None if model is None else self._operator.get(model)
        if reference is None and model is not None:
            if not self.any_model:
                raise self._not_served(model)
            reference = await self._from_catalog(model)
        if not new_instance and reference is not None and await self._holds(reference):
            return Admission(reference, None)  # another name of a loaded model: no new load
        return self._count(reference, model or _DEFAULT, loaded, new_instance)

    async def _holds(self, reference: str) -> bool:
        """Tell whether a loaded instance comes from ``reference`` (a catalog key, or an operator's folder)."""
        from ._caller import KernelCaller

        caller = KernelCaller(self._kernel)
        try:
            listed = await caller.call(lambda i: m.ListLoaded(id=i))
        finally:
            caller.close()
        models = listed.models if isinstance(listed, m.LoadedList) else []
        return any(reference in (info.path, info.model_key) for info in models)

    def _count(self, reference: str | None, name: str, loaded: list[str], new_instance: bool) -> Admission:
        """Count a load that may add a model; refuse it at ``max_models``."""
        slot = f"{name} (new instance {next(self._instances)})" if new_instance else name
        if slot not in self._pending and len(loaded) + len(self._pending) >= self.max_models:
            raise PolicyError("queue_full", f"This server holds its limit of {self.max_models} loaded model(s) "
                                            f"(--max-models); cannot load {_shown(name)}")
        self._pending[slot] += 1
        return Admission(reference, slot, self)

    async def _from_catalog(self, key: str) -> str:
        """The catalog's key for the model ``key`` names (a key or a path, never a folder on disk)."""
        from ...errors import LMKernelModelNotFoundError

        try:
            entry = await trio.to_thread.run_sync(self._kernel.catalog.lookup, key)
        except LMKernelModelNotFoundError:
            raise PolicyError("model_not_found", f"No model in this server's catalog matches the key {_shown(key)}") from None
        return entry.key

    def check_unload(self, key: str) -> None:
        """Refuse to unload an operator's model over the network (unless ``--allow-unload``)."""
        if not self.allow_unload and key in self._operator_instances:
            raise PolicyError("value", f"Model {_shown(key)} was loaded by the server's operator (--model) and is "
                                       "not unloaded over the network (the operator allows it with --allow-unload)")

    def listable(self, info: m.LlmInfo) -> bool:
        """Tell whether a downloaded model may be listed to a network caller."""
        return self.any_model or info.model_key in self._operator or info.path in self._operator.values()
