"""GET /metrics in Prometheus' text format."""

from __future__ import annotations

import re


def test_metrics_exposes_jobs_by_status(client):
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    for status in ("queued", "running", "succeeded", "failed", "cancelled"):
        assert f'tuneserve_jobs{{status="{status}"}} 0' in r.text
    for line in r.text.splitlines():  # every line is a comment or `name{labels} value`
        assert line.startswith("#") or re.fullmatch(r'[a-z_]+(\{[a-z_]+="[a-z_]+"\})? [0-9.e+-]+', line), line
