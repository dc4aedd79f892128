"""Serving throughput with many LoRA adapters: the engine against simpler servers, in one run.

Workload: the built-in tiny base model; 64 requests from 16 concurrent clients (asyncio tasks, each sending its
next request when the previous one finishes), prompts of 20-80 tokens, exactly 32 new tokens each (greedy,
`min_tokens=max_tokens=32`, so end-of-turn is suppressed and every request does the same work), adapters assigned
round-robin. Servers compared:
- engine: continuous batching, adapters mixed in one batch (the default);
- static: the same engine admitting a batch only when the previous one has finished;
- grouped: batches of one adapter at a time, switching between batches (the classic PEFT server);
- naive: one request at a time on a PEFT model holding every adapter, `set_adapter` + `generate` per request.
Adapters are resident before timing starts (a warm-up request each) except where the cold load itself is measured.
Each variant runs REPEATS times, interleaved, and keeps its best run (other load on the machine only slows runs).
Also: the cold-load cost (first 1-token request on an adapter minus the same request once resident) and the hit
overhead (a 1-token request on a resident adapter minus the same on the base model), medians in ms; and engine
throughput with 1, 8 and 64 adapters.

`--family NAME` serves the built-in family model `tiny-NAME` instead (its architecture and tokenizer; adapters
over all its linear layers). Its prompts are lengthened from their own words to as many tokens as tuneserve-tiny's
byte-level tokenizer gives them (`--same-text` keeps the text as it is), so every model serves the same token counts.

Usage: .venv/bin/python benchmarks/bench_serve.py [--family qwen2]
The last line is `rps_ratio_vs_naive=... rps_ratio_vs_grouped=... flatness_64_vs_1=... cold_load_ms=...
hit_overhead_ms=...` followed by more pairs.
"""

from __future__ import annotations

import os

# Spin-waiting OpenMP threads collapse under any CPU contention; every variant runs with the same setting.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import asyncio  # noqa: E402
import random  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from app.config import Settings  # noqa: E402
from app.inference import AdapterRef, Finished, GenerationRequest, InferenceEngine  # noqa: E402
from app.ml.chat import render_completion_prompt  # noqa: E402
from app.ml.families import FAMILIES  # noqa: E402
from app.ml.registry import BaseModelRegistry  # noqa: E402

TINY = "tuneserve-tiny"
REQUESTS = 64
CLIENTS = 16
NEW_TOKENS = 32
BATCH = 16
RANK = 16  # the tiny model's training default
REPEATS = 2


