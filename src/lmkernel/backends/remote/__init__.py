"""The remote backend: models served by OpenAI-compatible servers, behind the same API.

vLLM, TGI, llama.cpp's server, ``mlx_lm.server``, Ollama, LM Studio, another ``lmkernel
serve``: any server with ``/v1/models``, ``/v1/completions`` and ``/v1/chat/completions``
(streamed). The user names the servers in a small TOML file (:mod:`._config`; the
environment variable ``LMKERNEL_REMOTE`` points to it); their models are listed as
``remote/<server>/<model id>`` and load like any other model. The engine is asynchronous
(:class:`~lmkernel.plugins.AsyncEngine`): each prediction is one streamed HTTP request on the
kernel's loop, cancelled by closing it. The kernel applies stop strings, ``maxTokens`` and the
stats as for local engines; token counts come from the server's ``usage``. ``docs/scale-out.md``
says how to grow from one process to a cluster with it.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import trio

from ...errors import LMKernelModelNotFoundError
from ...plugins.contract import Availability, LoadOptions, ModelDescription, ModelRejected, OfferedModel
from ...plugins.contract_async import AsyncBackend, AsyncEngine
from ._config import RemoteConfigError, Server, config_path, load_servers
from ._engine import Pool, RemoteEngine, RemoteError

__all__ = ["PREFIX", "RemoteBackend", "backend"]

log = logging.getLogger("lmkernel.remote")

#: Every remote model's path (and key) starts with it: ``remote/<server>/<model id>``.
PREFIX = "remote/"
#: The context length of a model whose server does not report one and whose config gives none.
UNKNOWN_CONTEXT = 131072
#: Seconds a server's model list is reused before it is asked again.
LIST_TTL = 5.0
#: The most models taken from one server's list (more would make every listing of models slow).
MAX_MODELS = 10_000


def context_of(entry: object) -> int | None:
    """The context length a ``/v1/models`` entry reports (vLLM, llama.cpp's server, LM Studio, OpenRouter)."""
    if not isinstance(entry, dict):
        return None
    meta = entry.get("meta") if isinstance(entry.get("meta"), dict) else {}
    for value in (entry.get("max_model_len"), entry.get("context_length"), entry.get("max_context_length"),
                  meta.get("n_ctx"), meta.get("n_ctx_train")):
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def model_entries(answer: object) -> dict[str, dict]:
    """``/v1/models``'s answer as ``{id: entry}`` (entries without a string id are skipped; the first
    :data:`MAX_MODELS` are taken)."""
    data = answer.get("data") if isinstance(answer, dict) else None
    out: dict[str, dict] = {}
    for entry in data if isinstance(data, list) else ():
        if isinstance(entry, dict) and isinstance(entry.get("id"), str) and entry["id"]:
            if len(out) == MAX_MODELS and entry["id"] not in out:
                log.warning("a remote server lists more than %d models: only the first are offered", MAX_MODELS)
                break
            out.setdefault(entry["id"], entry)
    return out


def _path(server: Server, model_id: str) -> str:
    """The path a server's model is listed under: ``remote/<server>/<model id>`` (an id such as
    mlx_lm.server's absolute folder path loses its leading and doubled slashes)."""
    return Path(f"{PREFIX}{server.name}/{model_id.lstrip('/')}").as_posix()


class RemoteBackend(AsyncBackend):
    """Models on the servers ``LMKERNEL_REMOTE`` names."""

    name = "remote"
    prediction_keys = frozenset({"temperature", "topKSampling", "topPSampling", "minPSampling", "repeatPenalty"})
    load_keys = frozenset()

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._read: tuple[Path, float, list[Server]] | None = None
        # server name -> (its urls, when, what it listed)
        self._listed: dict[str, tuple[tuple, float, dict[str, dict]]] = {}
        self._problems: list[str] = []  # servers the last listing could not reach

    # ---- configuration ------------------------------------------------------------------

    def servers(self) -> list[Server]:
        """The configured servers (the file is read again when it changes); raise :class:`RemoteConfigError`."""
        path = config_path()
        if path is None:
            return []
        try:
            mtime = path.stat().st_mtime
        except OSError:
            mtime = -1.0
        with self._lock:
            if self._read is not None and self._read[:2] == (path, mtime):
                return self._read[2]
        servers = load_servers(path)
        with self._lock:
            self._read = (path, mtime, servers)
        return servers

    def availability(self) -> Availability:
        try:
            servers = self.servers()
        except RemoteConfigError as exc:
            return Availability(False, str(exc))
        if not servers:
            path = config_path()
            if path is not None:
                return Availability(False, f"{path} (LMKERNEL_REMOTE) names no servers: add a [servers.<name>] "
                                           "table with a url (docs/scale-out.md)")
            return Availability(False, "no remote servers configured (set LMKERNEL_REMOTE to a TOML file naming "
                                       "them; see docs/scale-out.md)")
        return Availability(True, notes=f"{len(servers)} server(s): {', '.join(s.name for s in servers)}")

    def describe(self, path: Path) -> ModelDescription | None:
        raise ModelRejected("serves models on OpenAI-compatible servers, not folders (see LMKERNEL_REMOTE)")

    # ---- listing ------------------------------------------------------------------------

    def _listings(self, servers: list[Server]) -> dict[str, dict[str, dict]]:
        """What ``/v1/models`` of each server's first answering replica lists, asked of all servers at
        once (each answer cached :data:`LIST_TTL` s); a server that does not answer lists nothing, and
        :meth:`offer_problems` says why."""
        now = time.monotonic()
        listings: dict[str, dict[str, dict]] = {}
        stale: list[Server] = []
        with self._lock:
            for server in servers:
                cached = self._listed.get(server.name)
                if cached is not None and cached[0] == server.urls and now - cached[1] < LIST_TTL:
                    listings[server.name] = cached[2]
                else:
                    stale.append(server)
        if not stale:
            return listings
        # the pool's probes, each bounded as a whole (a server that trickles its answer is not waited for)
        pools = [Pool(dataclasses.replace(server, timeout=min(2.0, server.timeout))) for server in stale]

        answers: list[list[object | None]] = [[] for _ in pools]

        async def ask(i: int) -> None:
            answers[i] = await pools[i].check_all()

        async def ask_all() -> None:
            async with trio.open_nursery() as nursery:
                for i in range(len(pools)):
                    nursery.start_soon(ask, i)

        trio.run(ask_all)
        problems = []
        for server, pool, answered in zip(stale, pools, answers, strict=True):
            listed = next((model_entries(a) for a in answered if a is not None), None)
            if listed is None:
                listed = {}
                if server.models is None:
                    problems.append(f"server {server.name}: " + "; ".join(
                        f"{r.url.text}: {r.problem}" for r in pool.replicas))
            with self._lock:
                self._listed[server.name] = (server.urls, now, listed)
            listings[server.name] = listed
        with self._lock:
            self._problems = problems
        return listings

    def offer_problems(self) -> Sequence[str]:
        with self._lock:
            return list(self._problems)

    def offered_models(self) -> Sequence[OfferedModel]:
        offered = []
        servers = self.servers()
        asked = [s for s in servers if s.models is None or s.context_length is None]
        listings = self._listings(asked) if asked else {}
        if not asked:
            with self._lock:
                self._problems = []
        for server in servers:
            listed = listings.get(server.name, {})
            for model_id in server.models if server.models is not None else listed:
                context = server.context_length or context_of(listed.get(model_id)) or UNKNOWN_CONTEXT
                offered.append(OfferedModel(path=_path(server, model_id), description=ModelDescription(
                    architecture=None, format="remote", max_context_length=context, size_bytes=0,
                    display_name=model_id)))
        return offered

    # ---- loading ------------------------------------------------------------------------

    def _named(self, path: Path) -> tuple[Server, str]:
        """The server and the rest of the path a listed path names (the model id, but for slashes)."""
        text = path.as_posix()
        name, _, rest = text.removeprefix(PREFIX).partition("/")
        server = next((s for s in self.servers() if s.name == name), None) if text.startswith(PREFIX) else None
        if server is None or not rest:
            raise LMKernelModelNotFoundError(f"{text!r} names no configured remote server's model "
                                             f"(expected {PREFIX}<server>/<model id>)")
        return server, rest

    async def load_async(self, path: Path, options: LoadOptions, on_progress: Callable[[float], None]) -> AsyncEngine:
        server, rest = self._named(path)
        pool = Pool(server)
        answers = await pool.check_all()
        listed = next((model_entries(a) for a in answers if a is not None), None)
        if listed is None:
            raise RemoteError(f"no replica of the server {server.name} answers: " + "; ".join(
                f"{r.url.text}: {r.problem}" for r in pool.replicas))
        ids = server.models if server.models is not None else tuple(listed)
        model_id = next((i for i in ids if _path(server, i) == path.as_posix()), rest)  # as the server spells it
        if server.models is None and model_id not in listed:
            shown = ", ".join(list(listed)[:20]) + (f" and {len(listed) - 20} more" if len(listed) > 20 else "")
            raise LMKernelModelNotFoundError(
                f"the server {server.name} does not serve {model_id!r} (it lists: {shown or 'nothing'})")
        known = options.context_length or server.context_length or context_of(listed.get(model_id))
        engine = RemoteEngine(pool, model_id, known or UNKNOWN_CONTEXT, context_known=known is not None)
        engine.start_watch()
        on_progress(1.0)
        return engine


backend = RemoteBackend()
