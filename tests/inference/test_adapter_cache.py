"""The adapter cache: LRU by count and bytes, reloads, single-flight loads, explicit eviction, refusals."""

from __future__ import annotations

import asyncio
import json
import shutil
import threading

import pytest

from app.errors import InvalidRequest, NotFound
from app.inference import AdapterRef
from tests.inference.conftest import EOS_MODEL, TINY, collect, request, run_together


def test_lru_by_count_evicts_the_coldest_and_reloads_it_identically(make_engine, tokenizer, adapters):
    engine = make_engine(max_batch_size=4, max_adapters=2)
    first = [run_together(engine, [request(tokenizer, "same prompt", a)])[0] for a in adapters[:3]]
    assert engine.resident_adapters() == [adapters[1].name, adapters[2].name]
    metrics = engine.metrics()
    assert (metrics["adapter_loads_total"], metrics["adapter_evictions_total"]) == (3, 1)
    assert metrics["adapters_resident"] == 2
    # Reloaded into a reused slot (which held an adapter of another rank): the same text as the first time.
    assert run_together(engine, [request(tokenizer, "same prompt", adapters[0])])[0] == first[0]
    assert engine.resident_adapters() == [adapters[2].name, adapters[0].name]
    metrics = engine.metrics()
    assert (metrics["adapter_loads_total"], metrics["adapter_evictions_total"]) == (4, 2)
    assert metrics["adapter_cache_misses_total"] == 4 and metrics["adapter_cache_hits_total"] == 0
    run_together(engine, [request(tokenizer, "again", adapters[0])])
    assert engine.metrics()["adapter_cache_hits_total"] == 1


def test_lru_by_bytes(make_engine, tokenizer, adapters):
    probe = make_engine()
    run_together(probe, [request(tokenizer, "x", adapters[1])])
    one_adapter = probe.metrics()["adapter_bytes_resident"]
    assert one_adapter > 0
    engine = make_engine(max_adapter_bytes=int(one_adapter * 1.5))
    texts = [run_together(engine, [request(tokenizer, "bytes", a)])[0] for a in (adapters[1], adapters[3])]
    assert engine.resident_adapters() == [adapters[3].name]
    assert engine.metrics()["adapter_bytes_resident"] == one_adapter
    assert run_together(engine, [request(tokenizer, "bytes", adapters[1])])[0] == texts[0]
    assert engine.metrics()["adapter_evictions_total"] == 2


def test_lora_table_bytes_count_the_padded_slot_tables(make_engine, tokenizer, adapters):
    engine = make_engine()
    run_together(engine, [request(tokenizer, "x")])
    assert engine.metrics()["lora_table_bytes"] == 0  # the base model alone needs no tables
    run_together(engine, [request(tokenizer, "x", adapters[0])])  # rank 4 on every linear layer
    rank_4 = engine.metrics()["adapter_bytes_resident"]
    # Two slots (the base model's zeros and the adapter's) of rank 4: twice the adapter's own factors.
    assert engine.metrics()["lora_table_bytes"] == 2 * rank_4 > 0
    run_together(engine, [request(tokenizer, "x", adapters[1])])  # rank 8 on every linear layer
    # Three slots round up to four, each padded to rank 8: 8x the rank-4 adapter, while 3x that is resident.
    assert engine.metrics()["adapter_bytes_resident"] == 3 * rank_4
    assert engine.metrics()["lora_table_bytes"] == 8 * rank_4


def test_adapters_in_use_are_not_evicted(make_engine, tokenizer, adapters):
    engine = make_engine(max_adapters=1)
    requests = [request(tokenizer, "busy", a, max_tokens=20) for a in adapters]
    alone = [run_together(make_engine(), [r])[0] for r in requests]
    # Four adapters in one batch with room for one: all run (over the bound while in use), then it shrinks back.
    assert run_together(engine, requests) == alone
    assert engine.metrics()["adapters_resident"] == 1


def test_concurrent_first_requests_load_an_adapter_once(engine, tokenizer, adapters):
    requests = [request(tokenizer, f"client {i}", adapters[2]) for i in range(8)]
    results = run_together(engine, requests)
    assert all(finished.finish_reason == "length" for _, finished in results)
    metrics = engine.metrics()
    assert metrics["adapter_loads_total"] == 1
    assert metrics["adapter_load_seconds_count"] == 1 and metrics["adapter_load_seconds_sum"] > 0
    assert metrics["adapter_cache_misses_total"] + metrics["adapter_cache_hits_total"] == 8


def damage_adapter(ref: AdapterRef, damage: str) -> str:
    """Break the weights of `ref` in place; returns a fragment of the error message the damage must produce."""
    from safetensors.torch import load_file, save_file

    weights = ref.path / "adapter_model.safetensors"
    if damage == "corrupt":
        weights.write_bytes(b"\x80\x04not a safetensors file")
        return "unreadable"
    tensors = load_file(weights)
    key = next(k for k in sorted(tensors) if k.endswith("lora_A.weight"))
    tensors[key] = tensors[key][:, :-1].contiguous()  # one input feature short of the base layer
    save_file(tensors, weights)
    return "do not fit"


