"""Training throughput and memory: the engine against what a user would otherwise run, in one run.

On the same synthetic chat data (single-turn, long-tailed lengths) and the same tiny model and LoRA config:
- useful tokens/s (supervised tokens / training wall time) of the engine vs a naive loop that pads every
  batch to max length with the loss on all tokens, and vs TRL's SFTTrainer with packing on;
- peak memory (RSS growth of a fresh process) of the engine vs the naive loop at the same token budget per
  step, with a 32k vocabulary so that logits matter.

`--family NAME` runs it all on the built-in family model `tiny-NAME` (its architecture, tokenizer and chat
template; the memory run on the same family built with a 32k vocabulary). The examples are then lengthened from
their own words until each message has as many tokens in the family's tokenizer as in tuneserve-tiny's byte-level
one (`--same-text` keeps the text as it is), so every model trains on the same token lengths and the ratios differ
only by what the model and its template do. A template that refuses a system role gets the examples without it.

`--validation` measures instead what knowing whether the job worked costs: the same 3-epoch job with and without a
validation file (a fifth of the training size) at the default `eval_every` and checkpoints (the sample every
`eval_every` steps, the whole set at each of the 3 checkpoints), and the per-example report after training.

`--dpo` measures DPO instead: useful tokens/s (the chosen and rejected answers' tokens / wall time) of the engine
vs TRL's DPOTrainer on the same preference pairs (each example's answer preferred to another example's), 8 pairs
per step, both timed from loading the model to the end of training, so the reference pass is included in each
(TRL with its `precompute_ref_log_probs`, the engine's design too).

Usage: .venv/bin/python benchmarks/bench_train.py [--examples 96] [--family qwen2] [--validation | --dpo]
The last line is `useful_tps_ratio_vs_naive=... useful_tps_ratio_vs_trl=... peak_mem_ratio_vs_naive=...`, or with
`--validation` `validation_overhead=... example_report_share=...`, or with `--dpo` `dpo_useful_tps_ratio_vs_trl=...`.
"""

from __future__ import annotations

import os

# Spin-waiting OpenMP threads collapse under any CPU contention; every variant runs with the same setting.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import resource  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from app.jobs.spec import resolve_spec  # noqa: E402
from app.ml.families import FAMILIES, build_family_model, ensure_family_model  # noqa: E402
from app.ml.registry import TINY_DEFAULTS  # noqa: E402
from app.ml.synthetic import varied_length_chat, write_jsonl  # noqa: E402
from app.ml.tiny import build_tiny_model, ensure_tiny_model  # noqa: E402
from worker.training.callbacks import TrainingCallbacks  # noqa: E402

CPU = torch.device("cpu")
MAX_SEQ_LENGTH = 1024
BATCH_EXAMPLES = 8  # examples per optimizer step, every variant
SEED = 0


def make_dataset(tokenizer, n: int, seed: int, *, match_tiny_lengths: bool = False) -> list[dict]:
    """Single-turn examples (so every variant supervises the same tokens) that fit MAX_SEQ_LENGTH."""
    candidates = varied_length_chat(
        2 * n, seed=seed, max_words=90, multi_turn_share=0.0, drop_system=not supports_system_role(tokenizer)
    )
    if match_tiny_lengths:
        candidates = [lengthen_to_tiny_tokens(c, tokenizer, seed + i) for i, c in enumerate(candidates)]
    fitting = [c for c in candidates if len(render_len(c, tokenizer)) <= MAX_SEQ_LENGTH]
    assert len(fitting) >= n, "too few examples fit; lower max_words"
    return fitting[:n]


def supports_system_role(tokenizer) -> bool:
    from app.ml.chat import ChatTemplateError, check_chat_support

    probe = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "u"},
        {"role": "assistant", "content": "a"},
    ]
    try:
        check_chat_support(probe, tokenizer)
    except ChatTemplateError:
        return False
    return True


