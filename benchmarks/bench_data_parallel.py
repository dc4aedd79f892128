"""Data-parallel training of one job: the same training run on 1 and on 2 devices, in one run.

Here the devices are CPU processes (gloo) sharing this machine's cores, so the ratio measures what DDP costs in
communication and split overhead, not what a second GPU would buy: two ranks get one core each where one rank
had two. On a GPU machine the same script compares 1 and 2 GPUs (NCCL).

Workload: tuneserve-tiny, 96 intent-classification chats, batch 16, 2 epochs, no checkpoints. Each setup runs
twice, interleaved, and keeps its better run. Figures: training samples/s over the optimizer steps (rank 0's
clock; start-up of the helper ranks excluded, and reported separately as the wall time of a whole run).

Last line: `name=value` pairs. Usage: python benchmarks/bench_data_parallel.py
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.config import Settings  # noqa: E402
from app.jobs.spec import resolve_spec  # noqa: E402
from app.ml.registry import BaseModelRegistry  # noqa: E402
from app.ml.synthetic import intent_json_task  # noqa: E402
from worker.training.ranks import rank_device, train_on_devices  # noqa: E402

N_EXAMPLES, REPEATS = 96, 2


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tiny = BaseModelRegistry(Settings(data_dir=root / "data")).resolve("tuneserve-tiny")
        examples, _ = intent_json_task(N_EXAMPLES, 0, seed=1)
        train_path = root / "train.jsonl"
        train_path.write_text("".join(json.dumps(e) + "\n" for e in examples))
        spec = resolve_spec({"n_epochs": 2, "batch_size": 16, "n_checkpoints": 0}, N_EXAMPLES, tiny.defaults, seed=1)
        best: dict[int, tuple[float, float]] = {}
        for repeat in range(REPEATS):
            for n in (1, 2):
                started = time.perf_counter()
                result = train_on_devices(n, spec, train_path, None, tiny, root / f"out-{n}-{repeat}")
                wall = time.perf_counter() - started
                samples_per_second = spec.n_epochs * N_EXAMPLES / result.train_seconds
                print(f"devices={n} repeat={repeat}: {samples_per_second:.1f} samples/s, whole run {wall:.1f} s")
                if n not in best or samples_per_second > best[n][0]:
                    best[n] = (samples_per_second, wall)
    figures = {
        "device": rank_device(0).type,
        "samples_per_s_1": round(best[1][0], 1),
        "samples_per_s_2": round(best[2][0], 1),
        "ratio_2_vs_1": round(best[2][0] / best[1][0], 2),
        "whole_run_s_1": round(best[1][1], 1),
        "whole_run_s_2": round(best[2][1], 1),
    }
    print(" ".join(f"{k}={v}" for k, v in figures.items()))


if __name__ == "__main__":
    main()
