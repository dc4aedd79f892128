"""The GPU path end to end, through the real service: a random Qwen2 with Qwen2.5-0.5B's layer sizes, one
training job timed by its worker, seven more short jobs for eight distinct adapters, mixed-adapter serving, and
an in-process check that packed training on this device keeps examples apart. Run by benchmarks/gpu_check.sh.

What runs:
1. app.ml.families.build_family_model writes a random Qwen2 (hidden 896, 24 layers, 14 heads, 2 KV heads,
   intermediate 4864, vocab 151936, tied embeddings: ~494 M parameters) with the family's tokenizer and template.
2. `tuneserve up` (the embedded default: SQLite, the local broker, one worker, the API with inference on) with
   that directory as a base model in TUNESERVE_BASE_MODELS.
3. Upload of synthetic chat data (app.ml.synthetic.varied_length_chat); one main job (1 epoch, 60 steps of
   128 examples, packed) and seven short ones (4 steps), queued together; the worker runs them one after another.
4. The main job's own report (its "Trained N tokens in S s" event): tokens and the wall seconds of its optimizer
   steps, and the worker's peak CUDA memory over the job; the last job's report also says how much the worker
   still held when it started (what the jobs before it left behind).
5. /v1/completions from 32 concurrent clients, greedy, max_tokens 64: the same 256 prompts on the main adapter
   alone, then round-robin over all eight adapters (best of two runs each, interleaved).
6. In process, with the service stopped: the summed loss of a micro-batch of several packed rows against the same
   examples one per row, in fp32 and in the training dtype, with positions that do not restart as the negative
   control (examples attending to their neighbours); the attention implementation is the one training uses here.

MFU counts model FLOPs of LoRA training over a frozen base, from the examples' real lengths (the same tokenizer,
template and max_seq_length as the job): per token 2*N_lin forward + 2*N_lin for the input gradients in backward
(no weight gradients for frozen weights), 6*N_lora for the adapters (forward, input and weight gradients), the LM
head (2*V*d forward + 2*V*d backward) only at supervised positions as the loop computes it, and causal attention
inside each example: 6 * layers * heads * head_dim * n^2 per example of n tokens (forward 2, backward 4; only the
causal half counted, as a block-diagonal mask or a varlen kernel needs no more). Recomputation is not counted.
Divided by the job's own step seconds and the GPU's dense bf16 peak (H100/H200 SXM 989 TFLOP/s; --peak-tflops
or GPU_CHECK_PEAK_TFLOPS overrides; unknown GPUs report no MFU).

`--smoke` runs the same path on a tiny Qwen2 with a small workload (CPU is fine) in a minute or two.
The last line: train_tokens_per_s=... mfu=... peak_gpu_mem_gib=... serve_rps_8_adapters=... serve_rps_1_adapter=...
rps_ratio_8_vs_1=... and more pairs.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local; never wait on a hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import asyncio  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import torch  # noqa: E402

from app.ml.synthetic import varied_length_chat, write_jsonl  # noqa: E402

BASE_NAME = "gpu-check-qwen2"
FAMILY = "qwen2"
KEY = "ts-gpu-check-key-0123456789"
# Qwen2.5-0.5B's sizes (its config.json); the family recipe already has its tied embeddings, RoPE base and norm eps.
QWEN2_0_5B: dict[str, Any] = dict(
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    max_position_embeddings=32768,
)
QWEN2_0_5B_VOCAB = 151936
SMOKE_ARCH: dict[str, Any] = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
)
# Dense (no sparsity) bf16 tensor-core peaks from the vendors' datasheets, TFLOP/s; the first match wins.
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H200", 989.4),
    ("H100", 989.4),
    ("H800", 989.4),
    ("GH200", 989.4),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("A10", 125.0),
)
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Plan:
    examples: int = 7680  # main job: 60 steps of 128 (about 270 tokens an example with the family's tokenizer)
    batch_size: int = 128
    short_examples: int = 256  # each of the other seven jobs: 4 steps of 64
    short_batch_size: int = 64
    adapters: int = 8
    requests: int = 256
    clients: int = 32
    max_tokens: int = 64
    max_batch_size: int = 32  # TUNESERVE_MAX_BATCH_SIZE for the service
    repeats: int = 2


SMOKE = Plan(
    examples=64,
    batch_size=16,
    short_examples=16,
    short_batch_size=16,
    requests=16,
    clients=4,
    max_tokens=8,
    max_batch_size=8,
    repeats=1,
)


def log(message: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {message}", flush=True)


def device_peak_tflops(name: str, override: float | None) -> float | None:
    if override:
        return override
    for marker, peak in PEAK_BF16_TFLOPS:
        if marker in name:
            return peak
    return None


# --- the model ----------------------------------------------------------------------------------------------------


def build_model(out_dir: Path, smoke: bool) -> dict[str, Any]:
    from app.ml.families import build_family_model

    arch, vocab = (SMOKE_ARCH, None) if smoke else (QWEN2_0_5B, QWEN2_0_5B_VOCAB)
    build_family_model(out_dir, FAMILY, vocab_size=vocab, **arch)
    config: dict[str, Any] = json.loads((out_dir / "config.json").read_text())
    return config


def count_parameters(model_dir: Path) -> int:
    from safetensors import safe_open

    total = 0
    for path in model_dir.glob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                total += math.prod(f.get_slice(name).get_shape())
    return total


def linear_shapes(config: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """(in, out) of each linear layer in one decoder layer of a Llama-style model (Qwen2 here)."""
    d, heads, kv = config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or d // heads
    inner = config["intermediate_size"]
    return {
        "q_proj": (d, heads * head_dim),
        "k_proj": (d, kv * head_dim),
        "v_proj": (d, kv * head_dim),
        "o_proj": (heads * head_dim, d),
        "gate_proj": (d, inner),
        "up_proj": (d, inner),
        "down_proj": (inner, d),
    }


def training_flops(config: dict[str, Any], lengths: list[tuple[int, int]], lora_r: int, targets: Any) -> float:
    """Model FLOPs of one pass over examples of (tokens, supervised tokens), as the module docstring counts them."""
    layers, d = config["num_hidden_layers"], config["hidden_size"]
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or d // heads
    shapes = linear_shapes(config)
    targeted = LINEARS if targets == "all-linear" else [m for m in LINEARS if m in targets]
    n_lin = layers * sum(i * o for i, o in shapes.values())
    n_lora = layers * sum(lora_r * (shapes[m][0] + shapes[m][1]) for m in targeted)
    n_head = config["vocab_size"] * d
    tokens = sum(n for n, _ in lengths)
    supervised = sum(s for _, s in lengths)
    squares = sum(n * n for n, _ in lengths)
    return (4 * n_lin + 6 * n_lora) * tokens + 4 * n_head * supervised + 6 * layers * heads * head_dim * squares


def example_lengths(model_dir: Path, train_path: Path, hp: dict[str, Any]) -> list[tuple[int, int]]:
    from app.ml.base_model import load_tokenizer
    from worker.training.data import load_dataset

    tokenizer = load_tokenizer(str(model_dir))
    data = load_dataset(train_path, tokenizer, hp["max_seq_length"], hp["long_example_policy"], param="training_file")
    return [(len(e), e.n_supervised) for e in data.examples]


# --- the service --------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Service:
    """`tuneserve up` in its own process group (its worker with it), logging to a file."""

    def __init__(self, data_dir: Path, model_dir: Path, plan: Plan, log_path: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.headers = {"Authorization": f"Bearer {KEY}"}
        self.log_path = log_path
        env = {k: v for k, v in os.environ.items() if not k.startswith("TUNESERVE_")}
        env.update(
            PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
            PYTHONUNBUFFERED="1",
            TUNESERVE_DATA_DIR=str(data_dir),
            TUNESERVE_HOST="127.0.0.1",
            TUNESERVE_PORT=str(self.port),
            TUNESERVE_API_KEY=KEY,
            TUNESERVE_BASE_MODELS=json.dumps({BASE_NAME: str(model_dir)}),
            TUNESERVE_MAX_BATCH_SIZE=str(plan.max_batch_size),
            TUNESERVE_LOG_LEVEL="warning",
        )
        self._env = env
        self._proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Service:
        self._log = open(self.log_path, "wb")
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "up"],
            env=self._env,
            cwd=ROOT,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"tuneserve up exited early:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise RuntimeError(f"tuneserve up did not become ready:\n{self.log_tail()}")

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)  # `up` stops its worker on the way out
            try:
                self._proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self._proc.pid, signal.SIGKILL)  # the group this script started, and nothing else
                self._proc.wait(timeout=30)
        self._log.close()

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        r = httpx.request(method, f"{self.url}{path}", headers=self.headers, timeout=120, **kwargs)
        if r.status_code != 200:
            raise RuntimeError(f"{method} {path}: {r.status_code} {r.text}")
        return r.json()

    def upload(self, path: Path) -> str:
        with open(path, "rb") as f:
            body = self.request("POST", "/v1/files", data={"purpose": "fine-tune"}, files={"file": (path.name, f)})
        return str(body["id"])

    def create_job(self, file_id: str, suffix: str, hyperparameters: dict[str, Any]) -> str:
        body = {"model": BASE_NAME, "training_file": file_id, "suffix": suffix, "hyperparameters": hyperparameters}
        return str(self.request("POST", "/v1/fine_tuning/jobs", json=body)["id"])

    def wait_job(self, job_id: str, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job: dict[str, Any] = self.request("GET", f"/v1/fine_tuning/jobs/{job_id}")
            if job["status"] in ("succeeded", "failed", "cancelled"):
                if job["status"] != "succeeded":
                    raise RuntimeError(f"job {job_id} {job['status']}: {job.get('error')}\n{self.log_tail()}")
                return job
            time.sleep(0.5)
        raise RuntimeError(f"job {job_id} did not finish in {timeout:.0f} s\n{self.log_tail()}")

    def training_report(self, job_id: str) -> dict[str, Any]:
        """The data of the worker's "Trained N tokens in S s" event for the job."""
        events = self.request("GET", f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 100})["data"]
        for event in events:
            if event["message"].startswith("Trained ") and event.get("data"):
                log(f"{job_id}: {event['message']}")
                data: dict[str, Any] = event["data"]
                return data
        raise RuntimeError(f"job {job_id} has no training report among its events")


