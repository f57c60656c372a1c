"""Many predictions on one model at once: batching exactness, cancellation, queue limits, load."""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time

import pytest

import lmkernel as lms

from ..conftest import TINY

PROMPTS = [
    "The cat sat on the",
    "Once upon a time there was",
    "$ ls -l\n",
    "Why is the sun so big and the moon so",
    "1 2 3 4 5",
    "The king and the queen",
    "A long time ago in a city by the river the teacher said",
    "Hello",
]


def solo(model, prompt: str, **config) -> str:
    return model.complete(prompt, config={"temperature": 0, **config}).content


def test_eight_concurrent_greedy_streams_equal_their_solo_runs(tiny_model):
    configs = [{"maxTokens": 10 + 3 * i} for i in range(len(PROMPTS))]
    configs[2]["stopStrings"] = ["\n"]
    unstopped = solo(tiny_model, PROMPTS[5], **configs[5])
    configs[5]["stopStrings"] = [unstopped[len(unstopped) // 2 :][:2]]
    alone = [solo(tiny_model, p, **c) for p, c in zip(PROMPTS, configs)]
    results: dict[int, lms.PredictionResult] = {}
    fragments: dict[int, list[str]] = {i: [] for i in range(len(PROMPTS))}
    barrier = threading.Barrier(len(PROMPTS))

    def run(i: int) -> None:
        barrier.wait()
        stream = tiny_model.complete_stream(
            PROMPTS[i], config={"temperature": 0, **configs[i]},
            on_prediction_fragment=lambda f: fragments[i].append(f.content),
        )
        for _ in stream:
            pass
        results[i] = stream.result()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for i in range(len(PROMPTS)):
        assert results[i].content == alone[i], PROMPTS[i]
        assert "".join(fragments[i]) == alone[i]
        stats = results[i].stats
        assert stats.predicted_tokens_count <= configs[i]["maxTokens"]
        if stats.stop_reason == "maxPredictedTokensReached":
            assert stats.predicted_tokens_count == configs[i]["maxTokens"]
    assert results[5].stats.stop_reason == "stopStringFound"


def test_cancel_during_prompt_processing_leaves_the_others_untouched(tiny_model):
    long_prompt = "the dog ran home " * 700  # ~2800 tokens: several 512-token prefill chunks
    expected = solo(tiny_model, PROMPTS[0], maxTokens=60)
    other = tiny_model.complete_stream(PROMPTS[0], config={"temperature": 0, "maxTokens": 60})
    other.start()
    progress: list[float] = []
    stream = tiny_model.complete_stream(long_prompt, config={"maxTokens": 5},
                                        on_prompt_processing_progress=progress.append)
    started = time.perf_counter()
    for _ in stream:
        pass
    # Cancelled from the consumer as soon as prompt processing has visibly begun.
    assert stream.result().stats.stop_reason in ("maxPredictedTokensReached", "eosFound")
    full_time = time.perf_counter() - started

    progress.clear()
    stream = tiny_model.complete_stream(long_prompt, config={"maxTokens": 5},
                                        on_prompt_processing_progress=progress.append)
    started = time.perf_counter()
    stream.start()
    while not progress or progress[-1] == 0.0:
        event = stream._inbox.get(30)
        stream._state.handle(event)
    stream.cancel()
    result = stream.wait_for_result()
    cancel_time = time.perf_counter() - started
    assert result.stats.stop_reason == "userStopped" and result.content == ""
    assert 0 < progress[-1] < 1.0
    assert cancel_time < full_time
    assert other.wait_for_result().content == expected


def test_a_cancelled_asyncio_task_cancels_only_its_stream(tiny_model):
    expected = [solo(tiny_model, p, maxTokens=30) for p in PROMPTS[:3]]

    async def main():
        async with lms.AsyncClient() as client:
            model = await client.llm.model(TINY)

            async def consume(prompt):
                stream = await model.complete_stream(prompt, config={"temperature": 0, "maxTokens": 30})
                async for _ in stream:
                    await asyncio.sleep(0)
                return stream.result().content

            # Greedy, so it cannot end early by sampling an end token; 4000 tokens to go.
            victim_stream = await model.complete_stream(PROMPTS[0], config={"maxTokens": 100_000,
                                                                            "temperature": 0})
            streaming = asyncio.Event()

            async def victim():
                async for _ in victim_stream:
                    streaming.set()

            tasks = [asyncio.create_task(consume(p)) for p in PROMPTS[:3]]
            doomed = asyncio.create_task(victim())
            await streaming.wait()
            doomed.cancel()
            with pytest.raises(asyncio.CancelledError):
                await doomed
            assert victim_stream.result().stats.stop_reason == "userStopped"
            return await asyncio.gather(*tasks)

    assert asyncio.run(main()) == expected


def test_queue_limit_refuses_with_a_clear_error():
    with lms.Client() as client:
        model = client.llm.load_new_instance(
            TINY, "tiny-q", config={"maxConcurrentPredictions": 1, "maxQueuedPredictions": 1}
        )
        try:
            running = model.complete_stream("The cat", config={"maxTokens": 100_000})
            running.start()
            waiting = model.complete_stream("The cat", config={"maxTokens": 3})
            waiting.start()
            refused = model.complete_stream("The cat", config={"maxTokens": 3})
            with pytest.raises(lms.LMKernelQueueFullError) as info:
                refused.wait_for_result()
            assert str(info.value) == (
                "Model 'tiny-q' has 1 predictions running and 1 waiting, its queue limit "
                "(maxQueuedPredictions=1); retry later, or load it with a larger maxQueuedPredictions"
            )
            running.cancel()
            assert running.wait_for_result().stats.stop_reason == "userStopped"
            assert waiting.wait_for_result().stats.predicted_tokens_count <= 3  # it got its turn
        finally:
            model.unload()


def test_load_64_streams_with_cancellations_and_a_failing_callback(tiny_model, caplog):
    rng = random.Random(7)
    jobs = [(PROMPTS[i % len(PROMPTS)], rng.choice([4, 9, 16, 25, 40])) for i in range(64)]
    expected = {job: solo(tiny_model, job[0], maxTokens=job[1]) for job in set(jobs)}
    cancel_after = {i: rng.randint(0, 3) for i in rng.sample(range(64), 16)}
    raising = 5

    def explode(_fragment):
        raise RuntimeError("user callback bug")

    async def main():
        async with lms.AsyncClient() as client:
            model = await client.llm.model(TINY)

            async def run(i):
                prompt, n = jobs[i]
                stream = await model.complete_stream(
                    prompt, config={"temperature": 0, "maxTokens": n},
                    on_prediction_fragment=explode if i == raising else None,
                )
                seen = 0
                async for _ in stream:
                    if i in cancel_after and seen >= cancel_after[i]:
                        await stream.cancel()
                    seen += 1
                return stream.result()

            return await asyncio.gather(*(run(i) for i in range(64)))

    started = time.perf_counter()
    with caplog.at_level(logging.ERROR, logger="lmkernel"):
        results = asyncio.run(main())
    assert time.perf_counter() - started < 120
    for i, result in enumerate(results):
        if i in cancel_after and result.stats.stop_reason == "userStopped":
            assert expected[jobs[i]].startswith(result.content)
        else:
            assert result.content == expected[jobs[i]], i
    assert "on_prediction_fragment callback failed" in caplog.text


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="reads /proc")
def test_no_leak_after_1000_start_cancel_cycles(tiny_model, transport):
    from lmkernel.kernel.runtime import default_kernel

    def cycle(i: int) -> None:
        stream = tiny_model.complete_stream("The cat sat", config={"maxTokens": 1000})
        if i % 2:
            stream.start()
            stream.cancel()
            assert stream.wait_for_result().stats.stop_reason in ("userStopped", "eosFound")
        else:
            for _ in stream:
                break
            assert stream.result().stats.stop_reason in ("userStopped", "eosFound")

    for i in range(100):  # warm up allocators and caches
        cycle(i)
    threads, rss = threading.active_count(), _rss_mb()
    for i in range(1000):
        cycle(i)
    assert threading.active_count() <= threads
    assert _rss_mb() - rss < 40, (rss, _rss_mb())
    if transport == "in-process":
        actors = default_kernel().kernel._actors
        assert all(not a._runs and not a._running and not a._waiting for a in actors)
