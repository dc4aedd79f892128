"""The web dashboard in a real browser: Playwright driving Debian's Chromium against uvicorn and a Celery worker.

One user's session end to end (sign in, a refused file and its line numbers, a good file, a job created from the
form and watched as it trains, the playground, the adapter download, two jobs compared), a wrong key, the API docs,
and on every page: nothing requested outside the service, and a screenshot (TUNESERVE_TEST_ARTIFACTS, default
test-artifacts/dashboard/) to look at.
"""

from __future__ import annotations

import os
import shutil
import tarfile
import time
from pathlib import Path

import pytest

from app import migrate
from tests.datasets.samples import valid_chat_file
from tests.e2e.conftest import Stack, start_job, wait_terminal
from tests.e2e.server import LiveServer

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium")
ARTIFACTS = Path(os.environ.get("TUNESERVE_TEST_ARTIFACTS", Path(__file__).resolve().parents[2] / "test-artifacts"))
SCREENSHOTS = ARTIFACTS / "dashboard"


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dashboard")
    url = f"sqlite:///{tmp / 'tuneserve.db'}"
    migrate.upgrade(url)
    stack = Stack(tmp, url, f"sqla+sqlite:///{tmp / 'broker.db'}")
    with LiveServer(stack.env, tmp / "api.log") as server, stack.worker():
        yield stack, server


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.fail("Debian's chromium is not installed; `make test` installs it")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        # --no-sandbox: the tests may run as root (CI containers), where Chromium's sandbox refuses to start.
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


class Visit:
    """A browser tab on the service that records every request it makes."""

    def __init__(self, browser, base_url: str, **context):
        self.base_url = base_url
        self.context = browser.new_context(base_url=base_url, accept_downloads=True, **context)
        self.page = self.context.new_page()
        self.requests: list[str] = []
        self.page.on("request", lambda request: self.requests.append(request.url))
        self.page.set_default_timeout(30_000)

    def outside(self) -> list[str]:
        return [u for u in self.requests if not u.startswith((self.base_url, "data:", "blob:"))]

    def screenshot(self, name: str) -> None:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=SCREENSHOTS / f"{name}.png", full_page=True)

    def sign_in(self, key: str) -> None:
        self.page.goto("/")
        self.page.get_by_label("API key").fill(key)
        self.page.get_by_role("button", name="Sign in").click()


def bad_file() -> bytes:
    good = valid_chat_file(12).decode().splitlines()
    good[3] = "{not json"
    good[7] = '{"messages": [{"role": "user", "content": "no answer"}]}'
    return ("\n".join(good) + "\n").encode()


def test_a_wrong_key_is_told_so(service, browser):
    _, server = service
    visit = Visit(browser, server.url)
    visit.sign_in("ts-not-a-key")
    alert = visit.page.get_by_role("alert")
    assert "Sign-in failed" in alert.inner_text()
    assert visit.page.get_by_label("API key").is_visible()  # still on the sign-in form, not an empty page
    visit.screenshot("sign-in-refused")
    assert visit.outside() == []


