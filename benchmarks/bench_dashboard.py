"""The dashboard's job page for a long job: time from opening it to the first paint of its loss chart, and the bytes
transferred until then, for a job with 10,000 metric points, in Debian's Chromium driven by Playwright.

The job's metric events are written straight into the database (a 10,000-step training run would only make the
benchmark slow; the page reads them through the same API). Each run is a fresh browser context (no cache), so every
asset and the metric series are fetched; the page marks `chart-painted` in the frame after the chart's first draw,
and the time is that mark's, from the start of navigation.

Usage: .venv/bin/python benchmarks/bench_dashboard.py [--points 10000] [--runs 5]
The last line is `chart_paint_ms_median=... page_kb=...`.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app import migrate  # noqa: E402
from app.db import make_engine, make_sessionmaker, session_scope  # noqa: E402
from app.jobs.events import add_event  # noqa: E402
from tests.conftest import make_key  # noqa: E402
from tests.datasets.samples import valid_chat_file  # noqa: E402
from tests.e2e.server import LiveServer, tuneserve_env  # noqa: E402


def make_job(url: str, key: str, sessionmaker, points: int) -> str:
    headers = {"Authorization": f"Bearer {key}"}
    file_id = httpx.post(
        f"{url}/v1/files",
        headers=headers,
        data={"purpose": "fine-tune"},
        files={"file": ("t.jsonl", valid_chat_file(20))},
    ).json()["id"]
    job_id = httpx.post(
        f"{url}/v1/fine_tuning/jobs", headers=headers, json={"model": "tuneserve-tiny", "training_file": file_id}
    ).json()["id"]
    with session_scope(sessionmaker) as session:
        for step in range(1, points + 1):
            data = {"step": step, "train_loss": 2.5 / step**0.3, "train_mean_token_accuracy": 1 - 1 / step**0.2}
            if step % 50 == 0:
                data |= {"valid_loss": 2.6 / step**0.3, "valid_mean_token_accuracy": 1 - 1.1 / step**0.2}
            data["total_steps"] = points
            add_event(
                session,
                job_id,
                f"Step {step}/{points}: training loss={data['train_loss']:.4f}",
                type="metrics",
                data=data,
            )
    return job_id


def measure(browser, url: str, key: str, job_id: str) -> tuple[float, int]:
    context = browser.new_context(base_url=url)
    context.add_init_script(f"sessionStorage.setItem('tuneserve.api_key', {key!r})")
    page = context.new_page()
    responses = []
    page.on("requestfinished", lambda request: responses.append(request))
    page.goto(f"/ui/jobs/{job_id}")
    page.wait_for_function("performance.getEntriesByName('chart-painted').length > 0", timeout=60_000)
    painted = page.evaluate("performance.getEntriesByName('chart-painted')[0].startTime")
    transferred = sum(r.sizes()["responseBodySize"] + r.sizes()["responseHeadersSize"] for r in responses)
    context.close()
    return painted, transferred


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        db_url = f"sqlite:///{tmp / 'tuneserve.db'}"
        migrate.upgrade(db_url)
        sessionmaker = make_sessionmaker(make_engine(db_url))
        key = make_key(sessionmaker, "bench")
        env = tuneserve_env(tmp / "data", db_url, TUNESERVE_BROKER_URL=f"sqla+sqlite:///{tmp / 'broker.db'}")
        with LiveServer(env, tmp / "api.log") as server, sync_playwright() as playwright:
            job_id = make_job(server.url, key, sessionmaker, args.points)
            browser = playwright.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
            measure(browser, server.url, key, job_id)  # warm the server (its first answers load code)
            runs = [measure(browser, server.url, key, job_id) for _ in range(args.runs)]
            browser.close()
    times = sorted(t for t, _ in runs)
    kb = runs[-1][1] / 1024
    each = ", ".join(f"{t:.0f}" for t in times)
    print(f"{args.points} metric points, {args.runs} cold page loads: chart painted after {each} ms")
    print(f"transferred until then: {kb:.0f} KB")
    print(f"chart_paint_ms_median={statistics.median(times):.0f} page_kb={kb:.0f}")


if __name__ == "__main__":
    main()
