"""The kernel: a trio program that routes requests to model actors.

It owns the model registry (loaded and loading instances), resolves keys through the
catalog, picks a backend, deduplicates concurrent loads of one model, supervises the
actors, and validates configs (a request with a bad config fails before any compute).
Everything here runs on the kernel's trio thread; clients reach it through
:meth:`Kernel.connect` and :meth:`Kernel.receive` (see :mod:`lmkernel.kernel.runtime`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import msgspec
import trio

from ..errors import (
    LMKernelError,
)
from ..plugins.contract import Backend
from ..plugins.discovery import Discovery, discover
from . import messages as m
from ._actor import ModelActor, _Waiter, seq_ids
from ._catalog import Catalog, CatalogEntry
from ._failures import internal_error, request_error
from ._limits import catalog_timeout
from ._mailbox import CancelMsg, InfoMsg, Peer, PredictMsg, TemplateMsg, TokenizeMsg, UnloadMsg
from ._placement import check_load_config, check_supported, choose_backend, new_identifier
from ._worker import Shutdown
from .config import (
    check_identifier,
    check_ttl,
    parse_load_config,
    parse_prediction_config,
)

log = logging.getLogger("lmkernel.kernel")



ENDED_REMEMBERED = 64  # how many failed models' reasons are kept for "not found" answers




def _catalog_order(discovery: Discovery) -> list[Backend]:
    """Every working backend, those that can run here first (highest priority first).

    A model's listed facts come from the first backend that describes it: the one that
    would load it here, not one that cannot run on this machine.
    """
    backends = [s for s in discovery.statuses if s.backend is not None]
    ranked = sorted(backends, key=lambda s: (not s.availability.available, -s.backend.priority))
    return [s.backend for s in ranked]


class Kernel:
    """Serve requests until :meth:`shutdown`. Create, then ``await kernel.serve()``."""

    def __init__(self, discovery: Discovery | None = None, catalog: Catalog | None = None) -> None:
        self.discovery = discovery or discover()
        self.catalog = catalog or Catalog(_catalog_order(self.discovery))
        self._actors: list[ModelActor] = []  # loaded and loading, in load order
        self._ended: dict[str, str] = {}  # identifier -> why, for models that ended on a failure
        self._workers: list = []  # every engine worker whose thread may still run (for abandon_engines)
        self._nursery: trio.Nursery | None = None
        self._stop = trio.Event()

    # ---- lifecycle ---------------------------------------------------------------------

    async def serve(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await self._stop.wait()
            for actor in list(self._actors):
                actor.unload()
        self._nursery = None

    def abandon_engines(self, timeout: float) -> None:
        """The kernel loop is gone (it died): stop every engine thread directly, bounded.

        Called from the dead kernel's thread; engine threads must still end cleanly (they hold
        thread-bound engine state that must be released before the interpreter exits).
        """
        workers = [worker for worker in self._workers if worker.alive]
        for worker in workers:
            worker.abandon()
            worker.send(Shutdown())
        deadline = time.monotonic() + timeout
        for worker in workers:
            worker.join(max(0.0, deadline - time.monotonic()))

    def shutdown(self) -> None:
        """Unload every model and end :meth:`serve` once their workers have stopped."""
        self._stop.set()

    # ---- connections -------------------------------------------------------------------

    def connect(self, sink: Callable[[bytes], None]) -> Peer:
        """Open a client connection; encoded events for it go to ``sink``."""

        def send(event: m.Event) -> None:
            if peer.closed:
                return
            try:
                frame = m.encode(event)
            except Exception as exc:  # a value that cannot travel: that request fails, not the peer
                log.exception("cannot encode %s for request %s", type(event).__name__, event.id)
                frame = m.encode(m.Failed(id=event.id, error=m.ErrorInfo(
                    kind="server", message=f"lmkernel could not encode its answer ({type(event).__name__}): "
                                           f"{type(exc).__name__}: {exc}")))
            try:
                sink(frame)
            except Exception:
                # The sink belongs to the client's transport; if it cannot take events the
                # connection is unusable: drop it (its predictions are cancelled).
                log.exception("client sink failed; dropping its connection")
                self.disconnect(peer)

        peer = Peer(send)
        return peer

    def disconnect(self, peer: Peer) -> None:
        """Close a connection: its running predictions are cancelled."""
        if peer.closed:
            return
        peer.closed = True
        for actor, seq_id in list(peer.predictions.values()):
            actor.submit(CancelMsg(seq_id))

    def receive(self, peer: Peer, frame: bytes) -> None:
        """Handle one encoded request frame from ``peer``."""
        try:
            request = m.decode_request(frame)
        except msgspec.DecodeError as exc:
            log.warning("dropping a malformed request frame: %s", exc)
            peer.send(m.Failed(id=0, error=m.ErrorInfo(kind="value", message=f"Malformed request frame: {exc}")))
            return
        self.handle(peer, request)

    def handle(self, peer: Peer, request: m.Request) -> None:
        """Handle one decoded request; whatever goes wrong fails that request alone."""
        try:
            self._handle(peer, request)
        except LMKernelError as exc:
            peer.send(m.Failed(id=request.id, error=request_error(exc)))
        except Exception as exc:
            log.exception("handling a %s request failed", type(request).__name__)
            peer.send(m.Failed(id=request.id, error=internal_error(exc, f"the {type(request).__name__} request")))

    def _handle(self, peer: Peer, request: m.Request) -> None:
        match request:
            case m.Predict():
                self._predict(peer, request)
            case m.Cancel(target=target):
                owned = peer.predictions.get(target)
                if owned is not None:
                    actor, seq_id = owned
                    actor.submit(CancelMsg(seq_id))
            case m.Load():
                self._spawn(self._load, peer, request)
            case m.Unload(model=key):
                if (actor := self._route(peer, request.id, key)) is not None:
                    actor.submit(UnloadMsg(peer, request.id))
            case m.Tokenize(model=key, texts=texts):
                if (actor := self._route(peer, request.id, key)) is not None:
                    actor.submit(TokenizeMsg(peer, request.id, texts))
            case m.ApplyTemplate(model=key):
                if (actor := self._route(peer, request.id, key)) is not None:
                    actor.submit(TemplateMsg(peer, request.id, request))
            case m.GetInfo(model=key):
                if (actor := self._route(peer, request.id, key)) is not None:
                    actor.submit(InfoMsg(peer, request.id))
            case m.ListLoaded():
                infos = [a.info for a in self._actors if a.state in ("ready", "reloading")]
                peer.send(m.LoadedList(id=request.id, models=infos))
            case m.ListDownloaded():
                self._spawn(self._list_downloaded, peer, request)
            case m.Hello():
                from .._version import __version__

                peer.send(m.Welcome(id=request.id, version=__version__))

    def _route(self, peer: Peer, request_id: int, key: str) -> ModelActor | None:
        """The actor of model ``key``; if there is none, answer so and return ``None``."""
        actor = self._find(key)
        if actor is None:
            self._not_found(peer, request_id, key)
        return actor

    def _spawn(self, fn, peer: Peer, request: m.Request) -> None:
        """Run ``fn(peer, request)`` as a task; any exception fails that request, not the kernel."""
        assert self._nursery is not None, "the kernel is not serving"

        async def guarded() -> None:
            try:
                await fn(peer, request)
            except LMKernelError as exc:
                peer.send(m.Failed(id=request.id, error=request_error(exc)))
            except Exception as exc:
                log.exception("handling a %s request failed", type(request).__name__)
                peer.send(m.Failed(id=request.id, error=internal_error(exc, f"the {type(request).__name__} request")))

        self._nursery.start_soon(guarded)

    async def _catalog_call(self, fn, *args: object):
        """Run a catalog scan in a thread, bounded in wall-clock time: a plugin's ``describe`` may hang."""
        token = trio.lowlevel.current_trio_token()
        limit = catalog_timeout()
        with trio.CancelScope() as scope:

            def expire() -> None:
                try:
                    token.run_sync_soon(scope.cancel)
                except trio.RunFinishedError:
                    pass

            timer = threading.Timer(limit, expire)
            timer.daemon = True
            timer.start()
            try:
                return await trio.to_thread.run_sync(fn, *args, abandon_on_cancel=True)
            finally:
                timer.cancel()
        raise LMKernelError(
            f"Scanning the model folders took longer than {limit:g} s (a backend's describe() "
            "may be hanging; `lmkernel backends` lists them)"
        )

    # ---- registry ----------------------------------------------------------------------

    def _find(self, key: str) -> ModelActor | None:
        live = [a for a in self._actors if a.live]
        for match in (
            lambda a: a.info.identifier == key,
            lambda a: a.info.model_key == key,
            lambda a: a.info.path == key,
        ):
            found = next((a for a in live if match(a)), None)
            if found is not None:
                return found
        return None

    def load_summary(self) -> dict[str, object]:
        """What is loaded and how many predictions are running or waiting (for health checks)."""
        ready = [a for a in self._actors if a.state in ("ready", "reloading")]
        return {
            "models": [a.info.identifier for a in ready],
            "predictions": sum(len(a._runs) for a in ready),
        }

    def _gone(self, actor: ModelActor) -> None:
        if actor in self._actors:
            self._actors.remove(actor)
        if actor.end_reason is not None:  # it did not leave by choice: remember why, for a while
            self._ended.pop(actor.info.identifier, None)
            self._ended[actor.info.identifier] = actor.end_reason
            while len(self._ended) > ENDED_REMEMBERED:
                del self._ended[next(iter(self._ended))]

    def _not_found(self, peer: Peer, request_id: int, key: str) -> None:
        loaded = ", ".join(a.info.identifier for a in self._actors if a.state in ("ready", "reloading")) or "none"
        why = self._ended.get(key)
        ended = f"; it was unloaded because: {why}" if why else ""
        peer.send(m.Failed(id=request_id, error=m.ErrorInfo(
            kind="model_not_found",
            message=f"No loaded model has the identifier {key!r} (loaded: {loaded}){ended}",
            model=key,
        )))

    # ---- predictions -------------------------------------------------------------------

    def _predict(self, peer: Peer, request: m.Predict) -> None:
        actor = self._find(request.model)
        if actor is None:
            self._not_found(peer, request.id, request.model)
            return
        try:
            config = parse_prediction_config(request.config)
            check_supported(config, actor.backend, actor.info.identifier)
        except LMKernelError as exc:
            peer.send(m.Failed(id=request.id, error=request_error(exc, model=actor.info.identifier)))
            return
        seq_id = next(seq_ids)
        peer.predictions[request.id] = (actor, seq_id)  # so a cancel right behind it finds it
        messages = None if request.messages is None else tuple(request.messages)
        actor.submit(PredictMsg(peer, request.id, seq_id, request.prompt, config, messages))

    # ---- loading -----------------------------------------------------------------------

    async def _load(self, peer: Peer, request: m.Load) -> None:
        try:
            await self._load_or_get(peer, request)
        except LMKernelError as exc:
            peer.send(m.Failed(id=request.id, error=request_error(exc, model=request.model)))
        # anything else: _spawn's guard fails the request

    async def _load_or_get(self, peer: Peer, request: m.Load) -> None:
        check_ttl(request.ttl)  # values from the network are checked here, not only in the SDK
        if request.identifier is not None:
            check_identifier(request.identifier)
        config = parse_load_config(request.config)
        if request.model is None and not request.new_instance:
            ready = [a for a in self._actors if a.state == "ready"]
            if ready:
                peer.send(m.Loaded(id=request.id, info=ready[0].info, already_loaded=True,
                                   load_config=ready[0].reported_load_config()))
                return
        if request.model is not None and not request.new_instance:
            actor = self._find(request.model)
            if actor is not None:
                self._join(actor, peer, request.id)
                return
        if request.model is None:
            entry = await self._catalog_call(self.catalog.default)
        else:
            entry = await self._catalog_call(self.catalog.resolve, request.model)
        if not request.new_instance:
            actor = self._find(entry.key)  # a loaded instance carries its catalog key
            if actor is not None:
                self._join(actor, peer, request.id)
                return
        backend = choose_backend(self.discovery, entry, config)
        check_load_config(entry, backend, config)
        identifier = new_identifier({a.info.identifier for a in self._actors}, entry.key, request.identifier)
        self._ended.pop(identifier, None)
        desc = entry.descriptions[backend.name]
        info = m.LlmInstanceInfo(
            **msgspec.structs.asdict(entry.info()),
            identifier=identifier,
            instance_reference=identifier,
            context_length=config.context_length or desc.max_context_length,
            backend=backend.name,
        )
        actor = ModelActor(info, backend, entry.path, config, request.ttl, self._gone)
        self._actors.append(actor)
        self._workers = [worker for worker in self._workers if worker.alive] + [actor._worker]
        self._join(actor, peer, request.id)
        assert self._nursery is not None
        await self._nursery.start(self._supervise, actor)

    async def _supervise(self, actor: ModelActor, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Run an actor; if it crashes (a bug), end that model only and keep the kernel serving."""
        try:
            await actor.run(task_status=task_status)
        except Exception as exc:
            try:
                actor.crash(exc, "in the model actor")
            except Exception:
                log.exception("ending crashed actor %s failed", actor.info.identifier)
            self._gone(actor)

    def _join(self, actor: ModelActor, peer: Peer, request_id: int) -> None:
        waiter = _Waiter(peer, request_id)
        waiter.progress(0.0)
        if actor.state in ("ready", "reloading"):
            waiter.progress(1.0)
            peer.send(m.Loaded(id=request_id, info=actor.info, already_loaded=True,
                               load_config=actor.reported_load_config()))
        else:
            actor.load_waiters.append(waiter)

    async def _list_downloaded(self, peer: Peer, request: m.ListDownloaded) -> None:
        def listing() -> list[CatalogEntry]:
            demo = self.catalog.builtin_demo()
            return self.catalog.entries() + ([demo] if demo is not None else [])

        entries = await self._catalog_call(listing)
        peer.send(m.DownloadedList(id=request.id, models=[e.info() for e in entries]))
