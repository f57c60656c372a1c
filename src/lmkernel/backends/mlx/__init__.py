"""The MLX backend: Hugging Face–format models through mlx-lm, and GGUF files MLX can read.

Runs on Apple Silicon (Metal) and on Linux CPUs (``mlx[cpu]``, float32, OpenBLAS when the
machine has it). Importing this module is cheap: MLX and mlx-lm are imported when a model
loads, on the model's worker thread (see :func:`_import_engine` for what that import must not
do to the rest of the process).
"""

from __future__ import annotations

import ast
import atexit
import contextlib
import functools
import importlib.metadata
import importlib.util
import json
import os
import struct
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from ...plugins.contract import (
    Availability,
    Backend,
    Engine,
    LoadOptions,
    ModelDescription,
    ModelRejected,
    read_config,
)
from . import _blas
from ._gguf import read_header

__all__ = ["MLXBackend", "backend"]

# mlx-lm cannot read these checkpoints (they are other engines' formats).
_FOREIGN_QUANT = {"exl2", "gptq", "awq", "bitsandbytes", "fp8"}


def _mlx_lm_dir() -> Path | None:
    spec = importlib.util.find_spec("mlx_lm")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


@functools.cache
def _mlx_lm_remapping() -> dict[str, str]:
    """mlx-lm's ``MODEL_REMAPPING`` (``mistral`` runs as ``llama`` ...), read from its source without importing MLX."""
    package = _mlx_lm_dir()
    try:
        tree = ast.parse((package / "utils.py").read_text(encoding="utf-8")) if package else None
    except (OSError, ValueError, SyntaxError):
        tree = None
    for node in tree.body if tree else []:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "MODEL_REMAPPING" for t in node.targets):
            try:
                table = ast.literal_eval(node.value)
            except ValueError:
                return {}
            return {k: v for k, v in table.items() if isinstance(k, str) and isinstance(v, str)}
    return {}


def _check_model_type(model_type: object) -> None:
    """Raise :class:`ModelRejected` unless mlx-lm has a model for ``model_type`` (or mlx-lm is not installed)."""
    if model_type is None or model_type == "":
        raise ModelRejected("config.json has no model_type")
    if not isinstance(model_type, str) or not model_type.replace("-", "_").isidentifier():
        raise ModelRejected(f"config.json's model_type must be a model name, got {model_type!r:.80}")
    package = _mlx_lm_dir()
    if package is None:  # cannot tell here; loading says
        return
    module = _mlx_lm_remapping().get(model_type, model_type)
    if not (package / "models" / f"{module}.py").is_file():
        try:
            version = f" {importlib.metadata.version('mlx-lm')}"
        except importlib.metadata.PackageNotFoundError:
            version = ""
        raise ModelRejected(f"model_type {model_type!r} is not supported by mlx-lm{version}")


def _has_distribution(*names: str) -> bool:
    for name in names:
        try:
            importlib.metadata.version(name)
            return True
        except importlib.metadata.PackageNotFoundError:
            pass
    return False


