"""Logprobs from the engine equal PEFT's log-softmax over the same tokens: generated tokens and prompt scoring,
in a batch that mixes adapters, the base model and requests that ask for nothing."""

from __future__ import annotations

import asyncio

import pytest
import torch

from app.inference import Finished, TextDelta
from tests.inference.conftest import TINY, request

pytestmark = pytest.mark.slow
PROMPTS = ["The capital of France is", "def add(a, b):", "Once upon a time, in a land far", "0 1 2 3"]


@pytest.fixture(scope="module")
def peft_models(registry, adapters):
    """A `PeftModel` per adapter (float32, CPU) and the bare base model under None."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_dir = registry.resolve(TINY).name_or_path
    models = {None: AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()}
    for ref in adapters[:2]:
        base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        models[ref.name] = PeftModel.from_pretrained(base, ref.path).eval()
    return models


def reference(model, ids: list[int]) -> torch.Tensor:
    """log-softmax [len(ids) - 1, vocab]: row j scores token j + 1 given the ones before it."""
    with torch.inference_mode():
        return torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, :-1].float(), dim=-1)


def run(engine, requests):
    """Every request's (generated token logprobs, Finished), submitted together."""

    async def read(handle):
        scored = []
        async for event in handle:
            if isinstance(event, TextDelta):
                scored += event.logprobs
            else:
                assert isinstance(event, Finished)
                return scored, event

    async def main():
        handles = [engine.submit(r) for r in requests]
        return await asyncio.gather(*(read(h) for h in handles))

    return asyncio.run(main())


def check(scores, expected: torch.Tensor, top: int) -> None:
    """Each TokenLogprob against the reference row: its own logprob, and the same top-k set with the same values."""
    assert len(scores) == expected.shape[0]
    for score, row in zip(scores, expected, strict=True):
        assert score.logprob == pytest.approx(row[score.token].item(), abs=1e-4)
        assert len(score.top) == top
        values, ids = torch.topk(row, top)
        assert {t for t, _ in score.top} == set(ids.tolist())
        assert [v for _, v in score.top] == pytest.approx(values.tolist(), abs=1e-4)


def test_mixed_batch_reports_peft_logprobs_of_prompt_and_completion(engine, tokenizer, adapters, peft_models):
    """Base, two adapters and a request without logprobs in one batch, all prompts of different lengths: each
    request's prompt and completion logprobs equal its own model's log-softmax over the same tokens."""
    owners = [None, adapters[0], adapters[1], adapters[0]]
    requests = [
        request(tokenizer, text, adapter, max_tokens=5, logprobs=3, prompt_logprobs=True)
        for text, adapter in zip(PROMPTS, owners, strict=True)
    ]
    requests.append(request(tokenizer, "no logprobs here", adapters[1], max_tokens=5))
    results = run(engine, requests)
    for req, (scores, finished) in zip(requests[:4], results[:4], strict=True):
        model = peft_models[req.adapter.name if req.adapter else None]
        generated = [s.token for s in scores]
        assert len(generated) == finished.completion_tokens > 0
        expected = reference(model, req.prompt_ids + generated)
        prompt_len = len(req.prompt_ids)
        check(finished.prompt_logprobs, expected[: prompt_len - 1], 3)
        check(scores, expected[prompt_len - 1 :], 3)
        # Greedy decoding picks the likeliest token, so each generated token tops its own list.
        assert all(s.top[0][0] == s.token for s in scores)
    no_logprobs, finished = results[4]
    assert no_logprobs == [] and finished.prompt_logprobs is None


def test_logprobs_are_of_the_model_before_temperature(engine, tokenizer, adapters, peft_models):
    """Sampled at temperature 1.3 and top_p 0.9, the reported logprobs are still the model's own distribution."""
    req = request(tokenizer, PROMPTS[1], adapters[1], max_tokens=6, temperature=1.3, top_p=0.9, seed=7, logprobs=0)
    [(scores, finished)] = run(engine, [req])
    expected = reference(peft_models[adapters[1].name], req.prompt_ids + [s.token for s in scores])
    check(scores, expected[len(req.prompt_ids) - 1 :], 0)
    assert finished.prompt_logprobs is None


def test_max_tokens_zero_scores_the_prompt_only(engine, tokenizer, adapters, peft_models):
    """lm-eval's loglikelihood requests: many prompts scored in one batch, nothing generated."""
    requests = [
        request(tokenizer, text, adapters[0], max_tokens=0, logprobs=1, prompt_logprobs=True) for text in PROMPTS
    ]
    for req, (scores, finished) in zip(requests, run(engine, requests), strict=True):
        assert scores == [] and finished.completion_tokens == 0 and finished.finish_reason == "length"
        check(finished.prompt_logprobs, reference(peft_models[adapters[0].name], req.prompt_ids), 1)


def test_max_tokens_zero_needs_prompt_logprobs(engine, tokenizer):
    from app.errors import InvalidRequest

    with pytest.raises(InvalidRequest, match="max_tokens"):
        engine.submit(request(tokenizer, "hi", max_tokens=0, logprobs=1))
