"""Prompt scoring (lm-eval's loglikelihood requests) through the engine against scoring one at a time with PEFT.

Workload: the built-in tiny base model and one random rank-16 adapter; 200 requests as lm-eval's
`local-completions` sends them (the prompt scored with echo, logprobs 1, max_tokens 1, greedy), prompts of 30-90
tokens. The engine gets all 200 at once (lm-eval batches and runs requests concurrently) and batches their prompt
scoring in its prefills; the baseline scores each with one forward of a `PeftModel` (log-softmax over the
prompt, the top-1 of each position, the next token), which is what a script without a server would do. Each runs
REPEATS times, interleaved, keeping its best run.

Usage: .venv/bin/python benchmarks/bench_scoring.py
The last line is `scoring_rps_ratio_vs_peft=...`.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import asyncio  # noqa: E402
import random  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from bench_serve import build_adapters  # noqa: E402

from app.config import Settings  # noqa: E402
from app.inference import Finished, GenerationRequest, InferenceEngine  # noqa: E402
from app.ml.registry import BaseModelRegistry  # noqa: E402

TINY = "tuneserve-tiny"
REQUESTS = 200
REPEATS = 2


def prompts(vocab: int) -> list[list[int]]:
    rng = random.Random(0)
    return [[rng.randrange(vocab) for _ in range(rng.randint(30, 90))] for _ in range(REQUESTS)]


def engine_run(engine: InferenceEngine, adapter, ids: list[list[int]]) -> tuple[float, list[list[float]]]:
    async def main():
        handles = [
            engine.submit(
                GenerationRequest(TINY, adapter, p, max_tokens=1, temperature=0.0, logprobs=1, prompt_logprobs=True)
            )
            for p in ids
        ]
        scores = []
        for handle in handles:
            async for event in handle:
                if isinstance(event, Finished):
                    scores.append([s.logprob for s in event.prompt_logprobs or []])
        return scores

    start = time.perf_counter()
    scores = asyncio.run(main())
    return time.perf_counter() - start, scores


def peft_run(model, ids: list[list[int]]) -> tuple[float, list[list[float]]]:
    start = time.perf_counter()
    scores = []
    with torch.inference_mode():
        for p in ids:
            logprobs = torch.log_softmax(model(input_ids=torch.tensor([p])).logits[0].float(), dim=-1)
            logprobs.max(dim=-1)  # the top-1 of each position, as the response reports it
            int(logprobs[-1].argmax())  # the one generated token
            scores.append(logprobs[:-1].gather(1, torch.tensor(p[1:]).unsqueeze(1)).squeeze(1).tolist())
    return time.perf_counter() - start, scores


def main() -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    with tempfile.TemporaryDirectory() as tmp:
        registry = BaseModelRegistry(Settings(data_dir=Path(tmp) / "data"))
        base_dir = registry.resolve(TINY).name_or_path
        [adapter] = build_adapters(TINY, base_dir, Path(tmp), 1)
        model = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), adapter.path
        ).eval()
        ids = prompts(256)
        engine = InferenceEngine(registry, max_batch_size=16, device=torch.device("cpu"), dtype=torch.float32)
        engine.start()
        try:
            engine_run(engine, adapter, ids[:4])  # load the base model and the adapter
            engine_times, peft_times = [], []
            for _ in range(REPEATS):
                seconds, served = engine_run(engine, adapter, ids)
                engine_times.append(seconds)
                seconds, expected = peft_run(model, ids)
                peft_times.append(seconds)
        finally:
            engine.stop()
    worst = max(abs(a - b) for s, e in zip(served, expected, strict=True) for a, b in zip(s, e, strict=True))
    engine_rps, peft_rps = REQUESTS / min(engine_times), REQUESTS / min(peft_times)
    print(f"engine: {engine_rps:.1f} req/s; peft one at a time: {peft_rps:.1f} req/s; max |logprob diff| {worst:.2e}")
    print(f"scoring_rps_ratio_vs_peft={engine_rps / peft_rps:.2f}")


if __name__ == "__main__":
    main()
