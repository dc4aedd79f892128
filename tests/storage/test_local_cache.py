"""The local cache of fetched objects: bounded by bytes, least recently used out first, shared by concurrent
readers that each see a complete entry."""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor

from app.storage import cache as cache_module
from app.storage.cache import LocalCache


def test_a_hit_does_not_fetch_again_and_the_least_recently_used_go_first(tmp_path, monkeypatch):
    monkeypatch.setattr(cache_module, "IN_USE_SECONDS", 0.0)
    cache = LocalCache(tmp_path, max_bytes=2500)
    fetched = []

    def fetch_bytes(n):
        def fetch(path):
            fetched.append(n)
            path.write_bytes(b"x" * n)

        return fetch

    a = cache.get("files/a", fetch_bytes(1000))
    b = cache.get("files/b", fetch_bytes(1000))
    old = time.time() - 100
    os.utime(a, (old, old))
    os.utime(b, (old + 1, old + 1))
    assert cache.get("files/a", fetch_bytes(1000)) == a and fetched == [1000, 1000]  # a hit, and a is recent now
    cache.get("files/c", fetch_bytes(1000))  # 3000 > 2500: b, the least recently used, goes
    assert a.exists() and not b.exists()
    assert sorted(p.name for p in (tmp_path / "entries").iterdir()) == ["files%2Fa", "files%2Fc"]


def test_entries_in_use_are_kept_even_over_the_bound(tmp_path):
    cache = LocalCache(tmp_path, max_bytes=10)
    first = cache.get("k1", lambda p: p.write_bytes(b"y" * 100))
    cache.get("k2", lambda p: p.write_bytes(b"y" * 100))
    assert first.exists()  # just handed out: a reader may be opening it


def test_concurrent_misses_each_get_a_complete_entry(tmp_path):
    cache = LocalCache(tmp_path, max_bytes=10**9)

    def fetch(path):
        path.mkdir()
        time.sleep(0.05)
        (path / "adapter_model.safetensors").write_bytes(b"z" * 4096)

    with ThreadPoolExecutor(8) as pool:
        paths = list(pool.map(lambda _: cache.get("models/j/attempt-1", fetch), range(8)))
    assert len(set(paths)) == 1
    assert (paths[0] / "adapter_model.safetensors").read_bytes() == b"z" * 4096
    assert list((tmp_path / ".tmp").iterdir()) == []  # the losers' copies are gone