@pytest.mark.parametrize("damage", ["corrupt", "wrong_shapes"])
def test_a_failed_first_load_fails_every_concurrent_waiter_once(
    engine, tokenizer, adapters, tmp_path, monkeypatch, damage
):
    from app.inference import engine as engine_module

    bad = copy_adapter(adapters[0], tmp_path / "bad", f"ft:bad-{damage}")
    message = damage_adapter(bad, damage)
    # Hold the one load at a gate until every request has attached to it, so they are truly concurrent.
    gate = threading.Event()
    attempts = []
    read_adapter = engine_module.read_adapter

    def gated_read(ref, *args, **kwargs):
        attempts.append(ref.name)
        gate.wait(60)
        return read_adapter(ref, *args, **kwargs)

    monkeypatch.setattr(engine_module, "read_adapter", gated_read)
    engine.tokenizer(TINY)  # base model loaded: `submit` claims the adapter at once, on this thread
    waiters = 6

    async def outcome(handle):
        try:
            return await collect(handle)
        except Exception as exc:
            return exc

    async def main():
        handles = [engine.submit(request(tokenizer, f"client {i}", bad)) for i in range(waiters)]
        gate.set()
        # A waiter that never hears of the failure would hang here: fail fast instead of at the pytest timeout.
        return await asyncio.wait_for(asyncio.gather(*(outcome(h) for h in handles)), timeout=20)

    outcomes = asyncio.run(main())
    assert all(isinstance(o, InvalidRequest) for o in outcomes), outcomes
    assert all(o.param == "model" and message in o.message for o in outcomes), [o.message for o in outcomes]
    assert attempts == [bad.name]  # one attempt for all six
    metrics = engine.metrics()
    assert metrics["adapter_cache_misses_total"] == waiters and metrics["adapter_cache_hits_total"] == 0
    assert (metrics["adapter_load_failures_total"], metrics["adapter_loads_total"]) == (1, 0)
    assert metrics["requests_failed_total"] == waiters
    assert engine.resident_adapters() == []
    # The failure is not cached: the next request tries again (and fails again); a good adapter still loads.
    assert message in expect_error(engine, request(tokenizer, "retry", bad), InvalidRequest).message
    assert attempts == [bad.name, bad.name]
    (_, finished) = run_together(engine, [request(tokenizer, "good", adapters[0])])[0]
    assert finished.finish_reason == "length"
    assert engine.metrics()["adapter_loads_total"] == 1 and engine.resident_adapters() == [adapters[0].name]


def test_explicit_evict_forces_a_reload(engine, tokenizer, adapters):
    req = request(tokenizer, "evict me", adapters[0])
    before = run_together(engine, [req])[0]
    engine.evict(adapters[0].name)
    assert engine.resident_adapters() == []
    assert run_together(engine, [req])[0] == before
    assert engine.metrics()["adapter_loads_total"] == 2
    engine.evict("ft:never-loaded")  # evicting an unknown name is a no-op


def expect_error(engine, req, error_type):
    async def main():
        return await collect(engine.submit(req))

    with pytest.raises(error_type) as caught:
        asyncio.run(main())
    assert caught.value.param == "model"
    return caught.value


def copy_adapter(source: AdapterRef, target, name: str) -> AdapterRef:
    shutil.copytree(source.path, target)
    return AdapterRef(name=name, path=target)


def test_adapter_of_another_base_model_is_refused(engine, tokenizer, adapters, tmp_path):
    error = expect_error(engine, request(tokenizer, "hi", adapters[0], base_model=EOS_MODEL), InvalidRequest)
    assert "tuneserve-tiny" in error.message or "trained on" in error.message
    foreign = copy_adapter(adapters[0], tmp_path / "foreign", "ft:foreign")
    config = json.loads((foreign.path / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "meta-llama/Llama-3.2-1B"
    (foreign.path / "adapter_config.json").write_text(json.dumps(config))
    error = expect_error(engine, request(tokenizer, "hi", foreign), InvalidRequest)
    assert "meta-llama/Llama-3.2-1B" in error.message
    # The refused adapter is not cached as loaded; a good one still works afterwards.
    metrics = engine.metrics()
    assert metrics["adapter_load_failures_total"] == 2 and metrics["adapters_resident"] == 0
    assert run_together(engine, [request(tokenizer, "hi", adapters[0])])[0][1].finish_reason == "length"


def test_only_safetensors_and_existing_files_are_served(engine, tokenizer, adapters, tmp_path):
    pickled = copy_adapter(adapters[0], tmp_path / "pickled", "ft:pickled")
    (pickled.path / "adapter_model.safetensors").rename(pickled.path / "adapter_model.bin")
    error = expect_error(engine, request(tokenizer, "hi", pickled), InvalidRequest)
    assert "safetensors" in error.message
    missing = AdapterRef(name="ft:missing", path=tmp_path / "nowhere")
    expect_error(engine, request(tokenizer, "hi", missing), NotFound)
    corrupt = copy_adapter(adapters[0], tmp_path / "corrupt", "ft:corrupt")
    (corrupt.path / "adapter_model.safetensors").write_bytes(b"\x80\x04not a safetensors file")
    assert "unreadable" in expect_error(engine, request(tokenizer, "hi", corrupt), InvalidRequest).message
    dora = copy_adapter(adapters[0], tmp_path / "dora", "ft:dora")
    config = json.loads((dora.path / "adapter_config.json").read_text())
    (dora.path / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    assert "use_dora" in expect_error(engine, request(tokenizer, "hi", dora), InvalidRequest).message


def test_unknown_base_and_oversized_requests_fail_at_submit(engine, tokenizer):
    with pytest.raises(NotFound) as caught:
        engine.submit(request(tokenizer, "hi", base_model="no-such-model"))
    assert caught.value.param == "model"
    assert engine.context_length("tuneserve-tiny") == 2048
    with pytest.raises(InvalidRequest) as caught:
        engine.submit(request(tokenizer, "hi", max_tokens=5000))
    assert caught.value.param == "max_tokens"