async def drive(service: Service, models: list[str], prompts: list[str], plan: Plan) -> tuple[float, int]:
    """`plan.clients` clients share the prompts (request i on models[i % len]); (wall seconds, completion tokens)."""
    queue = list(reversed(range(len(prompts))))
    completion_tokens = 0
    limits = httpx.Limits(max_connections=plan.clients, max_keepalive_connections=plan.clients)
    async with httpx.AsyncClient(base_url=service.url, headers=service.headers, timeout=600, limits=limits) as http:

        async def client() -> None:
            nonlocal completion_tokens
            while queue:
                i = queue.pop()
                body = {"model": models[i % len(models)], "prompt": prompts[i], "max_tokens": plan.max_tokens}
                r = await http.post("/v1/completions", json={**body, "temperature": 0})
                if r.status_code != 200:
                    raise RuntimeError(f"completion failed: {r.status_code} {r.text}")
                completion_tokens += r.json()["usage"]["completion_tokens"]

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(plan.clients)))
        return time.perf_counter() - started, completion_tokens


def measure_serving(service: Service, models: list[str], plan: Plan) -> dict[str, float]:
    prompts = [c["messages"][-2]["content"] for c in varied_length_chat(plan.requests, seed=7)]
    # Warm-up: the base model and every adapter resident, the kernels compiled and cached.
    asyncio.run(drive(service, models, prompts[: len(models)], Plan(clients=len(models), max_tokens=4)))
    best: dict[str, tuple[float, int]] = {}
    for _ in range(plan.repeats):
        for label, pool in (("1", models[:1]), ("8", models)):
            wall, tokens = asyncio.run(drive(service, pool, prompts, plan))
            log(f"serving, {len(pool)} adapter(s): {len(prompts) / wall:.2f} req/s, {tokens / wall:.0f} tokens/s")
            if label not in best or wall < best[label][0]:
                best[label] = (wall, tokens)
    figures = {}
    for label, (wall, tokens) in best.items():
        figures[f"serve_rps_{label}"] = len(prompts) / wall
        figures[f"serve_tok_s_{label}"] = tokens / wall
    return figures