def lengthen_to_tiny_tokens(example: dict, tokenizer, seed: int) -> dict:
    """The example with each message extended by words it already has until the tokenizer gives the message at
    least as many tokens as tuneserve-tiny's byte-level tokenizer does (one per UTF-8 byte)."""
    rng = random.Random(seed)
    messages = []
    for message in example["messages"]:
        content = message["content"]
        words, target = content.split(), len(content.encode())
        while len(tokenizer(content, add_special_tokens=False)["input_ids"]) < target:
            content += " " + rng.choice(words)
        messages.append({**message, "content": content})
    return {**example, "messages": messages}


def render_len(example, tokenizer):
    from app.ml.chat import render_training_example

    return render_training_example(example, tokenizer)[0]


# What every TRL trainer here runs with: one epoch, no logging or saving, on the CPU. TRL's configs default to bf16
# and gradient checkpointing; both cost time on a CPU and the engine uses neither there, so they are off to compare
# like with like.
TRL_CPU_ARGS = {
    "num_train_epochs": 1,
    "warmup_steps": 0,
    "max_grad_norm": 1.0,
    "logging_steps": 10**6,
    "save_strategy": "no",
    "report_to": "none",
    "use_cpu": True,
    "max_length": MAX_SEQ_LENGTH,
    "seed": SEED,
    "disable_tqdm": True,
    "dataloader_num_workers": 0,
    "bf16": False,
    "gradient_checkpointing": False,
}


def spec_for(n_examples: int, method: str = "supervised", **overrides):
    hp = {
        "n_epochs": 1,
        "batch_size": BATCH_EXAMPLES,
        "lora_dropout": 0.0,
        "max_seq_length": MAX_SEQ_LENGTH,
        "n_checkpoints": 0,
        "warmup_ratio": 0.0,
        **overrides,
    }
    return resolve_spec(hp, n_examples, TINY_DEFAULTS, seed=SEED, method=method)


class Timer(TrainingCallbacks):
    """Times the loop itself: from the first stop poll (model loaded, data tokenized) to the last step."""

    def __init__(self):
        self.start = self.end = None

    def should_stop(self):
        if self.start is None:
            self.start = clocks()
        return None

    def on_progress(self, step, total_steps, eta_seconds):
        self.end = clocks()


