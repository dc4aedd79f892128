"""Batches that mix adapters give exactly what each request gets alone; admission between decode steps; cancel."""

from __future__ import annotations

import asyncio

import pytest

from app.inference import TextDelta
from tests.inference.conftest import collect, request, run_one_by_one, run_together

PROMPTS = ["hello", "the quick brown fox jumps", "a", "LoRA adapters, many of them, in one batch!", "xyz " * 9]


def mixed_requests(tokenizer, adapters, max_tokens=16):
    # Every adapter (different ranks and target modules) and the base model, with prompts of different lengths
    # so the batch is left-padded.
    choices = [None, *adapters]
    return [
        request(tokenizer, PROMPTS[i % len(PROMPTS)], choices[i % len(choices)], max_tokens=max_tokens + i % 3)
        for i in range(12)
    ]


def test_mixed_adapter_batch_equals_one_at_a_time(make_engine, tokenizer, adapters):
    requests = mixed_requests(tokenizer, adapters)
    batched_engine = make_engine(max_batch_size=16)
    batched = run_together(batched_engine, requests)
    alone = run_one_by_one(make_engine(max_batch_size=1), requests)
    assert batched == alone
    metrics = batched_engine.metrics()
    assert metrics["batch_size_sum"] / metrics["batch_size_count"] > 6  # they really were decoded together
    assert metrics["adapter_loads_total"] == len(adapters)
    # The adapters matter: the same prompt gives a different text on each adapter and on the base model.
    same_prompt = [request(tokenizer, "hello", adapter) for adapter in [None, *adapters]]
    texts = [text for text, _ in run_together(batched_engine, same_prompt)]
    assert len(set(texts)) == len(texts)


@pytest.mark.parametrize("scheduling", ["continuous", "static"])
def test_requests_join_a_running_batch_and_match_alone(make_engine, tokenizer, adapters, scheduling):
    engine = make_engine(max_batch_size=4, scheduling=scheduling)
    # min_tokens: the first request runs all 120 steps whatever it samples, so the others are short beside it,
    # with a wide margin for the event loop to submit them while it still decodes.
    first = request(tokenizer, "a long running request", adapters[0], max_tokens=120, min_tokens=120)
    later = [request(tokenizer, PROMPTS[i], [None, *adapters][i], max_tokens=6 + 3 * i) for i in range(5)]
    finish_order = []  # indexes into [first, *later], in the order their Finished events arrived

    async def finish(index, handle, head=""):
        text, finished = await collect(handle)
        finish_order.append(index)
        return head + text, finished

    async def main():
        handle = engine.submit(first)
        events = handle.__aiter__()
        head = await events.__anext__()  # the first request is decoding when the others arrive
        handles = [engine.submit(r) for r in later]
        return await asyncio.gather(
            finish(0, handle, head.text), *(finish(i, h) for i, h in enumerate(handles, start=1))
        )

    results = asyncio.run(main())
    alone = run_one_by_one(make_engine(max_batch_size=1), [first, *later])
    assert results == alone
    assert results[0][1].completion_tokens == 120
    metrics = engine.metrics()
    assert metrics["batch_size_bucket_le_1"] < metrics["batch_size_count"]  # some steps held several rows
    # Only continuous admission lets a request that arrives mid-decode join the running batch: the base-model
    # request (6 tokens, no adapter to load) then finishes long before the 120-token request it joined. A static
    # batch admits nobody until the running one is done, so the first request finishes before every later one.
    if scheduling == "continuous":
        assert finish_order.index(1) < finish_order.index(0), finish_order
    else:
        assert finish_order[0] == 0, finish_order


def test_static_and_per_adapter_policies_give_the_same_outputs(make_engine, tokenizer, adapters):
    requests = mixed_requests(tokenizer, adapters, max_tokens=8)
    expected = run_together(make_engine(max_batch_size=8), requests)
    for policy in ("static", "per_adapter"):
        assert run_together(make_engine(max_batch_size=8, scheduling=policy), requests) == expected


def test_cancel_frees_the_row_at_the_next_step(make_engine, tokenizer, adapters):
    engine = make_engine(max_batch_size=1)
    endless = request(tokenizer, "go on forever", adapters[1], max_tokens=1500)
    waiting = request(tokenizer, "hello", adapters[2], max_tokens=5)

    async def main():
        handle = engine.submit(endless)
        events = handle.__aiter__()
        await events.__anext__()
        queued = engine.submit(waiting)  # the only row is taken: this one waits
        await asyncio.sleep(0)
        handle.cancel()
        cancelled = await collect(handle)
        return cancelled, await collect(queued)

    (_, cancelled), (_, served) = asyncio.run(main())
    assert cancelled.finish_reason == "cancelled"
    assert cancelled.completion_tokens < 1500
    assert served.finish_reason == "length" and served.completion_tokens == 5
    metrics = engine.metrics()
    assert metrics["requests_cancelled_total"] == 1
    assert metrics["running_requests"] == 0 and metrics["queue_depth"] == 0