# --- packed sequences on this device ------------------------------------------------------------------------------


def packed_check(model_dir: Path, train_path: Path, hp: dict[str, Any]) -> dict[str, Any]:
    """Relative difference of the summed loss: several packed rows in one micro-batch vs each example alone; and
    the same with positions that never restart (examples attending across), which must differ."""
    from app.jobs.spec import TrainingSpec
    from app.ml.base_model import load_tokenizer
    from app.ml.device import pick_device
    from worker.training.data import load_dataset
    from worker.training.loop import _autocast, build_lora_model, default_attention, load_base_model
    from worker.training.loss import loss_sums
    from worker.training.packing import collate_packed, step_micro_batches

    device, dtype = pick_device()
    tokenizer = load_tokenizer(str(model_dir))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    examples = load_dataset(train_path, tokenizer, 512, "drop", param="training_file").examples[:48]
    [batch] = step_micro_batches(examples, packing=True, max_seq_length=512, pad_id=pad_id, micro_batch_tokens=1 << 20)
    spec = TrainingSpec.from_dict(hp)
    out: dict[str, Any] = {"attention": default_attention(device), "packed_rows": batch.input_ids.shape[0]}
    for label, weights in (("fp32", torch.float32), ("train", dtype)):
        model = build_lora_model(load_base_model(str(model_dir), device, weights), spec).eval()
        context = _autocast(device) if weights != torch.float32 else torch.autocast(device.type, enabled=False)
        with torch.no_grad(), context:
            packed = loss_sums(model, batch.to(device))[0].item()
            rows, width = batch.input_ids.shape
            crossed = loss_sums(
                model,
                batch.to(device),
                position_ids=torch.arange(width, device=device).expand(rows, width),
                segments=[[0, width]] * rows,  # what the CPU's per-example attention reads instead
            )[0].item()
            alone = sum(loss_sums(model, collate_packed([[e]], pad_id).to(device))[0].item() for e in examples)
        out[f"packed_rel_diff_{label}"] = abs(packed - alone) / alone
        out[f"crossed_rel_diff_{label}"] = abs(crossed - alone) / alone
        del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