def clocks() -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds over all threads)."""
    return time.perf_counter(), time.process_time()


def elapsed(start, end) -> tuple[float, float]:
    return end[0] - start[0], end[1] - start[1]


def run_engine(model_dir: Path, train_file: Path, n: int, out_dir: Path, **overrides) -> tuple[float, float]:
    from worker.training.loop import train

    timer = Timer()
    train(spec_for(n, **overrides), train_file, None, str(model_dir), out_dir, timer)
    return elapsed(timer.start, timer.end)


def run_with_validation(
    model_dir: Path, train_file: Path, valid_file: Path | None, n: int, out_dir: Path
) -> tuple[float, float]:
    """(wall seconds of the training loop, wall seconds after it: the adapter and the per-example report)."""
    from worker.training.loop import train

    timer = Timer()
    spec = spec_for(n, n_epochs=3, n_checkpoints=3, eval_every="auto")
    train(spec, train_file, valid_file, str(model_dir), out_dir, timer)
    done = clocks()
    return elapsed(timer.start, timer.end)[0], elapsed(timer.end, done)[0]


def validation_main(tmp: Path, model_dir: Path, tokenizer, n: int, repeats: int) -> None:
    train_examples = make_dataset(tokenizer, n, seed=SEED)
    valid_examples = make_dataset(tokenizer, max(1, n // 5), seed=SEED + 1)
    train_file, valid_file = tmp / "train.jsonl", tmp / "valid.jsonl"
    write_jsonl(train_file, train_examples)
    write_jsonl(valid_file, valid_examples)
    spec = spec_for(n, n_epochs=3, eval_every="auto")
    print(
        f"{n} training and {len(valid_examples)} validation examples, 3 epochs of {BATCH_EXAMPLES}: "
        f"eval_every {spec.eval_every} (auto), 3 checkpoints"
    )
    best = {"without": (float("inf"), float("inf")), "with": (float("inf"), float("inf"))}
    for _ in range(repeats):  # interleaved, best of each: contention only slows a run down
        for name, valid in (("without", None), ("with", valid_file)):
            loop, after = run_with_validation(model_dir, train_file, valid, n, tmp / name)
            best[name] = (min(best[name][0], loop), min(best[name][1], after))
    for name, (loop, after) in best.items():
        print(f"{name} validation: loop {loop:7.2f} s, after the loop (adapter + example report) {after:6.2f} s")
    overhead = best["with"][0] / best["without"][0] - 1
    print(f"validation_overhead={overhead:.3f} example_report_share={best['with'][1] / best['with'][0]:.3f}")


def preference_pairs(examples: list[dict], seed: int) -> list[dict]:
    """Each example's conversation with its own answer preferred to the next example's (after a seeded shuffle)."""
    others = examples[:]
    random.Random(seed).shuffle(others)
    return [
        {
            "input": {"messages": e["messages"][:-1]},
            "preferred_output": e["messages"][-1:],
            "non_preferred_output": [{"role": "assistant", "content": o["messages"][-1]["content"]}],
        }
        for e, o in zip(examples, others[1:] + others[:1], strict=True)
    ]


def run_engine_dpo(model_dir: Path, train_file: Path, n: int, out_dir: Path) -> float:
    from worker.training.loop import train

    start = time.perf_counter()
    train(spec_for(n, method="dpo", beta=0.1), train_file, None, str(model_dir), out_dir)
    return time.perf_counter() - start


def run_trl_dpo(model_dir: Path, pairs: list[dict], out_dir: Path) -> float:
    from datasets import Dataset, disable_progress_bars
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    disable_progress_bars()

    spec = spec_for(len(pairs), method="dpo")
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), attn_implementation="sdpa")
    rows = [
        {"prompt": p["input"]["messages"], "chosen": p["preferred_output"], "rejected": p["non_preferred_output"]}
        for p in pairs
    ]
    config = DPOConfig(
        output_dir=str(out_dir),
        per_device_train_batch_size=BATCH_EXAMPLES,
        learning_rate=spec.learning_rate,
        beta=0.1,
        precompute_ref_log_probs=True,
        **TRL_CPU_ARGS,
    )
    lora = LoraConfig(r=spec.lora_r, lora_alpha=spec.lora_alpha, lora_dropout=0.0, target_modules="all-linear")
    trainer = DPOTrainer(
        model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer, peft_config=lora
    )
    trainer.train()
    return time.perf_counter() - start


def dpo_main(tmp: Path, model_dir: Path, tokenizer, n: int, repeats: int) -> None:
    from worker.training.preference import load_preference_dataset

    pairs = preference_pairs(make_dataset(tokenizer, n, seed=SEED), seed=SEED)
    train_file = tmp / "pairs.jsonl"
    write_jsonl(train_file, pairs)
    data = load_preference_dataset(train_file, tokenizer, MAX_SEQ_LENGTH, "drop", param="training_file")
    useful = data.n_supervised
    print(f"{len(data.examples)} pairs, {data.n_tokens} tokens, {useful} answer tokens; {BATCH_EXAMPLES} pairs a step")
    best = {"engine": float("inf"), "trl DPOTrainer": float("inf")}
    for _ in range(repeats):  # interleaved, best of each
        best["engine"] = min(best["engine"], run_engine_dpo(model_dir, train_file, n, tmp / "engine"))
        best["trl DPOTrainer"] = min(best["trl DPOTrainer"], run_trl_dpo(model_dir, pairs, tmp / "trl"))
    for name, seconds in best.items():
        print(f"{name:16s} {seconds:7.2f} s  {useful / seconds:6.0f} useful tokens/s")
    print(f"dpo_useful_tps_ratio_vs_trl={best['trl DPOTrainer'] / best['engine']:.2f}")


def naive_batches(tokenizer, examples: list[dict], pad_id: int):
    """Pad-to-max batches with labels on every real token: what a hand-written loop usually does."""
    from app.ml.chat import render_training_example

    batches = []
    for i in range(0, len(examples), BATCH_EXAMPLES):
        ids = [render_training_example(e, tokenizer)[0] for e in examples[i : i + BATCH_EXAMPLES]]
        input_ids = torch.tensor([x + [pad_id] * (MAX_SEQ_LENGTH - len(x)) for x in ids])
        mask = torch.tensor([[1] * len(x) + [0] * (MAX_SEQ_LENGTH - len(x)) for x in ids])
        labels = input_ids.masked_fill(mask == 0, -100)
        batches.append((input_ids, mask, labels))
    return batches


def run_naive(model_dir: Path, examples: list[dict]) -> tuple[float, float]:
    from transformers import AutoTokenizer

    from worker.training.loop import build_lora_model, load_base_model

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    spec = spec_for(len(examples))
    model = build_lora_model(load_base_model(str(model_dir), CPU, torch.float32), spec)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=spec.learning_rate)
    # Padding is masked out, so any id pads; Llama 3 and Mistral tokenizers have no pad token.
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batches = naive_batches(tokenizer, examples, pad_id)
    start = clocks()
    for input_ids, mask, labels in batches:
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return elapsed(start, clocks())


def run_trl(model_dir: Path, examples: list[dict], out_dir: Path) -> tuple[float, float]:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from app.ml.base_model import attention_for

    spec = spec_for(len(examples))
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    # SDPA, unless the architecture computes another function with it (Gemma 2's soft-capping: eager), as the
    # engine's own loading decides.
    attention = attention_for(AutoConfig.from_pretrained(str(model_dir)), "sdpa")
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), attn_implementation=attention)
    # Prompt/completion form: TRL then puts the loss on the completion only, the same tokens as the engine.
    rows = [{"prompt": e["messages"][:-1], "completion": e["messages"][-1:]} for e in examples]
    # Rows per optimizer step chosen so a step holds about the same tokens as the engine's 8 examples. One row
    # per forward: with several, TRL's padding-free collator flattens them into one long sequence whose dense
    # attention mask made it 20x slower than the engine on CPU; accumulation is its best setting here.
    mean_len = sum(len(render_len(e, tokenizer)) for e in examples) / len(examples)
    rows_per_step = max(1, round(BATCH_EXAMPLES * mean_len / MAX_SEQ_LENGTH))
    config = SFTConfig(
        output_dir=str(out_dir),
        per_device_train_batch_size=1,
        gradient_accumulation_steps=rows_per_step,
        learning_rate=spec.learning_rate,
        packing=True,
        **TRL_CPU_ARGS,
    )
    lora = LoraConfig(r=spec.lora_r, lora_alpha=spec.lora_alpha, lora_dropout=0.0, target_modules="all-linear")

    class TrainTimer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.start = clocks()

        def on_train_end(self, args, state, control, **kwargs):
            self.end = clocks()

    timer = TrainTimer()
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=lora,
        callbacks=[timer],
    )
    trainer.train()
    return elapsed(timer.start, timer.end)


def useful_tokens(tokenizer, examples: list[dict]) -> int:
    from worker.training.data import tokenize_examples

    return tokenize_examples(examples, tokenizer, MAX_SEQ_LENGTH).n_supervised


def memory_child(variant: str, model_dir: Path, data_file: Path) -> None:
    """Run a few steps of one variant in this fresh process; print its peak RSS growth in MiB."""
    import psutil

    examples = [json.loads(line) for line in data_file.read_text().splitlines()]
    baseline = psutil.Process().memory_info().rss
    with tempfile.TemporaryDirectory() as tmp:
        if variant == "engine":
            # Same token budget as the naive loop: rows of MAX_SEQ_LENGTH, BATCH_EXAMPLES rows per forward.
            run_engine(
                model_dir,
                data_file,
                len(examples),
                Path(tmp),
                batch_size=len(examples),
                micro_batch_tokens=BATCH_EXAMPLES * MAX_SEQ_LENGTH,
            )
        else:
            run_naive(model_dir, examples)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"peak_growth_mib": (peak - baseline) / 2**20}))


def measure_memory(variant: str, model_dir: Path, data_file: Path) -> float:
    out = subprocess.run(
        [sys.executable, __file__, "--memory-child", variant, str(model_dir), str(data_file)],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_growth_mib"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--family", choices=sorted(FAMILIES), help="train tiny-FAMILY instead of tuneserve-tiny")
    parser.add_argument("--same-text", action="store_true", help="with --family: do not match tiny's token lengths")
    parser.add_argument("--memory-child", nargs=3, metavar=("VARIANT", "MODEL_DIR", "DATA"))
    parser.add_argument("--validation", action="store_true", help="the cost of validation metrics and reports")
    parser.add_argument("--dpo", action="store_true", help="DPO throughput against TRL's DPOTrainer")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    if args.memory_child:
        variant, model_dir, data = args.memory_child
        memory_child(variant, Path(model_dir), Path(data))
        return

    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        family = args.family
        model_dir = ensure_family_model(tmp / "data", family) if family else ensure_tiny_model(tmp / "data")
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        if args.validation:
            validation_main(tmp, model_dir, tokenizer, args.examples, args.repeats)
            return
        if args.dpo:
            dpo_main(tmp, model_dir, tokenizer, args.examples, args.repeats)
            return
        examples = make_dataset(
            tokenizer, args.examples, seed=SEED, match_tiny_lengths=bool(family) and not args.same_text
        )
        n = len(examples)
        train_file = tmp / "train.jsonl"
        write_jsonl(train_file, examples)
        useful = useful_tokens(tokenizer, examples)
        lengths = [len(render_len(e, tokenizer)) for e in examples]
        model_name = FAMILIES[family].model_name if family else "tuneserve-tiny"
        print(
            f"model: {model_name}; data: {len(examples)} examples, {sum(lengths)} tokens (min {min(lengths)}, "
            f"max {max(lengths)}, mean {sum(lengths) / len(lengths):.0f}), {useful} supervised; "
            f"max_seq_length {MAX_SEQ_LENGTH}, {BATCH_EXAMPLES} examples per step, torch threads "
            f"{torch.get_num_threads()}"
        )

        variants = {
            "engine (packed, head on supervised)": lambda: run_engine(model_dir, train_file, n, tmp / "e"),
            "engine, packing off (padded to longest)": lambda: run_engine(
                model_dir, train_file, n, tmp / "p", packing=False
            ),
            "naive (pad to max, loss on all)": lambda: run_naive(model_dir, examples),
            "trl SFTTrainer (packing)": lambda: run_trl(model_dir, examples, tmp / "trl"),
        }
        # Interleaved repeats, best of each: other processes on the machine only ever slow a run down. CPU
        # seconds (all threads of this process) are printed as a cross-check that contention cannot skew.
        wall = {name: float("inf") for name in variants}
        cpu = dict(wall)
        for _ in range(args.repeats):
            for name, run in variants.items():
                w, c = run()
                wall[name], cpu[name] = min(wall[name], w), min(cpu[name], c)
        for name in variants:
            print(
                f"{name:42s} {wall[name]:7.2f} s  {useful / wall[name]:6.0f} useful tokens/s   "
                f"(cpu {cpu[name]:6.2f} s, {useful / cpu[name]:5.0f} useful tokens per cpu-s)"
            )
        timings = wall
        cpu_names = list(cpu)
        print(
            f"cpu-time ratios: vs naive {cpu[cpu_names[2]] / cpu[cpu_names[0]]:.2f}, "
            f"vs trl {cpu[cpu_names[3]] / cpu[cpu_names[0]]:.2f}"
        )
        engine, naive, trl = (timings[k] for k in list(timings)[:1] + list(timings)[2:])

        big = tmp / "tiny-32k"
        if family:
            build_family_model(big, family, vocab_size=32_000)
        else:
            build_tiny_model(big, vocab_size=32_000)
        mem_file = tmp / "mem.jsonl"
        write_jsonl(mem_file, examples[: 3 * BATCH_EXAMPLES])
        mem_engine = measure_memory("engine", big, mem_file)
        mem_naive = measure_memory("naive", big, mem_file)
        print(
            f"peak memory growth, 32k vocab, {BATCH_EXAMPLES}x{MAX_SEQ_LENGTH} tokens per forward: "
            f"engine {mem_engine:.0f} MiB, naive {mem_naive:.0f} MiB"
        )
        print(
            f"useful_tps_ratio_vs_naive={naive / engine:.2f} useful_tps_ratio_vs_trl={trl / engine:.2f} "
            f"peak_mem_ratio_vs_naive={mem_engine / mem_naive:.2f}"
        )


if __name__ == "__main__":
    main()