def test_a_users_session_from_upload_to_playground(service, browser, tmp_path):
    stack, server = service
    key = stack.sdk(server).api_key
    visit = Visit(browser, server.url)
    page = visit.page
    visit.sign_in(key)
    page.wait_for_url("**/ui/jobs")
    visit.screenshot("jobs-empty")

    # Files: a refused file names its problems with line numbers; a good one is listed and previewed.
    page.get_by_role("link", name="Files").click()
    page.locator("#upload-file").set_input_files(
        {"name": "bad.jsonl", "mimeType": "application/jsonl", "buffer": bad_file()}
    )
    alert = page.get_by_role("alert")
    assert "line 4" in alert.inner_text() and "line 8" in alert.inner_text()
    visit.screenshot("files-refused")
    # The good one dropped on the upload zone, as a user drags it from their files.
    drop = """(zone, text) => {
        const data = new DataTransfer();
        data.items.add(new File([text], "train.jsonl", {type: "application/jsonl"}));
        zone.dispatchEvent(new DragEvent("drop", {dataTransfer: data, bubbles: true, cancelable: true}));
    }"""
    page.locator(".drop").evaluate(drop, valid_chat_file(40).decode())
    page.get_by_role("status").filter(has_text="Uploaded train.jsonl").wait_for()
    page.get_by_role("button", name="Preview train.jsonl").click()
    assert '"role": "assistant"' in page.locator("pre").inner_text()
    visit.screenshot("files")

    # A job from the form: long enough (100 steps) to be watched while it trains.
    page.get_by_role("link", name="Jobs").click()
    page.get_by_role("link", name="Create a fine-tuning job").click()
    page.get_by_label("Base or fine-tuned model").select_option("tuneserve-tiny")
    page.get_by_label("Training file").select_option(
        label=page.get_by_label("Training file").locator("option").first.inner_text()
    )
    page.get_by_label("Suffix").fill("ui")
    page.get_by_label("Epochs").fill("5")
    page.get_by_label("Batch size").fill("2")
    page.get_by_label("LoRA rank").fill("4")
    visit.screenshot("job-form")
    page.get_by_role("button", name="Create job").click()
    page.wait_for_url("**/ui/jobs/ftjob-*")
    job_id = page.url.rsplit("/", 1)[1]

    chart = page.get_by_role("img", name="Loss and accuracy by step")
    seen_while_running: set[int] = set()
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        status = page.locator(".status").first.inner_text()
        points = int(chart.get_attribute("data-points") or 0)
        if status in ("succeeded", "failed", "cancelled"):
            break
        if status == "running" and points:
            seen_while_running.add(points)
        time.sleep(0.2)
    assert status == "succeeded"
    assert len(seen_while_running) >= 2, seen_while_running  # the chart gained points without a reload
    page.wait_for_function("document.querySelector('[data-points]').dataset.points == '100'")
    assert page.locator(".uplot canvas").count() == 1
    assert page.get_by_role("button", name="Resume").is_disabled()
    page.get_by_role("button", name="Download step_metrics.csv").wait_for()
    assert "null" not in page.locator("dl.facts").inner_text()
    visit.screenshot("job-succeeded")
    model = page.locator("dd a[href^='/ui/playground']").inner_text()
    assert model.startswith("ft:tuneserve-tiny:alpha:ui:")

    # Playground: the fine-tuned model beside the base, both answers streamed in.
    page.locator("dd a[href^='/ui/playground']").click()
    page.get_by_label("Side by side with").select_option("tuneserve-tiny")
    page.get_by_label("Message").fill("hello there")
    page.get_by_role("button", name="Send").click()
    answered = (
        "name => [...document.querySelectorAll('.msg.assistant')].some(m => m.dataset.model === name && m.textContent)"
    )
    for name in (model, "tuneserve-tiny"):
        page.wait_for_function(answered, arg=name)
    visit.screenshot("playground")

    # Models: the adapter downloads as the tar the API serves.
    page.get_by_role("link", name="Models").click()
    with page.expect_download() as download:
        page.get_by_role("button", name=f"Download the adapter of {model}", exact=True).click()
    saved = tmp_path / "adapter.tar"
    download.value.save_as(saved)
    with tarfile.open(saved) as tar:
        assert {"adapter_config.json", "adapter_model.safetensors"} <= {Path(n).name for n in tar.getnames()}
    visit.screenshot("models")

    # Compare: a second job's curve beside the first.
    other = wait_terminal(stack.sdk(server), start_job(stack.sdk(server), n_epochs=2, batch_size=4).id)
    assert other.status == "succeeded"
    page.goto(f"/ui/compare?jobs={job_id},{other.id}")
    legend = page.locator(".u-legend").inner_text()
    assert f"{job_id} train loss" in legend and f"{other.id} train loss" in legend
    visit.screenshot("compare")

    # A result file deleted since: the job page says so, and shows the rest.
    sdk = stack.sdk(server)
    deleted = sdk.fine_tuning.jobs.retrieve(job_id).result_files[0]
    sdk.files.delete(deleted)
    # Readable at phone width: nothing wider than the screen but what scrolls in its own box (tables).
    page.set_viewport_size({"width": 390, "height": 844})
    page.goto(f"/ui/jobs/{job_id}")
    page.locator(".uplot").wait_for()
    page.get_by_text(f"{deleted}: deleted").wait_for()
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    visit.screenshot("job-phone")
    assert visit.outside() == []


def test_keyboard_alone_reaches_every_page(service, browser):
    stack, server = service
    visit = Visit(browser, server.url)
    visit.sign_in(stack.sdk(server).api_key)
    page = visit.page
    page.wait_for_url("**/ui/jobs")
    # From the top of a freshly opened page: the skip link, then the navigation.
    tab_order = []
    page.reload()
    page.get_by_role("heading", name="Jobs").wait_for()
    for _ in range(7):
        page.keyboard.press("Tab")
        tab_order.append(page.evaluate("document.activeElement.textContent.trim()"))
    assert tab_order == ["Skip to content", "Files", "Jobs", "Compare", "Models", "Playground", "API docs"]
    for _ in range(5):  # back to "Files"
        page.keyboard.press("Shift+Tab")
    page.keyboard.press("Enter")
    page.wait_for_url("**/ui/files")
    assert page.get_by_role("heading", name="Files").is_visible()
    assert page.evaluate("document.activeElement.id") == "view"  # focus moves to the new page's content
    page.keyboard.press("Tab")  # whose first control is the upload's purpose
    assert page.evaluate("document.activeElement.name") == "purpose"


def test_the_api_docs_load_from_the_service_itself(service, browser):
    _, server = service
    visit = Visit(browser, server.url)
    visit.page.goto("/docs")
    visit.page.locator(".swagger-ui .info .title").wait_for()
    assert "tuneserve" in visit.page.locator(".swagger-ui .info .title").inner_text()
    visit.screenshot("docs")
    assert visit.outside() == []


def test_assets_are_compressed_and_revalidated(service):
    import httpx

    _, server = service
    r = httpx.get(f"{server.url}/ui/static/app.js", headers={"Accept-Encoding": "gzip"})
    assert (
        r.status_code == 200 and r.headers["content-encoding"] == "gzip" and "javascript" in r.headers["content-type"]
    )
    again = httpx.get(f"{server.url}/ui/static/app.js", headers={"If-None-Match": r.headers["etag"]})
    assert again.status_code == 304
    assert httpx.get(f"{server.url}/ui/static/%2e%2e/%2e%2e/main.py").status_code == 404  # nothing outside static/
    assert httpx.get(f"{server.url}/ui/jobs/anything").headers["content-type"].startswith("text/html")
