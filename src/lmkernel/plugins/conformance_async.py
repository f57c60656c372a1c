"""The conformance kit for asynchronous backends (:class:`~lmkernel.plugins.AsyncBackend`).

Used like :class:`~lmkernel.plugins.conformance.Conformance`::

    from lmkernel.plugins.conformance_async import AsyncConformance
    kit = AsyncConformance(MyBackend(), "remote/my-server/my-model")
    for name in kit.checks():
        getattr(kit, name)()          # raises AssertionError with a reason on failure

``model`` is a path the backend offers (:meth:`~lmkernel.plugins.Backend.offered_models`) or
a folder it describes. Engine-level checks drive the engine on a trio loop of their own, as the
kernel does; the kernel-level check runs a private kernel with the real protocol.
``refuses_long_prompts=False`` for an engine that has no context limit to enforce (mlx_lm's
server generates past it): the kernel check then leaves out the prompt longer than the context.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import trio

from .conformance import kernel_requests_end_once
from .contract import LoadOptions, ModelRejected, Sampling
from .contract_async import AsyncBackend, AsyncEngine, Finish, Generation, Prefill, Text

__all__ = ["AsyncConformance"]

GREEDY = Sampling(temperature=0.0)
PROMPTS = ("The cat sat on the", "Once upon a time", "In the beginning", "One, two, three,")


async def _collect(engine: AsyncEngine, request: Generation) -> tuple[str, list[Any]]:
    events = []
    async for event in engine.generate(request):
        events.append(event)
    return "".join(e.text for e in events if isinstance(e, Text)), events


class AsyncConformance:
    """Checks for one asynchronous backend and one (small) model it serves."""

    def __init__(self, backend: AsyncBackend, model: str | Path, *, refuses_long_prompts: bool = True) -> None:
        assert isinstance(backend, AsyncBackend), f"{type(backend).__name__} is not an AsyncBackend"
        self.backend = backend
        self.model = model
        self.refuses_long_prompts = refuses_long_prompts

    @classmethod
    def checks(cls) -> list[str]:
        return sorted(name for name in dir(cls) if name.startswith("check_"))

    def _run(self, scenario, **options: Any) -> Any:
        """Open the model on a fresh trio loop, run ``scenario(engine)``, close the engine."""

        async def main() -> Any:
            progress: list[float] = []
            engine = await self.backend.load_async(Path(self.model), LoadOptions(**options), progress.append)
            assert isinstance(engine, AsyncEngine), f"load_async returned {type(engine).__name__}"
            assert progress and progress[-1] == 1.0, f"load progress must end at 1.0, got {progress}"
            try:
                return await scenario(engine)
            finally:
                await engine.aclose()

        return trio.run(main)

    # ---- engine level ---------------------------------------------------------------------

    def check_available_and_offered(self) -> None:
        availability = self.backend.availability()
        assert availability.available, f"backend {self.backend.name!r} is not available: {availability.reason}"
        offered = {m.path: m for m in self.backend.offered_models()}
        if str(self.model) in offered:
            desc = offered[str(self.model)].description
        else:
            try:
                desc = self.backend.describe(Path(self.model))
            except ModelRejected as exc:
                raise AssertionError(f"backend {self.backend.name!r} neither offers nor takes {self.model}: {exc}") from exc
        assert desc is not None and desc.max_context_length > 0, desc

    def check_generation_ends_once_within_budget(self) -> None:
        """Prefill events, then text, then exactly one Finish; ``max_tokens`` is kept; greedy repeats."""

        async def scenario(engine: AsyncEngine):
            runs = [await _collect(engine, Generation(prompt=PROMPTS[0], sampling=GREEDY, max_tokens=8)) for _ in "ab"]
            return runs

        (text, events), (again, _) = self._run(scenario)
        assert events and isinstance(events[-1], Finish), f"the last event must be a Finish: {events[-3:]}"
        assert sum(isinstance(e, Finish) for e in events) == 1, "exactly one Finish"
        kinds = [type(e) for e in events]
        assert Prefill not in kinds or kinds.index(Text) > max(i for i, k in enumerate(kinds) if k is Prefill), \
            "prompt progress after generated text"
        generated = sum(e.tokens for e in events if isinstance(e, Text))
        finish = events[-1]
        counted = finish.generated_tokens if finish.generated_tokens is not None else generated
        assert 1 <= counted <= 8, f"max_tokens=8, the engine generated {counted}"
        assert finish.reason == "length" or counted < 8, f"8 tokens generated but the reason is {finish.reason!r}"
        assert again == text, f"greedy generation differs between two runs: {text!r} != {again!r}"

    def check_cancel_ends_the_generation(self) -> None:
        """Cancelling the task that iterates a generation (as the kernel cancels one) ends it at once,
        its ``aclose`` is quick, and the engine goes on serving."""

        async def scenario(engine: AsyncEngine):
            state = {"seen": 0, "closed": None}
            two = trio.Event()

            async def consume(task_status=trio.TASK_STATUS_IGNORED) -> None:
                with trio.CancelScope() as scope:
                    task_status.started(scope)
                    events = engine.generate(Generation(prompt=PROMPTS[1], sampling=GREEDY, max_tokens=2000))
                    try:
                        async for event in events:
                            state["seen"] += isinstance(event, Text)
                            if state["seen"] == 2:
                                two.set()
                    finally:
                        with trio.CancelScope(shield=True):
                            started = time.monotonic()
                            await events.aclose()
                            state["closed"] = time.monotonic() - started

            async with trio.open_nursery() as nursery:
                scope = await nursery.start(consume)
                with trio.fail_after(120):
                    await two.wait()
                scope.cancel()
            text, _ = await _collect(engine, Generation(prompt=PROMPTS[0], sampling=GREEDY, max_tokens=4))
            return state, text

        state, text = self._run(scenario)
        assert state["seen"] >= 2, f"the generation ended before two pieces of text ({state['seen']})"
        assert state["closed"] is not None and state["closed"] < 2.0, f"closing took {state['closed']} s"
        assert text, "no text after a cancelled generation"

    def check_concurrent_generations_are_isolated(self) -> None:
        """Greedy generations run at once give each its solo text."""

        async def scenario(engine: AsyncEngine):
            solo = [(await _collect(engine, Generation(prompt=p, sampling=GREEDY, max_tokens=6)))[0] for p in PROMPTS]
            together: list[str] = [""] * len(PROMPTS)

            async def one(i: int) -> None:
                together[i] = (await _collect(engine, Generation(prompt=PROMPTS[i], sampling=GREEDY, max_tokens=6)))[0]

            async with trio.open_nursery() as nursery:
                for i in range(len(PROMPTS)):
                    nursery.start_soon(one, i)
            return solo, together

        solo, together = self._run(scenario)
        assert together == solo, f"concurrent generations differ from their solo runs: {together} != {solo}"

    # ---- kernel level ---------------------------------------------------------------------

    def check_kernel_requests_end_once(self) -> None:
        kernel_requests_end_once(self.backend, str(self.model), long_prompt=self.refuses_long_prompts)