def _safetensors_params(files: list[Path]) -> int:
    """Count parameters from safetensors headers (no weights are read)."""
    total = 0
    for file in files:
        with file.open("rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        for name, entry in header.items():
            if name != "__metadata__":
                n = 1
                for dim in entry["shape"]:
                    n *= dim
                total += n
    return total


_import_lock = threading.Lock()
_forked_after_mlx = False  # set in a child forked from a process that had started MLX


def _after_fork_in_child() -> None:
    global _forked_after_mlx
    if "mlx.core" in sys.modules:
        _forked_after_mlx = True


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
_main_thread_hooked = False


def _import_engine() -> Callable[[Path, LoadOptions, Callable[[float], None]], Engine]:
    """Import MLX and mlx-lm (on the calling worker thread) and return ``load_engine``.

    The first import is guarded, for the sake of the user's process:

    * mlx-lm must not lower the open-file limit (:func:`_keep_open_file_limit`).
    * It must work after the main thread has returned, when a non-daemon thread of the
      program loads the model (:func:`_exit_hooks_accepted`).
    * The main thread's MLX state is released at exit (:func:`_release_main_thread`), which
      MLX leaves undone once ``mlx.core`` was first imported on another thread, here ours.
    """
    global _main_thread_hooked
    with _import_lock:
        first = "mlx.core" not in sys.modules
        with _keep_open_file_limit(), _exit_hooks_accepted():
            from ._engine import load_engine
        if first and threading.current_thread() is not threading.main_thread() and not _main_thread_hooked:
            _main_thread_hooked = True
            atexit.register(_release_main_thread)
    return load_engine


def _release_main_thread() -> None:
    """At exit, on the main thread: release its MLX streams and compile cache.

    Why (MLX 0.32): each thread has its own compile cache, freed by a C++ thread-local
    destructor; for the main thread that runs in ``exit()``, after the interpreter is gone. An
    entry still holding a Python object then takes the GIL and the process dies with SIGSEGV.
    Two things should empty the main thread's cache before that, and both miss it here: MLX's
    ``atexit`` hook clears the cache of the thread that imported ``mlx.core`` (our worker), and
    a compiled function, when freed, erases its entries only from the cache of the thread that
    called it last (our worker again, when the program's main thread called mlx-lm's compiled
    functions before lmkernel's last prediction).

    Registered with :mod:`atexit` on the first load, so it runs while the interpreter is whole,
    after every exit hook registered later and before MLX's own. Exit hooks registered before
    the first load that use MLX on the main thread find no stream there ("There is no
    Stream(cpu, 0) in current thread"). A program that first imports ``mlx.core`` on a thread
    of its own is not covered: MLX's hook is then bound to that thread, with or without us.
    """
    mx = sys.modules.get("mlx.core")
    if mx is None or threading.current_thread() is not threading.main_thread():
        return
    mx.synchronize()
    mx.clear_streams()


@contextlib.contextmanager
def _keep_open_file_limit() -> Iterator[None]:
    """Keep mlx-lm's first import from lowering the process's open-file limit.

    ``mlx_lm.utils`` calls ``setrlimit(RLIMIT_NOFILE, (2048, 4096))`` when imported: it lowers
    a higher soft limit, and lowers the hard limit, which an unprivileged process can never
    raise again. So the call is intercepted rather than undone: while mlx-lm is first imported
    (under ``_import_lock``), a ``RLIMIT_NOFILE`` request may raise the soft limit up to the
    hard one and lowers neither. Whatever else lowered the limit meanwhile is restored after.
    """
    try:
        import resource
    except ImportError:  # pragma: no cover - not a POSIX system: no such limit
        yield
        return
    if "mlx_lm.utils" in sys.modules:
        yield
        return
    nofile = resource.RLIMIT_NOFILE
    before = resource.getrlimit(nofile)
    real_setrlimit = resource.setrlimit

    def setrlimit(which: int, limits: tuple[int, int]) -> None:
        if which != nofile:
            return real_setrlimit(which, limits)
        soft, hard = resource.getrlimit(nofile)
        wanted = limits[0]
        if _rlim_below(soft, wanted):
            soft = hard if _rlim_below(hard, wanted) else wanted
        return real_setrlimit(nofile, (soft, hard))

    resource.setrlimit = setrlimit
    try:
        yield
    finally:
        resource.setrlimit = real_setrlimit
        soft, hard = resource.getrlimit(nofile)
        if _rlim_below(soft, before[0]) or _rlim_below(hard, before[1]):
            with contextlib.suppress(ValueError, OSError):  # a lowered hard limit may not come back
                real_setrlimit(nofile, before)


@contextlib.contextmanager
def _exit_hooks_accepted() -> Iterator[None]:
    """Let the first MLX import register thread-exit hooks after the main thread has returned.

    mlx-lm imports ``concurrent.futures.thread`` (through huggingface_hub), which registers
    its exit hook with ``threading._register_atexit``. Once the main thread has returned, that
    raises ``RuntimeError: can't register atexit after shutdown`` and the load would fail. During
    the import (under ``_import_lock``), such a hook goes to :mod:`atexit` instead, which still
    runs while the interpreter is whole.
    """
    real_register = getattr(threading, "_register_atexit", None)
    if real_register is None or "concurrent.futures.thread" in sys.modules:
        yield
        return

    def register(func: Callable, *args: object, **kwargs: object) -> None:
        try:
            real_register(func, *args, **kwargs)
        except RuntimeError:  # the interpreter is shutting down: threads are being joined
            atexit.register(func, *args, **kwargs)

    threading._register_atexit = register
    try:
        yield
    finally:
        threading._register_atexit = real_register


def _rlim_below(a: int, b: int) -> bool:
    """``a < b`` for resource limits, where ``RLIM_INFINITY`` is above every number."""
    import resource

    if a == resource.RLIM_INFINITY:
        return False
    return b == resource.RLIM_INFINITY or a < b


def _params_string(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)


class MLXBackend(Backend):
    """Loads Hugging Face–format folders with mlx-lm, and GGUF files of Llamas in types MLX reads; one worker thread per model."""

    name = "mlx"
    prediction_keys = frozenset(
        {"temperature", "topKSampling", "topPSampling", "minPSampling", "repeatPenalty", "structured"}
    )
    load_keys = frozenset({"seed", "evalBatchSize", "promptCacheBytes"})
    priority = 10

    def availability(self) -> Availability:
        missing = [m for m in ("mlx", "mlx_lm") if importlib.util.find_spec(m) is None]
        if missing:
            return Availability(False, f"not installed: {', '.join(missing)} (pip install 'lmkernel[mlx]')")
        if sys.platform.startswith("linux") and not _has_distribution("mlx-cpu", "mlx-cuda"):
            return Availability(False, "mlx is installed without a Linux back-end (pip install 'mlx[cpu]')")
        device = "Metal" if sys.platform == "darwin" else "CPU, float32"
        return Availability(True, notes=f"{device}; BLAS: {_blas.describe()}; continuous batching (mlx-lm BatchGenerator)")

    def describe(self, path: Path) -> ModelDescription:
        if path.suffix.lower() == ".gguf" and path.is_file():
            info = read_header(path)  # raises ModelRejected unless MLX can run it (see _gguf.py)
            return ModelDescription(
                architecture=info.architecture,
                format="gguf",
                max_context_length=info.context_length or 4096,
                size_bytes=path.stat().st_size,
                params_string=_params_string(info.parameter_count),
                display_name=info.name,
                quantization=info.quantization,
            )
        config = read_config(path)
        weights = sorted(path.glob("model*.safetensors"))
        if not weights:
            raise ModelRejected("no weights (no model*.safetensors file)")
        quant_config = config.get("quantization_config")
        quant = quant_config.get("quant_method") if isinstance(quant_config, dict) else None
        if isinstance(quant, str) and quant in _FOREIGN_QUANT:
            raise ModelRejected(f"its weights are quantized with {quant!r}, which mlx-lm does not read")
        _check_model_type(config.get("model_type"))
        context = config.get("max_position_embeddings") or 4096
        if isinstance(context, float) and context.is_integer():
            context = int(context)
        if not isinstance(context, int) or isinstance(context, bool) or context < 1:
            raise ModelRejected(f"config.json's max_position_embeddings must be a positive integer, got {context!r:.80}")
        try:
            size = sum(f.stat().st_size for f in weights)
        except OSError as exc:  # a broken link into a Hugging Face cache
            raise ModelRejected(f"cannot read the weights ({Path(exc.filename or '?').name}: {exc.strerror})") from None
        try:
            params = _params_string(_safetensors_params(weights))
        except (OSError, ValueError, KeyError, TypeError, struct.error):
            params = None
        return ModelDescription(
            architecture=config["model_type"],
            format="safetensors",
            max_context_length=context,
            size_bytes=size,
            params_string=params,
        )

    def load(self, path: Path, options: LoadOptions, on_progress: Callable[[float], None]) -> Engine:
        if _forked_after_mlx:
            raise RuntimeError(
                "MLX was started in the parent of this forked process and cannot run here (fork copies "
                "none of MLX's worker threads, so every evaluation would hang); start this process with "
                "multiprocessing's 'spawn' or 'forkserver' method instead"
            )
        _blas.preload()
        load_engine = _import_engine()
        return load_engine(path, options, on_progress)

    def release_thread(self) -> None:
        if "mlx.core" in sys.modules:
            import mlx.core as mx

            mx.synchronize()
            mx.clear_streams()


backend = MLXBackend()