# --- the run ------------------------------------------------------------------------------------------------------


def run(work: Path, plan: Plan, smoke: bool, peak: float | None) -> dict[str, Any]:
    started = time.perf_counter()
    model_dir = work / "model"
    config = build_model(model_dir, smoke)
    n_params = count_parameters(model_dir)
    log(f"built a random {FAMILY} of {n_params / 1e6:.1f} M parameters in {time.perf_counter() - started:.1f} s")

    main_file, short_file = work / "train.jsonl", work / "short.jsonl"
    write_jsonl(main_file, varied_length_chat(plan.examples, seed=0))
    write_jsonl(short_file, varied_length_chat(plan.short_examples, seed=1))
    main_hp = {"n_epochs": 1, "batch_size": plan.batch_size, "n_checkpoints": 0}
    short_hp = {"n_epochs": 1, "batch_size": plan.short_batch_size, "n_checkpoints": 0}

    with Service(work / "data", model_dir, plan, work / "service.log") as service:
        log(f"service up at {service.url} (log: {service.log_path})")
        main_id = service.create_job(service.upload(main_file), "main", main_hp)
        short_file_id = service.upload(short_file)
        short_ids = [service.create_job(short_file_id, f"a{i}", short_hp) for i in range(1, plan.adapters)]
        queued = time.perf_counter()
        main_job = service.wait_job(main_id, timeout=600)
        job_seconds = time.perf_counter() - queued
        report = service.training_report(main_id)
        jobs = [main_job] + [service.wait_job(job_id, timeout=300) for job_id in short_ids]
        last_report = service.training_report(short_ids[-1]) if short_ids else report
        log(f"{len(jobs)} jobs done in {time.perf_counter() - queued:.1f} s")
        serving = measure_serving(service, [job["fine_tuned_model"] for job in jobs], plan)
        stopping = time.perf_counter()
    log(f"service stopped in {time.perf_counter() - stopping:.1f} s")

    hp = main_job["hyperparameters"]
    lengths = example_lengths(model_dir, main_file, hp)
    flops = hp["n_epochs"] * training_flops(config, lengths, hp["lora_r"], hp["target_modules"])
    trained = sum(n for n, _ in lengths) * hp["n_epochs"]
    if trained != report["trained_tokens"]:
        log(f"note: the job reports {report['trained_tokens']} tokens, the FLOP count assumed {trained}")
    counted = time.perf_counter()
    check = packed_check(model_dir, main_file, hp)
    log(f"packed check in {time.perf_counter() - counted:.1f} s")
    total_seconds = time.perf_counter() - started

    seconds = report["train_seconds"]
    peak_mem = report.get("peak_memory_bytes")
    figures: dict[str, Any] = {
        "train_tokens_per_s": report["trained_tokens"] / seconds,
        "mfu": flops / seconds / (peak * 1e12) if peak else float("nan"),
        "peak_gpu_mem_gib": peak_mem / 2**30 if peak_mem is not None else float("nan"),
        "serve_rps_8_adapters": serving["serve_rps_8"],
        "serve_rps_1_adapter": serving["serve_rps_1"],
        "rps_ratio_8_vs_1": serving["serve_rps_8"] / serving["serve_rps_1"],
        "serve_tok_s_8_adapters": serving["serve_tok_s_8"],
        "serve_tok_s_1_adapter": serving["serve_tok_s_1"],
        "model_tflops_per_s": flops / seconds / 1e12,
        "train_steps": math.ceil(len(lengths) / hp["batch_size"]) * hp["n_epochs"],
        "train_seconds": seconds,
        "job_seconds": job_seconds,
        "worker_reserved_gib_at_last_job_start": (
            last_report["reserved_bytes_at_start"] / 2**30 if "reserved_bytes_at_start" in last_report else float("nan")
        ),
        "packed_rel_diff_fp32": check["packed_rel_diff_fp32"],
        "crossed_rel_diff_fp32": check["crossed_rel_diff_fp32"],
        "packed_rel_diff_train_dtype": check["packed_rel_diff_train"],
        "crossed_rel_diff_train_dtype": check["crossed_rel_diff_train"],
        "train_attention": check["attention"],
        "params_m": n_params / 1e6,
        "total_seconds": total_seconds,
    }
    log(
        f"packed check with {check['attention']} attention over {check['packed_rows']} rows in one micro-batch; "
        f"{trained:,} tokens trained in {len(lengths):,} examples"
    )
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="a tiny Qwen2 and a small workload (CPU is fine)")
    parser.add_argument("--work-dir", type=Path, help="keep the model, data and logs here (default: a temp dir)")
    parser.add_argument("--peak-tflops", type=float, default=float(os.environ.get("GPU_CHECK_PEAK_TFLOPS") or 0))
    parser.add_argument("--log", type=Path, help="copy the service's log (API and worker) here at the end")
    args = parser.parse_args()
    plan = SMOKE if args.smoke else Plan()
    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        sys.exit("gpu_check: torch sees no CUDA GPU here; --smoke runs the same path on a tiny model on the CPU")
    name = torch.cuda.get_device_name() if cuda else "cpu"
    peak = device_peak_tflops(name, args.peak_tflops) if cuda else None
    import transformers

    log(f"python {sys.version.split()[0]}, torch {torch.__version__}, transformers {transformers.__version__}")
    log(f"device: {name}" + (f", dense bf16 peak {peak} TFLOP/s" if peak else ", no bf16 peak known (no MFU)"))

    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        work = args.work_dir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        try:
            figures = run(work, plan, args.smoke, peak)
        finally:
            if args.log and (work / "service.log").exists():
                shutil.copyfile(work / "service.log", args.log)
    print(" ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in figures.items()))


if __name__ == "__main__":
    main()
