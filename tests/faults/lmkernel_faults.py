"""A fault-injection backend, used only by the tests and loaded like any plugin.

It is the real MLX backend with faults on command: it accepts a model folder that holds a
``faults.json`` beside a Hugging Face model, and before each contract method it reads that
file. An entry ``{"step": {"mode": "raise", "after": 2, "times": 1}}`` makes the third call
of ``step`` (counted per process since the file last changed) raise; ``"hang"`` sleeps for
``seconds`` (default 30) instead; ``"malformed"`` returns a value that breaks the contract.
``availability`` takes its fault from the environment variable ``LMKERNEL_FAULT_AVAILABILITY``
(it has no folder). Structured output: ``vocabulary`` also takes ``"none"`` (the engine says it
cannot constrain); ``add`` also takes ``"unmasked"`` (the engine ignores the masks of the
constraint it is given and samples any token). Registered through ``lmkernel_faults-0.1.dist-info/entry_points.txt``:
putting this folder on ``sys.path`` (or ``PYTHONPATH``) installs it.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import numpy as np

from lmkernel.backends.mlx import backend as mlx
from lmkernel.plugins import Availability, Backend, Engine, ModelDescription, Token, TokenConstraint

FAULT_FILE = "faults.json"


class InjectedFault(RuntimeError):
    """What a ``raise`` fault raises."""


class _Faults:
    """Reads the fault file and counts calls per method (reset when the file changes)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seen: dict[Path, str] = {}
        self._calls: dict[tuple[Path, str], int] = {}

    def check(self, folder: Path | None, method: str) -> str | None:
        """Count a call; return the fault mode to apply now (``raise`` already raised)."""
        if folder is None:
            mode = os.environ.get("LMKERNEL_FAULT_AVAILABILITY")
            spec = {"mode": mode, "times": 10**9} if mode else None
        else:
            try:
                text = (folder / FAULT_FILE).read_text()
            except OSError:
                return None
            with self._lock:
                if self._seen.get(folder) != text:
                    self._seen[folder] = text
                    for key in [k for k in self._calls if k[0] == folder]:
                        del self._calls[key]
            spec = (json.loads(text or "{}") or {}).get(method)
        if not spec:
            return None
        with self._lock:
            n = self._calls.get((folder, method), 0)
            self._calls[(folder, method)] = n + 1
        after, times = spec.get("after", 0), spec.get("times", 1)
        if not after <= n < after + times:
            return None
        mode = spec["mode"]
        if mode == "raise":
            raise InjectedFault(f"injected fault in {method}")
        if mode == "hang":
            time.sleep(spec.get("seconds", 30))
        return mode


FAULTS = _Faults()


class FaultEngine(Engine):
    def __init__(self, inner: Engine, folder: Path) -> None:
        self._inner = inner
        self._folder = folder
        self.context_length = inner.context_length

    def _fault(self, method: str) -> str | None:
        return FAULTS.check(self._folder, method)

    def tokenize(self, text):
        if self._fault("tokenize") == "malformed":
            return ["not", "ids"]
        return self._inner.tokenize(text)

    def vocabulary(self):
        mode = self._fault("vocabulary")
        if mode == "malformed":
            return "not a vocabulary"
        return None if mode == "none" else self._inner.vocabulary()

    def add(self, seq_id, prompt_tokens, sampling, max_tokens, *, constraint=None):
        if self._fault("add") == "unmasked" and constraint is not None:
            constraint = _Unmasked(constraint)
        self._inner.add(seq_id, prompt_tokens, sampling, max_tokens, constraint=constraint)

    def step(self):
        if self._fault("step") == "malformed":
            return [Token(-5, 1, "x")]
        return self._inner.step()

    def remove(self, seq_id):
        self._fault("remove")
        self._inner.remove(seq_id)

    @property
    def busy(self):
        return self._inner.busy

    def close(self):
        try:
            self._fault("close")
        finally:
            self._inner.close()


class _Unmasked(TokenConstraint):
    """A constraint whose engine reports what it samples but ignores the masks."""

    def __init__(self, inner: TokenConstraint) -> None:
        self._inner = inner
        self.words = inner.words
        self._all = np.full(inner.words, -1, dtype=np.int32)

    def allowed(self, previous):
        self._inner.allowed(previous)
        return self._all


class _BadEngine(Engine):
    """What a ``malformed`` load returns: an engine with an impossible context length."""

    context_length = -1

    def tokenize(self, text):
        return []

    def add(self, *args):
        pass

    def step(self):
        return []

    def remove(self, seq_id):
        pass

    @property
    def busy(self):
        return False


class FaultBackend(Backend):
    name = "faults"
    prediction_keys = mlx.prediction_keys
    load_keys = mlx.load_keys
    priority = 100  # wins over mlx for the folders it accepts

    def availability(self) -> Availability:
        mode = FAULTS.check(None, "availability")
        if mode == "malformed":
            return "yes"  # type: ignore[return-value]
        return Availability(True, notes="fault injection (tests only)")

    def describe(self, path: Path) -> ModelDescription | None:
        if not (path / FAULT_FILE).is_file():
            return None
        mode = FAULTS.check(path, "describe")
        desc = mlx.describe(path)
        if desc is not None and mode == "malformed":
            return ModelDescription(architecture=desc.architecture, format="not-a-format",
                                    max_context_length=desc.max_context_length, size_bytes=desc.size_bytes)
        return desc

    def load(self, path, options, on_progress):
        mode = FAULTS.check(path, "load")
        if mode == "malformed":
            return _BadEngine()
        return FaultEngine(mlx.load(path, options, on_progress), path)

    def release_thread(self) -> None:
        mlx.release_thread()


backend = FaultBackend()
