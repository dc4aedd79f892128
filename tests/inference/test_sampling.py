"""Per-request sampling and the text stream: seeds, stop strings, end-of-turn, max_tokens, UTF-8."""

from __future__ import annotations

from app.inference.text_stream import IncrementalDetokenizer, StopStringFilter
from tests.inference.conftest import EOS_MODEL, request, run_one_by_one, run_together


def test_same_seed_same_text_alone_or_in_a_batch(engine, tokenizer, adapters):
    sampled = request(tokenizer, "sample me", adapters[0], temperature=1.0, top_p=0.9, seed=7, max_tokens=24)
    others = [request(tokenizer, f"noise {i}", adapters[i % 4], max_tokens=24) for i in range(5)]
    alone = run_one_by_one(engine, [sampled, sampled])
    in_batch = run_together(engine, [*others, sampled])[-1]
    assert alone[0] == alone[1] == in_batch
    other_seed = request(tokenizer, "sample me", adapters[0], temperature=1.0, top_p=0.9, seed=8, max_tokens=24)
    assert run_together(engine, [other_seed])[0][0] != alone[0][0]
    greedy = request(tokenizer, "sample me", adapters[0], max_tokens=24)
    assert run_together(engine, [greedy])[0][0] != alone[0][0]  # temperature 1 really samples


def test_max_tokens_ends_with_length_and_usage(engine, tokenizer):
    req = request(tokenizer, "count me", max_tokens=7)
    text, finished = run_together(engine, [req])[0]
    assert finished.finish_reason == "length"
    assert (finished.prompt_tokens, finished.completion_tokens) == (len(req.prompt_ids), 7)
    metrics = engine.metrics()
    assert metrics["requests_finished_length_total"] == 1
    assert metrics["generated_tokens_total"] == 7 and metrics["prompt_tokens_total"] == len(req.prompt_ids)


def test_stop_string_cuts_the_text_before_it(engine, tokenizer, adapters):
    plain = request(tokenizer, "the quick brown fox", adapters[1], max_tokens=30)
    full, _ = run_together(engine, [plain])[0]
    stop = full[6:8]
    assert stop and stop in full
    stopped = request(tokenizer, "the quick brown fox", adapters[1], max_tokens=30, stop=["never there", stop])
    text, finished = run_together(engine, [stopped])[0]
    assert text == full[: full.index(stop)]
    assert finished.finish_reason == "stop"
    assert finished.completion_tokens < 30


def test_end_of_turn_token_stops_and_min_tokens_defers_it(engine, tokenizer):
    # On this model EOS is always the most likely token.
    text, finished = run_together(engine, [request(tokenizer, "hi", base_model=EOS_MODEL, max_tokens=10)])[0]
    assert (text, finished.finish_reason, finished.completion_tokens) == ("", "stop", 1)
    deferred = request(tokenizer, "hi", base_model=EOS_MODEL, max_tokens=10, min_tokens=3)
    _, finished = run_together(engine, [deferred])[0]
    assert (finished.finish_reason, finished.completion_tokens) == ("stop", 4)
    assert engine.metrics()["requests_finished_stop_total"] == 2


def test_incremental_detokenization_never_splits_a_character(tokenizer):
    text = "héllo wörld, 世界 🎉 ok"
    detokenizer = IncrementalDetokenizer(tokenizer)
    pieces = [detokenizer.add(i) for i in tokenizer(text, add_special_tokens=False)["input_ids"]]
    pieces.append(detokenizer.flush())
    assert "".join(pieces) == text
    assert all("\ufffd" not in piece for piece in pieces)
    assert len([p for p in pieces if p]) > 10  # it streams, it does not wait for the end


def test_stop_filter_holds_back_a_possible_stop_and_releases_it():
    stop_filter = StopStringFilter(["END", "##"])
    assert stop_filter.feed("abc E") == "abc "
    assert stop_filter.feed("N") == ""
    assert stop_filter.feed("x#") == "ENx"
    assert stop_filter.feed("y") == "#y"
    assert stop_filter.feed("zE") == "z"
    assert stop_filter.finish() == "E"
    spanning = StopStringFilter(["END"])
    assert spanning.feed("aE") + spanning.feed("N") + spanning.feed("Dtail") == "a"
    assert spanning.stopped and spanning.finish() == ""


def test_a_sequence_that_goes_non_finite_fails_alone(engine, tokenizer, adapters, models_dir):
    """A corrupt adapter (NaN in a LoRA factor) makes its row's logits NaN: that request fails with
    generation_failed, and the requests it shared the batch with finish exactly as they would alone (a NaN used
    to fail the whole running batch, other projects' streams included)."""
    import asyncio
    import shutil

    from safetensors.torch import load_file, save_file

    from app.errors import ServiceUnavailable
    from app.inference import AdapterRef
    from tests.inference.conftest import TINY, collect, run_one_by_one

    corrupt_dir = models_dir / "adapter-nan"
    if not corrupt_dir.exists():
        shutil.copytree(adapters[0].path, corrupt_dir)
        weights = load_file(corrupt_dir / "adapter_model.safetensors")
        key = next(k for k in sorted(weights) if k.endswith("lora_B.weight"))
        weights[key][0, 0] = float("nan")
        save_file(weights, corrupt_dir / "adapter_model.safetensors")
    corrupt = AdapterRef(name=f"ft:{TINY}:test::nan", path=corrupt_dir)
    healthy = [request(tokenizer, "the base model", max_tokens=20), request(tokenizer, "an adapter", adapters[1])]
    alone = run_one_by_one(engine, healthy)

    async def together():
        handles = [engine.submit(r) for r in [healthy[0], request(tokenizer, "corrupt", corrupt), healthy[1]]]
        return await asyncio.gather(*(collect(h) for h in handles), return_exceptions=True)

    first, broken, last = asyncio.run(together())
    assert isinstance(broken, ServiceUnavailable) and broken.code == "generation_failed"
    assert [first, last] == alone