def test_a_request_cancelled_before_admission_costs_no_prefill(make_engine, tokenizer):
    engine = make_engine(max_batch_size=1)

    async def main():
        running = engine.submit(request(tokenizer, "first", max_tokens=30))
        await running.__aiter__().__anext__()
        queued = engine.submit(request(tokenizer, "second", max_tokens=30))
        queued.cancel()
        return await collect(queued), await collect(running)

    (text, finished), _ = asyncio.run(main())
    assert (text, finished.finish_reason, finished.completion_tokens) == ("", "cancelled", 0)
    assert engine.metrics()["prefills_total"] == 1


def test_stop_ends_running_and_waiting_requests_with_an_error(registry, tokenizer, adapters):
    from app.errors import ServiceUnavailable
    from app.inference import InferenceEngine, TextDelta

    engine = InferenceEngine(registry, max_batch_size=1)
    engine.start()
    running = engine.submit(request(tokenizer, "long", adapters[0], max_tokens=1500))
    assert isinstance(next(iter(running)), TextDelta)  # plain iteration works from a thread too
    waiting = engine.submit(request(tokenizer, "queued", max_tokens=5))
    engine.stop()
    for handle in (running, waiting):
        with pytest.raises(ServiceUnavailable):
            list(handle)
    assert engine.metrics()["requests_failed_total"] == 2
    with pytest.raises(ServiceUnavailable):
        engine.submit(request(tokenizer, "late"))


def test_another_projects_request_waits_for_one_free_row_not_a_whole_burst(make_engine, tokenizer):
    """Project a queues eight 100-token sequences on an engine of two rows; project b then asks for 2 tokens. b is
    admitted at the first free row (after a's first pair), so it finishes before any of a's later six; first come
    first served would have put it behind all eight (about 400 decode steps instead of about 100)."""
    engine = make_engine(max_batch_size=2, join_wait_steps=0)

    async def main() -> list[str]:
        finished: list[str] = []
        decoding = asyncio.Event()

        async def run(name: str, handle) -> None:
            async for event in handle:
                if isinstance(event, TextDelta):
                    decoding.set()
            finished.append(name)

        burst = [
            engine.submit(request(tokenizer, f"burst {i}", max_tokens=100, min_tokens=100, owner="a")) for i in range(8)
        ]
        tasks = [asyncio.ensure_future(run(f"a{i}", h)) for i, h in enumerate(burst)]
        await decoding.wait()  # a's first pair is decoding (100 steps to go), six of a's wait
        newcomer = engine.submit(request(tokenizer, "short", max_tokens=2, min_tokens=2, owner="b"))
        tasks.append(asyncio.ensure_future(run("b", newcomer)))
        await asyncio.gather(*tasks)
        return finished

    finished = asyncio.run(main())
    assert finished.index("b") <= 2, finished


def test_one_owner_may_have_only_so_many_sequences_waiting_and_a_request_is_taken_whole(make_engine, tokenizer):
    from app.errors import RateLimited

    engine = make_engine(max_batch_size=1, join_wait_steps=0, max_waiting_per_owner=3)

    def long(i, owner="a"):
        return request(tokenizer, f"p{i}", max_tokens=30, min_tokens=30, owner=owner)

    async def main():
        taken = engine.submit_all([long(0), long(1)])
        # Two more would make four: the whole request is refused at once, before anything of it is queued.
        with pytest.raises(RateLimited) as refused:
            engine.submit_all([long(2), long(3)])
        assert refused.value.headers()["Retry-After"] == "1"
        taken.append(engine.submit(long(4)))  # the third fits
        with pytest.raises(RateLimited):
            engine.submit(long(5))
        other = engine.submit(request(tokenizer, "other", max_tokens=2, owner="b"))  # b's allowance is its own
        results = await asyncio.gather(*(collect(h) for h in [*taken, other]))
        # Sequences that started (or ended) no longer count: the owner may submit again.
        again = await collect(engine.submit(long(6)))
        return results, again

    results, again = asyncio.run(main())
    assert [finished.finish_reason for _, finished in results] == ["length"] * 3 + ["length"]
    assert again[1].finish_reason == "length"
    base = long(0).base_model
    assert engine._allowance.waiting(("a", base)) == 0 and engine._allowance.waiting(("b", base)) == 0
