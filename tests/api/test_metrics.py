"""GET /metrics in Prometheus' text format."""

from __future__ import annotations

import re


def test_metrics_exposes_jobs_by_status(client):
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    for status in ("queued", "running", "succeeded", "failed", "cancelled"):
        assert f'tuneserve_jobs{{status="{status}"}} 0' in r.text
    for line in r.text.splitlines():  # every line is a comment or `name{labels} value`
        assert line.startswith("#") or re.fullmatch(
            r'[a-z_][a-z0-9_]*(\{[a-z_]+="[A-Za-z0-9_+.]+"\})? [0-9.e+-]+', line
        ), line
    assert 'tuneserve_inference_batch_size_bucket{le="+Inf"}' in r.text
    assert "# TYPE tuneserve_inference_batch_size histogram" in r.text
    assert "# TYPE tuneserve_inference_adapter_cache_hits_total counter" in r.text
