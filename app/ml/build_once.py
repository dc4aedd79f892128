"""Building a built-in model directory once, safely when several processes ask for it at the same time."""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path


def build_once(target: Path, build: Callable[[Path], None]) -> Path:
    """Return `target`, calling `build(tmp_dir)` first if it holds no model yet.

    Within a process, one build at a time: the first requests after start-up arrive together, and besides
    wasting the work, concurrent first imports of transformers' lazy modules fail ("cannot import name").
    Across processes, each builds into its own temporary directory next to the target and renames it into
    place; a loser of the race discards its copy, so no reader ever sees a half-written model.
    """
    if (target / "config.json").is_file():
        return target
    with _BUILDING:
        return _build(target, build)


_BUILDING = threading.Lock()


def _build(target: Path, build: Callable[[Path], None]) -> Path:
    if (target / "config.json").is_file():  # built while this caller waited
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process finished first (the target is a non-empty directory): use theirs.
            if not (target / "config.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
