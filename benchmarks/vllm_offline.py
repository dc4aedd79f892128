"""vLLM's offline engine on bench_serve's workload, run by bench_serve.py in vLLM's own venv (`make bench` builds
`.venv-vllm`; vLLM pins its own torch and transformers, so it cannot share the project's environment).

Input (a JSON file named on the command line): the base model's directory, the adapters' directories, the prompts
as token ids and the number of new tokens. Every prompt is submitted at once with `ignore_eos` and
`min_tokens = max_tokens`, so each request makes the same tokens as in bench_serve. Three runs: adapters assigned
round-robin over all of them with `enable_lora` (`max_loras` = their count), the same over the first adapter only,
and an engine without LoRA on the base model. Each is timed after a warm-up pass over the same requests, best of
`repeats`. Prints one JSON line: requests per second of each run.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def timed_rps(llm, prompts, params, loras, repeats: int) -> float:
    requests = [{"prompt_token_ids": ids} for ids in prompts]
    lora_requests = [loras[i % len(loras)] for i in range(len(prompts))] if loras else None
    llm.generate(requests, params, lora_request=lora_requests, use_tqdm=False)  # warm-up: adapters, kernels
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        outputs = llm.generate(requests, params, lora_request=lora_requests, use_tqdm=False)
        best = min(best, time.perf_counter() - started)
        assert all(len(out.outputs[0].token_ids) == params.max_tokens for out in outputs)
    return len(prompts) / best


def main() -> None:
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    spec = json.loads(Path(sys.argv[1]).read_text())
    new_tokens, repeats = spec["new_tokens"], spec["repeats"]
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, min_tokens=new_tokens, ignore_eos=True)
    common = {
        "model": spec["model_dir"],
        "skip_tokenizer_init": True,  # prompts are token ids; tuneserve-tiny's tokenizer is its own
        "dtype": "float32",  # as tuneserve serves on a CPU
        "max_model_len": 512,
        "max_num_seqs": spec["max_num_seqs"],
        "enforce_eager": True,
    }
    adapters = [LoRARequest(f"adapter-{i}", i + 1, path) for i, path in enumerate(spec["adapters"])]
    rank = spec["rank"]
    llm = LLM(**common, enable_lora=True, max_loras=len(adapters), max_lora_rank=rank)
    results = {
        "lora_all": timed_rps(llm, spec["prompts"], params, adapters, repeats),
        "lora_one": timed_rps(llm, spec["prompts"], params, adapters[:1], repeats),
    }
    del llm
    llm = LLM(**common)
    results["base"] = timed_rps(llm, spec["prompts"], params, None, repeats)
    print(json.dumps(results), flush=True)


if __name__ == "__main__":  # vLLM's CPU engine starts worker processes that import this module
    main()
