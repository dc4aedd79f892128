"""Choosing the next token of one request: greedy at temperature 0, else temperature + nucleus (top_p) sampling
with the request's own `torch.Generator`, so a seed reproduces its output whatever else shares the batch."""

from __future__ import annotations

import random

import torch

# Below this temperature decoding is greedy, as vLLM does it: dividing logits by a smaller number can overflow
# float32 to inf, and the softmax to NaN.
GREEDY_BELOW = 1e-5


def make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(seed if seed is not None else random.SystemRandom().randrange(2**63))
    return generator


def sample_token(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    """Next token id from one row of float32 logits [vocab]."""
    if temperature < GREEDY_BELOW:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # Keep the smallest prefix whose mass reaches top_p, and always the most likely token: a top_p that
        # rounds to 0 in float32 would otherwise mask every token.
        before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
        drop = before >= top_p
        drop[0] = False
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        choice = torch.multinomial(sorted_probs, 1, generator=generator)
        return int(order[choice])
    return int(torch.multinomial(probs, 1, generator=generator))
