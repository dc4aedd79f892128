"""Log-probabilities as clients read them (OpenAI's `logprobs`, lm-eval's loglikelihoods): of the model's own
distribution, taken from the raw logits before temperature, top_p or suppressed stop ids change what is sampled,
as OpenAI and vLLM report them."""

from __future__ import annotations

import torch

from app.inference.types import TokenLogprob


def token_logprobs(logits: torch.Tensor, tokens: list[int], top: int) -> list[TokenLogprob]:
    """For each row of logits [n, vocab] (any float dtype), the log-probability of `tokens[row]` and up to `top`
    likeliest tokens at that row. Tokens a grammar ruled out (-inf) are no alternative: a row where fewer than
    `top` tokens were allowed lists only those, as JSON has no number for -inf."""
    if not tokens:
        return []
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = logprobs.gather(1, torch.tensor(tokens, device=logits.device).unsqueeze(1)).squeeze(1).tolist()
    if top > 0:
        values, ids = torch.topk(logprobs, min(top, logprobs.shape[-1]), dim=-1)
        alternatives = [
            tuple((token, value) for token, value in zip(i, v, strict=True) if value != float("-inf"))
            for i, v in zip(ids.tolist(), values.tolist(), strict=True)
        ]
    else:
        alternatives = [()] * len(tokens)
    return [TokenLogprob(t, lp, alt) for t, lp, alt in zip(tokens, chosen, alternatives, strict=True)]