def build_adapters(base: str, base_dir: str, out: Path, count: int) -> list[AdapterRef]:
    """`count` random rank-16 all-linear adapters (one PEFT model, re-randomised and saved per adapter)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules="all-linear", lora_dropout=0.0)
    peft_model = get_peft_model(model, config)
    refs = []
    generator = torch.Generator().manual_seed(0)
    for i in range(count):
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_" in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
        path = out / f"adapter-{i}"
        peft_model.save_pretrained(path)
        refs.append(AdapterRef(name=f"ft:{base}:bench::{i:04d}", path=path))
    return refs


def make_workload(
    base: str, tokenizer, adapters: list[AdapterRef | None], match_tiny_lengths: bool = False
) -> list[GenerationRequest]:
    rng = random.Random(0)
    words = [
        "the",
        "of",
        "and",
        "a",
        "to",
        "in",
        "is",
        "you",
        "that",
        "it",
        "he",
        "was",
        "for",
        "on",
        "are",
        "as",
        "with",
        "his",
        "they",
        "at",
        "be",
        "this",
        "have",
        "from",
    ]
    requests = []
    for i in range(REQUESTS):
        text = " ".join(rng.choice(words) for _ in range(rng.randint(4, 16)))
        prompt_ids = render_completion_prompt(text, tokenizer)
        if match_tiny_lengths:
            # tuneserve-tiny's prompt: BOS and one token per byte. Lengthened from the prompt's own words.
            target, own_words, extra = len(text.encode()) + 1, text.split(), random.Random(i)
            while len(prompt_ids) < target:
                text += " " + extra.choice(own_words)
                prompt_ids = render_completion_prompt(text, tokenizer)
        requests.append(
            GenerationRequest(
                base_model=base,
                adapter=adapters[i % len(adapters)],
                prompt_ids=prompt_ids,
                max_tokens=NEW_TOKENS,
                min_tokens=NEW_TOKENS,
                temperature=0.0,
            )
        )
    return requests


async def drive(serve, requests: list[GenerationRequest]) -> tuple[float, list[float]]:
    """16 clients share the request list; returns (wall seconds, latency of each request)."""
    queue = list(reversed(requests))
    latencies: list[float] = []

    async def client():
        while queue:
            req = queue.pop()
            started = time.perf_counter()
            finished = await serve(req)
            assert finished.completion_tokens == NEW_TOKENS, finished
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(CLIENTS)))
    return time.perf_counter() - started, latencies


def engine_server(engine: InferenceEngine):
    async def serve(req):
        finished = None
        async for event in engine.submit(req):
            if isinstance(event, Finished):
                finished = event
        return finished

    return serve


class NaivePeftServer:
    """One request at a time on a PEFT model holding every adapter: switch adapter, `generate`, repeat."""

    def __init__(self, base_dir: str, adapters: list[AdapterRef]):
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        self.model = PeftModel.from_pretrained(model, adapters[0].path, adapter_name=adapters[0].name)
        for ref in adapters[1:]:
            self.model.load_adapter(ref.path, adapter_name=ref.name)
        self.model.eval()
        self.lock = threading.Lock()

    def generate(self, req: GenerationRequest) -> Finished:
        with self.lock, torch.inference_mode():
            self.model.set_adapter(req.adapter.name)
            ids = torch.tensor([req.prompt_ids])
            out = self.model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=req.max_tokens,
                min_new_tokens=req.min_tokens,
                do_sample=False,
            )
        return Finished("length", len(req.prompt_ids), out.shape[1] - ids.shape[1])

    def serve(self):
        async def serve(req):
            return await asyncio.to_thread(self.generate, req)

        return serve


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def one_token_latency(engine: InferenceEngine, base: str, tokenizer, adapter: AdapterRef | None) -> float:
    req = GenerationRequest(base, adapter, render_completion_prompt("latency probe", tokenizer), max_tokens=1)

    async def main():
        started = time.perf_counter()
        await engine_server(engine)(req)
        return time.perf_counter() - started

    return asyncio.run(main())


def warm(engine: InferenceEngine, base: str, tokenizer, adapters: list[AdapterRef]) -> None:
    for ref in adapters:
        one_token_latency(engine, base, tokenizer, ref)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=sorted(FAMILIES), help="serve tiny-FAMILY instead of tuneserve-tiny")
    parser.add_argument("--same-text", action="store_true", help="with --family: do not match tiny's token lengths")
    args = parser.parse_args()
    base = FAMILIES[args.family].model_name if args.family else TINY
    match = bool(args.family) and not args.same_text
    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as tmp:
        registry = BaseModelRegistry(Settings(data_dir=Path(tmp) / "data"))
        base_dir = registry.resolve(base).name_or_path
        adapters = build_adapters(base, base_dir, Path(tmp), 64)
        print(f"model: {base}")
        results: dict[str, tuple[float, list[float]]] = {}

        def record(label: str, outcome: tuple[float, list[float]], note: str = "") -> None:
            # Best of the repeats: other processes on the machine only ever slow a run down.
            print(f"{label:24s} {REQUESTS / outcome[0]:7.2f} req/s {note}")
            if label not in results or outcome[0] < results[label][0]:
                results[label] = outcome

        def run_engine(label: str, pool: list[AdapterRef], **options) -> None:
            engine = InferenceEngine(registry, max_batch_size=BATCH, **options)
            engine.start()
            tokenizer = engine.tokenizer(base)
            warm(engine, base, tokenizer, pool)
            outcome = asyncio.run(drive(engine_server(engine), make_workload(base, tokenizer, pool, match)))
            metrics = engine.metrics()
            engine.stop()
            record(label, outcome, f"mean decode batch {metrics['batch_size_sum'] / metrics['batch_size_count']:.2f}")

        eight = adapters[:8]
        engine = InferenceEngine(registry, max_batch_size=BATCH)
        engine.start()
        tokenizer = engine.tokenizer(base)
        # Cold load vs hit: adapters this engine has not seen, each measured against itself once resident.
        cold, hit, on_base = [], [], []
        for ref in adapters[8:24]:
            cold.append(one_token_latency(engine, base, tokenizer, ref))
            hit.append(one_token_latency(engine, base, tokenizer, ref))
            on_base.append(one_token_latency(engine, base, tokenizer, None))
        engine.stop()
        cold_load_ms = 1000 * statistics.median(c - h for c, h in zip(cold, hit, strict=True))
        hit_overhead_ms = 1000 * statistics.median(h - b for h, b in zip(hit, on_base, strict=True))
        print(f"cold load {cold_load_ms:.2f} ms over a resident hit; hit overhead {hit_overhead_ms:.2f} ms vs base")

        naive = NaivePeftServer(base_dir, eight)
        for _ in range(REPEATS):  # interleaved, so a burst of load elsewhere hits every variant alike
            run_engine("engine (8 adapters)", eight)
            run_engine("static batches", eight, scheduling="static")
            run_engine("grouped by adapter", eight, scheduling="per_adapter")
            run_engine("engine (1 adapter)", adapters[:1])
            run_engine("engine (64 adapters)", adapters)
            record("naive", asyncio.run(drive(naive.serve(), make_workload(base, tokenizer, eight, match))))

    rps = {label: REQUESTS / wall for label, (wall, _) in results.items()}
    for label, (_, latencies) in results.items():
        p50, p99 = percentile(latencies, 0.5), percentile(latencies, 0.99)
        print(f"{label:24s} latency p50 {1000 * p50:8.1f} ms  p99 {1000 * p99:8.1f} ms")
    main_latencies = results["engine (8 adapters)"][1]
    figures = {
        "rps_ratio_vs_naive": rps["engine (8 adapters)"] / rps["naive"],
        "rps_ratio_vs_grouped": rps["engine (8 adapters)"] / rps["grouped by adapter"],
        "flatness_64_vs_1": rps["engine (64 adapters)"] / rps["engine (1 adapter)"],
        "cold_load_ms": cold_load_ms,
        "hit_overhead_ms": hit_overhead_ms,
        "rps_ratio_vs_static": rps["engine (8 adapters)"] / rps["static batches"],
        "flatness_8_vs_1": rps["engine (8 adapters)"] / rps["engine (1 adapter)"],
        "engine_rps": rps["engine (8 adapters)"],
        "naive_rps": rps["naive"],
        "grouped_rps": rps["grouped by adapter"],
        "engine_p50_ms": 1000 * percentile(main_latencies, 0.5),
        "engine_p99_ms": 1000 * percentile(main_latencies, 0.99),
        "naive_p50_ms": 1000 * percentile(results["naive"][1], 0.5),
        "naive_p99_ms": 1000 * percentile(results["naive"][1], 0.99),
        "grouped_p50_ms": 1000 * percentile(results["grouped by adapter"][1], 0.5),
        "grouped_p99_ms": 1000 * percentile(results["grouped by adapter"][1], 0.99),
    }
    print(" ".join(f"{name}={value:.2f}" for name, value in figures.items()))


if __name__ == "__main__":
    main()
